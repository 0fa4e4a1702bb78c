"""Kernels for MoE layers. Nothing here imports `rexmoe_jax`: each kernel is a plain function
of arrays, with a readable reference beside it and an `implementation=` switch in its api."""
