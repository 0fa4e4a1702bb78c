"""Kernels for the decoder: the MoE layer's token permute and grouped matmuls, and causal
attention. Nothing here imports `rexmoe_jax`: each kernel is a plain function of arrays, with a
readable reference beside it (attention's is the model's XLA path) and a switch in its api.

Shape letters follow the glossary of rexmoe_jax/model/__init__.py (M rows, I and O a grouped
matmul's input and output widths, E its groups, W row blocks of C rows, A assignments, ...)."""
