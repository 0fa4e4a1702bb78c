"""Kernels for MoE layers. Nothing here imports `rexmoe_jax`: each kernel is a plain function
of arrays, with a readable reference beside it and an `implementation=` switch in its api.

Shape letters follow the glossary at the top of rexmoe_jax/model.py (M rows, I and O a grouped
matmul's input and output widths, E its groups, W row blocks of C rows, A assignments, ...)."""
