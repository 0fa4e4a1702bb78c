"""Import: a Hugging Face Qwen2-MoE or Mixtral folder as a new run at r = 1 (or at the r an
export of this project recorded), with config, tokenizer and a step-0 checkpoint.

Qwen2-MoE parts with no counterpart here are accepted only where they change nothing: zero q/k/v
biases, and a shared-expert gate of zero weights (a constant 1/2, folded into the shared
expert's down projection; a real Qwen1.5-MoE gate varies per token and is refused). Mixtral
always renormalises its top-K gates, so it imports with model.renormalize_gates=true.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from rexmoe_jax.config import Config, ConfigError, ModelConfig, apply_overrides, read_json_config
from rexmoe_jax.hf import qwen2_moe
from rexmoe_jax.hf.regroup import ROUTER, Layers, group
from rexmoe_jax.hf.run_io import check_new_folder, write_run
from rexmoe_jax.hf.tensorfile import TensorFiles

MIXTRAL_EXPERTS = {"experts_gate": "w1", "experts_up": "w3", "experts_down": "w2"}
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
_FLOATS = ("F32", "BF16", "F16", "F64")  # integer weights (a quantised model) would be cast as numbers


def read_hf_config(folder: pathlib.Path) -> dict:
    return read_json_config(folder, "a Hugging Face model folder")


def model_config(hf: dict) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "qwen2_moe":
        return qwen2_moe.model_config(hf)
    if kind == "mixtral":
        if hf.get("sliding_window"):
            raise ConfigError(f"Mixtral with sliding_window={hf['sliding_window']} is not supported")
        return qwen2_moe.common_model_config(
            hf,
            expert_ffn=qwen2_moe.integer(hf, "intermediate_size"),
            num_experts=qwen2_moe.integer(hf, "num_local_experts"),
            renormalize_gates=True,
        )
    raise ConfigError(f"model_type {kind!r} is not supported; import reads qwen2_moe and mixtral")


class _Tensors:
    """The folder's tensors, each taken at most once, checked against the shape it must have."""

    def __init__(self, files: TensorFiles):
        self.files, self.left = files, {n for n in files.names() if not n.endswith(_IGNORED)}

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.left:
            raise ConfigError(f"tensor {name!r} is missing")
        self.left.discard(name)
        if self.files.shape(name) != tuple(shape):
            raise ConfigError(
                f"tensor {name!r} has shape {list(self.files.shape(name))}, but config.json "
                f"implies {list(shape)}"
            )
        if self.files.dtype(name) not in _FLOATS:
            raise ConfigError(f"tensor {name!r} holds {self.files.dtype(name)}, not floating point weights "
                              f"({', '.join(_FLOATS)}); is the folder a quantised model?")
        return np.asarray(self.files.get(name), np.float32)

    def zero(self, name: str, shape: tuple[int, ...], why: str) -> None:
        if name in self.left and np.any(self.take(name, shape)):
            raise ConfigError(f"tensor {name!r} is not zero: {why}")

    def prefix(self, options: tuple[str, ...], probe: str) -> str:
        return next((p for p in options if probe.format(p) in self.left), options[0])


def imported_layers(files: TensorFiles, hf: dict, model: ModelConfig) -> Layers:
    """The folder's weights per layer; with rexmoe_reuse = r, each group's layers must hold one
    and the same pool, of which each layer keeps its own N experts."""
    tensors = _Tensors(files)
    shapes = {name: shape for name, shape, _ in qwen2_moe.tensor_specs(model, np.float32)}
    mixtral = hf.get("model_type") == "mixtral"
    moe = tensors.prefix(("block_sparse_moe", "mlp"), "model.layers.0.{}.gate.weight") if mixtral else "mlp"
    names = MIXTRAL_EXPERTS if mixtral else qwen2_moe.EXPERT_TENSORS
    n = model.num_experts
    layers: dict[tuple[str, ...], list] = {}
    own: dict[str, list] = {name: [] for name in names}
    routers, group_pool = [], {}
    for layer in range(model.num_layers):
        prefix = f"model.layers.{layer}."
        for path in qwen2_moe.layer_paths(model):
            name = prefix + qwen2_moe.LAYER_TENSORS[path]
            value = qwen2_moe.layer_from_hf(
                path, tensors.take(name.replace(".mlp.", f".{moe}."), shapes[name]), model
            )
            if path == ROUTER:
                routers.append(value)
            else:
                layers.setdefault(path, []).append(value)
        for name, heads in zip(
            ("q_proj", "k_proj", "v_proj"), (model.num_heads, model.num_kv_heads, model.num_kv_heads)
        ):
            tensors.zero(
                f"{prefix}self_attn.{name}.bias",
                shapes[f"{prefix}self_attn.{name}.bias"],
                "attention biases are not supported",
            )
        tensors.zero(
            prefix + "mlp.shared_expert_gate.weight",
            (1, model.d_model),
            "a per-token shared-expert gate has no counterpart here (only a zero gate, a constant 1/2)",
        )
        j = layer % model.reuse
        for ours, theirs in names.items():
            ours_name = qwen2_moe.EXPERT_TENSORS[ours]
            pool = np.stack(
                [
                    tensors.take(
                        f"{prefix}{moe}.experts.{e}.{theirs}.weight",
                        shapes[f"{prefix}mlp.experts.{e}.{ours_name}.weight"],
                    ).T
                    for e in range(model.pool_size)
                ]
            )
            if j == 0:
                group_pool[ours] = pool
            elif not np.array_equal(pool, group_pool[ours]):
                raise ConfigError(
                    f"layer {layer}'s experts differ from layer {layer - j}'s, but rexmoe_reuse="
                    f"{model.reuse} says the two share one pool"
                )
            own[ours].append(pool[j * n : (j + 1) * n])
    top = {
        path: tensors.take(name, shapes[name])
        for path, name in qwen2_moe.TOP_TENSORS.items()
        if name in shapes
    }
    if ("lm_head",) in top:
        top[("lm_head",)] = top[("lm_head",)].T
    if tensors.left:
        raise ConfigError(
            f"tensor {min(tensors.left)!r} has no place in the model ({len(tensors.left)} such tensors)"
        )
    biases = [np.zeros(model.pool_size, np.float32) for _ in routers] if model.router_bias else None
    return Layers(
        top,
        {path: np.stack(v) for path, v in layers.items()},
        {name: np.stack(v) for name, v in own.items()},
        routers,
        biases,
    )


def import_model(folder: pathlib.Path, workdir: pathlib.Path, overrides: list[str] = ()) -> Config:
    """Writes the model in `folder` as a new run in `workdir`; `overrides` (section.field=value)
    set the rest of the run's config. Returns the config written."""
    check_new_folder(workdir, "--workdir")
    hf = read_hf_config(folder)
    model = model_config(hf)
    tokenizer = next(
        (folder / n for n in ("tokenizer.json", "tokenizer.model") if (folder / n).is_file()), None
    )
    if tokenizer is None:
        raise ConfigError(f"{str(folder)!r} has no tokenizer.json or tokenizer.model")
    layers = imported_layers(TensorFiles(folder), hf, model)
    # An export of this project's (rexmoe_reuse) records the run's data.seq_len here: evaluation
    # windows and generation's warning read it. Another model's (32,768 for Mixtral) is its
    # longest context, not a sequence length to evaluate the default corpus at.
    positions = hf.get("max_position_embeddings")
    data = Config().data
    ours = "rexmoe_reuse" in hf
    if ours and isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        data = dataclasses.replace(data, seq_len=positions)
    config = apply_overrides(dataclasses.replace(Config(), model=model, data=data), overrides)
    if config.model != model:
        raise ConfigError("model.* comes from config.json; overrides may set the other sections only")
    return write_run(workdir, config, group(layers, model), tokenizer)
