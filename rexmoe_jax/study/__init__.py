"""Reproduction studies: `python -m rexmoe_jax.study run|report STUDY.toml` (__main__.py).

    spec.py     the study file: arms x seeds of a preset, budget, questions
    runner.py   the resumable queue of train.py processes
    record.py   a finished run condensed into one JSON record
    stats.py    means and paired differences with confidence intervals
    figures.py  the report's figures
    report.py   docs/reproduction.md from the records

The modules are imported by name; this package imports none.
"""
