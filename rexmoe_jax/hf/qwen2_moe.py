"""This decoder as a transformers Qwen2-MoE (`Qwen2MoeForCausalLM`): config and tensor names.

Why Qwen2-MoE, each point checked against transformers 5.25's modeling_qwen2_moe.py and vLLM's
qwen2_moe.py: the same RMSNorm (float32 statistics, eps inside the square root, scale after);
rotary embeddings in the rotate-half layout with inv_freq = base^(-2i/Z); grouped-query
attention where query head h reads key/value head h // (H/J); SwiGLU experts
down(silu(gate x) * up x); a router that takes the softmax over all experts in float32 and
the top K of the probabilities, gated by those probabilities, renormalised over the K exactly
when `norm_topk_prob` (model.renormalize_gates); untied or tied embeddings.
Two parts it has and this decoder lacks are written so that they change nothing:
- q/k/v biases (vLLM always builds them): written as zeros, which add exactly 0.
- the shared expert's gate sigmoid(w . x): with w = 0 it is exactly 1/2, so the shared
  expert's down projection is written doubled (a power of two scales every product exactly).
  Without shared experts the shared expert has width 0 and only its zero gate is written.
A ReXMoE layer is a top-K layer over its group's r*N experts, so each layer gets its group's
pool: the same function at r times the expert storage. `rexmoe_reuse` in config.json (which
transformers keeps and ignores) lets import fold the pools back; `rexmoe_router_bias` lets it
give the run its (zero) router bias back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from rexmoe_jax import reuse
from rexmoe_jax.config import ConfigError, ModelConfig

SHARED_GATE_SCALE = 2.0  # 1 / sigmoid(0)
LAYER_TENSORS = {  # path under groups/layers -> name under model.layers.<l>.
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("ffn_norm", "scale"): "post_attention_layernorm.weight",
    ("attention", "query"): "self_attn.q_proj.weight",
    ("attention", "key"): "self_attn.k_proj.weight",
    ("attention", "value"): "self_attn.v_proj.weight",
    ("attention", "out"): "self_attn.o_proj.weight",
    ("moe", "router"): "mlp.gate.weight",
    ("moe", "shared_experts", "gate"): "mlp.shared_expert.gate_proj.weight",
    ("moe", "shared_experts", "up"): "mlp.shared_expert.up_proj.weight",
    ("moe", "shared_experts", "down"): "mlp.shared_expert.down_proj.weight",
}
EXPERT_TENSORS = {"experts_gate": "gate_proj", "experts_up": "up_proj", "experts_down": "down_proj"}
TOP_TENSORS = {
    ("token_embed",): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
}
_BIASES = ("q_proj", "k_proj", "v_proj")


def unexportable(model: ModelConfig) -> str | None:
    """Why `model` has no exact Qwen2-MoE form, or None."""
    if model.ffn != "moe":
        return "model.ffn=dense has no experts; export writes MoE models only"
    if model.num_layers % model.reuse:
        return (
            f"model.num_layers={model.num_layers} is not divisible by model.reuse={model.reuse}: the "
            "smaller last group routes over fewer experts, and Qwen2-MoE has one expert count for all layers"
        )
    if model.head_dim and model.head_dim != model.d_model // model.num_heads:
        return (
            f"model.head_dim={model.head_dim} differs from d_model/num_heads: vLLM's Qwen2-MoE derives the "
            "head width from them"
        )
    return None


def hf_config(model: ModelConfig, *, max_positions: int, eos_id: int, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tie_embeddings,
        # transformers 5 reads rope_parameters; transformers 4 and older vLLM read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_base},
        "rope_theta": model.rope_base,
        "max_position_embeddings": max_positions,
        "num_experts": model.pool_size,
        "num_experts_per_tok": model.top_k,
        "moe_intermediate_size": model.expert_ffn,
        "norm_topk_prob": model.renormalize_gates,
        "shared_expert_intermediate_size": model.num_shared_experts * model.expert_ffn,
        "intermediate_size": model.expert_ffn,  # the width of dense layers, of which there are none
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": model.init_std,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "dtype": dtype,
        "rexmoe_reuse": model.reuse,
        "rexmoe_router_bias": model.router_bias,  # zero here (check_exportable); training on needs it
    }


def _layer_to_hf(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    """One layer's weight in Linear's (out, in) layout."""
    if path in (("attention", "query"), ("attention", "key"), ("attention", "value")):
        return w.reshape(w.shape[0], -1).T  # (D, heads, Z) -> (heads*Z, D)
    if path == ("attention", "out"):
        return w.reshape(-1, w.shape[-1]).T  # (H, Z, D) -> (D, H*Z)
    if path == ("moe", "shared_experts", "down"):
        return w.T * np.float32(SHARED_GATE_SCALE)
    return w if w.ndim == 1 else w.T


def layer_from_hf(path: tuple[str, ...], w: np.ndarray, model: ModelConfig) -> np.ndarray:
    """The inverse of _layer_to_hf for one layer, as float32."""
    w = np.asarray(w, np.float32)
    z = model.resolved_head_dim
    if path in (("attention", "query"), ("attention", "key"), ("attention", "value")):
        return w.T.reshape(w.shape[1], -1, z)
    if path == ("attention", "out"):
        return w.T.reshape(-1, z, w.shape[0])
    if path == ("moe", "shared_experts", "down"):
        return w.T / np.float32(SHARED_GATE_SCALE)
    return w if w.ndim == 1 else w.T


def layer_paths(model: ModelConfig) -> list[tuple[str, ...]]:
    shared = model.num_shared_experts > 0
    return [p for p in LAYER_TENSORS if shared or p[1] != "shared_experts"]


def tensor_specs(model: ModelConfig, dtype: np.dtype) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """Every tensor of the exported model, layer by layer (the order of the files)."""
    d, z, p, f = model.d_model, model.resolved_head_dim, model.pool_size, model.expert_ffn
    shapes = {
        ("attn_norm", "scale"): (d,),
        ("ffn_norm", "scale"): (d,),
        ("attention", "query"): (model.num_heads * z, d),
        ("attention", "key"): (model.num_kv_heads * z, d),
        ("attention", "value"): (model.num_kv_heads * z, d),
        ("attention", "out"): (d, model.num_heads * z),
        ("moe", "router"): (p, d),
        ("moe", "shared_experts", "gate"): (model.num_shared_experts * f, d),
        ("moe", "shared_experts", "up"): (model.num_shared_experts * f, d),
        ("moe", "shared_experts", "down"): (d, model.num_shared_experts * f),
    }
    specs = [("model.embed_tokens.weight", (model.vocab_size, d), dtype)]
    for layer in range(model.num_layers):
        prefix = f"model.layers.{layer}."
        specs += [(prefix + LAYER_TENSORS[path], shapes[path], dtype) for path in layer_paths(model)]
        specs += [
            (prefix + f"self_attn.{name}.bias", (heads * z,), dtype)
            for name, heads in zip(_BIASES, (model.num_heads, model.num_kv_heads, model.num_kv_heads))
        ]
        specs.append((prefix + "mlp.shared_expert_gate.weight", (1, d), dtype))
        for e in range(p):
            specs += [
                (prefix + f"mlp.experts.{e}.gate_proj.weight", (f, d), dtype),
                (prefix + f"mlp.experts.{e}.up_proj.weight", (f, d), dtype),
                (prefix + f"mlp.experts.{e}.down_proj.weight", (d, f), dtype),
            ]
    specs.append(("model.norm.weight", (d,), dtype))
    if not model.tie_embeddings:
        specs.append(("lm_head.weight", (model.vocab_size, d), dtype))
    return specs


def exported_tensors(
    model: ModelConfig, read: Callable[[tuple[str, ...]], np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of tensor_specs, reading one parameter leaf at a time
    with `read(path)`: a layer's weights come out of its block's stacked leaf, and a group's
    pool is written into each of its r layers."""
    for path, name in TOP_TENSORS.items():
        if path != ("lm_head",) or not model.tie_embeddings:
            top = read(path)
            yield name, top.T if path == ("lm_head",) else top
            del top
    for block, ids_GxR in zip(("groups", "last_group"), reuse.group_layer_ids(model)):
        for path in layer_paths(model):
            leaf = read((block, "layers") + path)
            for (g, j), layer in np.ndenumerate(ids_GxR):
                yield f"model.layers.{layer}.{LAYER_TENSORS[path]}", _layer_to_hf(path, leaf[g, j])
            del leaf  # before the next read: never two leaves at once
        for leaf_name, hf_name in EXPERT_TENSORS.items():
            pools = read((block, leaf_name))
            for (g, j), layer in np.ndenumerate(ids_GxR):
                for e in range(pools.shape[1]):
                    yield f"model.layers.{layer}.mlp.experts.{e}.{hf_name}.weight", pools[g, e].T
            del pools
    for layer in range(model.num_layers):
        z = model.resolved_head_dim
        for name, heads in zip(_BIASES, (model.num_heads, model.num_kv_heads, model.num_kv_heads)):
            yield f"model.layers.{layer}.self_attn.{name}.bias", np.zeros((heads * z,), np.float32)
        yield f"model.layers.{layer}.mlp.shared_expert_gate.weight", np.zeros((1, model.d_model), np.float32)


def model_config(hf: dict) -> ModelConfig:
    """The ModelConfig of a Qwen2-MoE config.json, or a ConfigError naming what has none."""
    _check(
        hf.get("decoder_sparse_step", 1) == 1 and not hf.get("mlp_only_layers"),
        "dense layers (decoder_sparse_step != 1 or mlp_only_layers) are not supported",
    )
    _check(
        not hf.get("use_sliding_window", False),
        "sliding-window attention (use_sliding_window) is not supported",
    )
    pool, reuse_factor, ffn = (
        integer(hf, "num_experts"),
        hf.get("rexmoe_reuse", 1),
        integer(hf, "moe_intermediate_size"),
    )
    _check(
        isinstance(reuse_factor, int) and reuse_factor >= 1 and pool % reuse_factor == 0,
        f"rexmoe_reuse={reuse_factor!r} does not divide num_experts={pool}",
    )
    shared = hf.get("shared_expert_intermediate_size") or 0
    _check(
        isinstance(shared, int) and shared % ffn == 0,
        f"shared_expert_intermediate_size={shared} is not a "
        f"multiple of moe_intermediate_size={ffn}: shared experts are whole experts here",
    )
    return common_model_config(
        hf,
        expert_ffn=ffn,
        num_experts=pool // reuse_factor,
        reuse=reuse_factor,
        num_shared_experts=shared // ffn,
        renormalize_gates=bool(hf.get("norm_topk_prob")),
        router_bias=hf.get("rexmoe_router_bias") is True,
    )


def integer(hf: dict, key: str) -> int:
    value = hf.get(key)
    _check(isinstance(value, int) and not isinstance(value, bool), f"config.json has no integer {key!r}")
    return value


def common_model_config(hf: dict, **moe) -> ModelConfig:
    """The fields Qwen2-MoE and Mixtral configs share: attention, norms, rotary, embeddings."""
    _check(
        hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} is not supported (silu)"
    )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _check(kind == "default", f"rope scaling {kind!r} is not supported")
    base = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    d, heads = integer(hf, "hidden_size"), integer(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or 0
    return ModelConfig(
        vocab_size=integer(hf, "vocab_size"),
        d_model=d,
        num_layers=integer(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim == d // heads else head_dim,
        top_k=integer(hf, "num_experts_per_tok"),
        rope_base=float(base),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        **moe,
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
