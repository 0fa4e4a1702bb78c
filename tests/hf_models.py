"""Tiny models and run folders for the Hugging Face tests (test_hf.py, test_hf_transformers.py)."""

from __future__ import annotations

import gzip
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import trainer
from rexmoe_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from rexmoe_jax.data import EMBEDDED_CORPUS, EMBEDDED_TOKENIZER
from rexmoe_jax.hf.regroup import unflatten
from rexmoe_jax.hf.run_io import param_shapes, write_run


def tiny_config(**model) -> Config:
    """A 4-layer model over the embedded tokenizer's 4,096 tokens. The larger init_std makes the
    router's top-K choices clear-cut, so float rounding cannot flip one."""
    fields = dict(
        vocab_size=4096,
        d_model=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        expert_ffn=16,
        num_experts=4,
        top_k=2,
        init_std=0.1,
    )
    return Config(
        model=ModelConfig(**{**fields, **model}),
        data=DataConfig(seq_len=32, batch_size=4),
        train=TrainConfig(steps=4, log_every=1, eval_every=4, eval_batches=1, sample_tokens=0),
    )


def random_params(config: Config, seed: int = 0) -> dict:
    """Parameters of `config` (from shapes, nothing compiled), all random: norm scales around 1,
    every weight normal(init_std). Router biases stay zero."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(config).items():
        if path[-1] == "router_bias":
            flat[path] = np.zeros(shape.shape, np.float32)
        else:
            flat[path] = (
                float(path[-1] == "scale") + rng.normal(0, config.model.init_std, shape.shape)
            ).astype(np.float32)
    return unflatten(flat)


def make_run(folder: pathlib.Path, config: Config, params: dict) -> Config:
    """A run folder holding `params` as its step-0 checkpoint, with the embedded tokenizer."""
    return write_run(folder, config, params, EMBEDDED_TOKENIZER)


def logits(config: Config, params, tokens_BxS: np.ndarray, psr=None) -> np.ndarray:
    model = trainer.build_model(config)
    out, _ = jax.jit(lambda p, t, psr: model.apply({"params": p}, t, psr=psr))(
        params, jnp.asarray(tokens_BxS), psr
    )
    return np.asarray(out)


def tokens(config: Config, shape=(2, 12), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.model.vocab_size, shape).astype(np.int32)


def sentencepiece_model(folder: pathlib.Path, model_type: str, vocab_size: int = 600,
                        **options) -> pathlib.Path:
    """A SentencePiece model trained on 1 MB of the embedded KJV text (about a second)."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        (folder / "text.txt").write_text(f.read()[200_000:1_200_000])
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "text.txt"), model_prefix=str(folder / model_type), vocab_size=vocab_size,
        model_type=model_type, unk_id=0, bos_id=1, eos_id=2, minloglevel=2, **options)
    return folder / f"{model_type}.model"


def kjv_lines(start: int, count: int) -> list[str]:
    """Lines start ... start + count - 1 of the embedded KJV text."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        return [line for number, line in enumerate(f) if start <= number < start + count]
