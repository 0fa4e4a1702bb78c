"""Benchmarks that print tables (python -m benchmarks.NAME); RESULTS.md records their runs."""
