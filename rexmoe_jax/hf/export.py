"""Export: a run's newest checkpoint as a Hugging Face Qwen2-MoE folder (qwen2_moe.py says why
that family and how each part maps) that transformers loads with no custom code and vLLM serves.

The weights stream: the files are laid out first, then filled leaf by leaf from the checkpoint,
so host memory holds the largest parameter leaf (a block's stacked expert pool) and one converted
tensor, never the model twice. Everything is written into a hidden sibling folder that is
renamed to --output at the end: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil

import numpy as np

from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.data import tokenizer_path
from rexmoe_jax.hf import qwen2_moe, spm_json
from rexmoe_jax.hf.run_io import Leaves, check_new_folder
from rexmoe_jax.hf.tensorfile import TensorWriter
from rexmoe_jax.tokenizer import load_tokenizer

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype("bfloat16")}


def check_exportable(config: Config, leaves: Leaves) -> None:
    """Raises a ConfigError naming what Qwen2-MoE cannot express exactly."""
    reason = qwen2_moe.unexportable(config.model)
    if reason:
        raise ConfigError(f"cannot export: {reason}")
    for path in leaves.shapes:
        if path[-1] == "router_bias" and np.any(leaves.read(path)):
            raise ConfigError(
                "cannot export: model.router_bias holds nonzero values, a bias on the selection "
                "only, and Qwen2-MoE's router has none (its gates and choices use the same scores)"
            )


def export(
    config: Config,
    leaves: Leaves,
    output: pathlib.Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 1024**3,
) -> dict:
    """Writes the model of `config` with the parameters `leaves` into `output`; returns a summary."""
    check_new_folder(output, "--output")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_exportable(config, leaves)
    tokenizer_file = tokenizer_path(config.data)
    tokenizer = load_tokenizer(tokenizer_file)  # checks it and finds its end-of-text id
    converted = None
    if tokenizer_file.suffix != ".json":  # SentencePiece: as a tokenizer.json, checked before any weight
        converted = spm_json.convert(tokenizer_file)
        spm_json.check_same_encoding(tokenizer, converted, tokenizer_file)
    model = config.model
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    partial.mkdir(parents=True)
    try:
        writer = TensorWriter(partial, qwen2_moe.tensor_specs(model, DTYPES[dtype]), max_shard_bytes)
        try:
            for name, array in qwen2_moe.exported_tensors(model, leaves.read):
                writer.put(name, array)
                del array  # a view of a whole leaf: gone before the next leaf is read
        except BaseException:
            with contextlib.suppress(Exception):  # it would only add "tensors never written"
                writer.close()
            raise
        writer.close()
        hf = qwen2_moe.hf_config(
            model, max_positions=config.data.seq_len, eos_id=tokenizer.eod_id, dtype=dtype
        )
        _write_json(partial / "config.json", hf)
        _write_json(
            partial / "generation_config.json", {"eos_token_id": tokenizer.eod_id, "do_sample": False}
        )
        _write_tokenizer(tokenizer_file, converted, tokenizer.eod_id, config.data.seq_len, partial)
        if output.exists():
            output.rmdir()  # empty: check_new_folder said so
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {
        "files": writer.files,
        "bytes": writer.total_bytes,
        "experts_per_layer": model.pool_size,
        "step": leaves.step,
    }


def _write_json(path: pathlib.Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _write_tokenizer(source: pathlib.Path, converted, eod_id: int, max_length: int,
                     folder: pathlib.Path) -> None:
    """tokenizer.json (the run's own, or `converted` from its SentencePiece model) with a
    PreTrainedTokenizerFast config; it adds no BOS or EOS, as this project's encoding does not."""
    import tokenizers

    if converted is None:
        shutil.copyfile(source, folder / "tokenizer.json")
        converted = tokenizers.Tokenizer.from_file(str(source))
    else:
        converted.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": converted.id_to_token(eod_id),
         "model_max_length": max_length, "clean_up_tokenization_spaces": False},
    )
