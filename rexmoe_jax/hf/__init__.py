"""Hugging Face in and out: export a run as a transformers Qwen2-MoE, import a Qwen2-MoE or
Mixtral as a run, widen an r = 1 run into ReXMoE. The command: python -m rexmoe_jax.hf.

    export.py      a run's newest checkpoint as a Hugging Face folder (safetensors shards,
                   config.json, the tokenizer), checked against transformers' layout
    importer.py    a Qwen2-MoE or Mixtral folder as a new run with a step-0 checkpoint
    widen.py       a trained r = 1 run as a run at r > 1 that continues with PSR
    qwen2_moe.py   the decoder as a transformers Qwen2-MoE: config fields and tensor names
    regroup.py     parameters between the decoder's grouped layout and one entry per layer
    run_io.py      a run's parameters read leaf by leaf; a new run folder written from parameters
    spm_json.py    a SentencePiece model as a tokenizer.json that encodes as the run does
    tensorfile.py  safetensors read and written with NumPy alone
    __main__.py    the command line
"""

from rexmoe_jax.hf.export import export
from rexmoe_jax.hf.importer import import_model
from rexmoe_jax.hf.run_io import checkpoint_leaves, in_memory
from rexmoe_jax.hf.widen import widen

__all__ = ["checkpoint_leaves", "export", "import_model", "in_memory", "widen"]
