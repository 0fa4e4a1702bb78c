"""Hugging Face in and out: export a run as a transformers Qwen2-MoE, import a Qwen2-MoE or
Mixtral as a run, widen an r = 1 run into ReXMoE. The command: python -m rexmoe_jax.hf."""

from rexmoe_jax.hf.export import export
from rexmoe_jax.hf.importer import import_model
from rexmoe_jax.hf.run_io import checkpoint_leaves, in_memory
from rexmoe_jax.hf.widen import widen

__all__ = ["checkpoint_leaves", "export", "import_model", "in_memory", "widen"]
