"""The dense parts of a decoder layer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Shape letters: the glossary in rexmoe_jax/model/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import attention as flash
from rexmoe_jax import sharding
from rexmoe_jax.config import ComputeConfig, ConfigError, ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param_init(stddev: float, names: tuple[str, ...]):
    """A normal initializer carrying logical axis names (the sharding table maps them)."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def output_init_std(config: ModelConfig) -> float:
    """Projections into the residual stream are scaled down by sqrt(2 L) (GPT-2's rule)."""
    return config.init_std / (2 * config.num_layers) ** 0.5


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x_BxSxD.shape[-1],), jnp.float32)
        # Statistics in float32: a bf16 mean of squares loses the small components.
        x32 = x_BxSxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale_D.reshape((1,) * (normed.ndim - 1) + (-1,))).astype(self.dtype)


def apply_rope(x_BxSxHxZ: jax.Array, positions_BxS: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (rotate-half convention), computed in float32."""
    half = x_BxSxHxZ.shape[-1] // 2
    inv_freq_Z2 = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxSxZ2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq_Z2[None, None, :]
    sin = jnp.sin(angles_BxSxZ2)[:, :, None, :]
    cos = jnp.cos(angles_BxSxZ2)[:, :, None, :]
    x32 = x_BxSxHxZ.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BxSxHxZ.dtype)


class Segments(NamedTuple):
    """Several sequences packed into one row (scoring; and training with data.document_masking,
    see `documents`): each token names its document and its branch. A token sees the earlier
    tokens of its own document that are in the shared trunk (branch 0) or in its own branch, so
    the choices of a question can follow one copy of its context without seeing each other.
    Positions restart per document."""

    document_BxS: jax.Array
    branch_BxS: jax.Array

    def visible(self) -> jax.Array:
        """(B, S, U) with S = U: whether query s may see key u, apart from causality."""
        doc, branch = self.document_BxS, self.branch_BxS
        same_doc_BxSxU = doc[:, :, None] == doc[:, None, :]
        return same_doc_BxSxU & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))


def documents(tokens_BxS: jax.Array, eod_id: int) -> tuple[Segments, jax.Array]:
    """Rows of documents packed end to end, each ended by `eod_id` (the training data's
    packing): the Segments that keep each token's attention inside its document (the end token
    belongs to the document it ends), and positions that restart at each document's start."""
    after_end_BxS = tokens_BxS[:, :-1] == eod_id
    starts_BxS = jnp.concatenate([jnp.ones_like(after_end_BxS[:, :1]), after_end_BxS], axis=1)
    index_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1], dtype=jnp.int32), tokens_BxS.shape)
    first_BxS = jax.lax.cummax(jnp.where(starts_BxS, index_BxS, 0), axis=1)  # where its document began
    document_BxS = jnp.cumsum(starts_BxS.astype(jnp.int32), axis=1)
    return Segments(document_BxS, jnp.zeros_like(document_BxS)), index_BxS - first_BxS


def causal_attention(q_BxSxHxZ: jax.Array, k_BxUxJxZ: jax.Array, v_BxUxJxZ: jax.Array,
                     q_pos_BxS: jax.Array, kv_pos_BxU: jax.Array,
                     segments: Segments | None = None) -> jax.Array:
    """Softmax attention where a query sees the keys at positions <= its own (and, with
    `segments`, only those of its document and branch).

    Masking by positions rather than by index lets the same function serve a KV cache.
    Query heads are grouped over key/value heads (GQA) without repeating the keys.
    """
    b, s, h, z = q_BxSxHxZ.shape
    kv_heads = k_BxUxJxZ.shape[2]
    q_BxSxJxQxZ = q_BxSxHxZ.reshape(b, s, kv_heads, h // kv_heads, z)
    logits_BxJxQxSxU = jnp.einsum("bsjqz,bujz->bjqsu", q_BxSxJxQxZ, k_BxUxJxZ,
                                  preferred_element_type=jnp.float32) * z ** -0.5
    visible_BxSxU = q_pos_BxS[:, :, None] >= kv_pos_BxU[:, None, :]
    if segments is not None:
        visible_BxSxU = visible_BxSxU & segments.visible()
    logits_BxJxQxSxU = jnp.where(visible_BxSxU[:, None, None], logits_BxJxQxSxU,
                                 jnp.finfo(jnp.float32).min)
    probs_BxJxQxSxU = jax.nn.softmax(logits_BxJxQxSxU, axis=-1).astype(v_BxUxJxZ.dtype)
    out_BxSxJxQxZ = jnp.einsum("bjqsu,bujz->bsjqz", probs_BxJxQxSxU, v_BxUxJxZ)
    return out_BxSxJxQxZ.reshape(b, s, h, z)


def flash_applies(compute: ComputeConfig, seq_len: int, platform: str | None = None) -> bool:
    """Whether rows of `seq_len` (without a KV cache or packed segments) take the flash kernel on
    `platform` (None: that of the current mesh, `sharding.platform()`): with "flash", or "auto"
    on TPU."""
    wanted = compute.attention == "flash" or (
        compute.attention == "auto" and (platform or sharding.platform()) == "tpu")
    return wanted and flash.applies(seq_len)


def flash_attention(q_BxSxHxZ: jax.Array, k_BxSxJxZ: jax.Array, v_BxSxJxZ: jax.Array) -> jax.Array:
    """causal_attention by index (rows whose positions count up from 0) with the flash kernel, on
    each device's own rows and heads (the batch axes split B, the tensor axis the heads)."""
    heads, platform = P(sharding.BATCH_AXES, None, "tensor", None), sharding.platform()
    if platform == "gpu":
        raise ConfigError("compute.attention=flash is a TPU kernel (it would run in interpret mode on a "
                          "GPU); use compute.attention=xla")

    def body(q, k, v):
        return flash.causal(q, k, v, platform=platform)

    return jax.shard_map(body, mesh=sharding.current_mesh(), in_specs=(heads,) * 3, out_specs=heads,
                         check_vma=False)(q_BxSxHxZ, k_BxSxJxZ, v_BxSxJxZ)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings.

    With `decode`, keys and values are also written into a "cache" collection at the tokens'
    positions, and queries attend over the whole cache: the cache is sized by the sequence
    length of the call that creates it (the decoder's init). Without either, rows the flash
    kernel takes (`flash_applies`) go through it; the decoder asks for it only where positions
    count up from 0, which is what the kernel's mask assumes.
    """

    config: ModelConfig
    compute: ComputeConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, positions_BxS: jax.Array,
                 segments: Segments | None = None) -> jax.Array:
        cfg = self.config
        dtype, d, z = dtype_of(self.compute.dtype), cfg.d_model, cfg.resolved_head_dim

        def proj(name, heads, axis_name):
            kernel_DxHxZ = self.param(name, param_init(cfg.init_std, ("embed", axis_name, "head_dim")),
                                      (d, heads, z), jnp.float32)
            return jnp.einsum("bsd,dhz->bshz", x_BxSxD, kernel_DxHxZ.astype(dtype))

        q_BxSxHxZ = apply_rope(proj("query", cfg.num_heads, "heads"), positions_BxS, cfg.rope_base)
        k_BxSxJxZ = apply_rope(proj("key", cfg.num_kv_heads, "kv_heads"), positions_BxS, cfg.rope_base)
        v_BxSxJxZ = proj("value", cfg.num_kv_heads, "kv_heads")
        if self.decode:  # Attend over the whole cache: U cached positions.
            k_BxUxJxZ, v_BxUxJxZ, kv_pos_BxU = self._cached(k_BxSxJxZ, v_BxSxJxZ, positions_BxS)
        else:
            k_BxUxJxZ, v_BxUxJxZ, kv_pos_BxU = k_BxSxJxZ, v_BxSxJxZ, positions_BxS
        if self.decode and segments is not None:
            raise ValueError("packed segments and the KV cache do not mix")
        if not self.decode and segments is None and flash_applies(self.compute, x_BxSxD.shape[1]):
            out_BxSxHxZ = flash_attention(q_BxSxHxZ, k_BxUxJxZ, v_BxUxJxZ)
        else:
            out_BxSxHxZ = causal_attention(q_BxSxHxZ, k_BxUxJxZ, v_BxUxJxZ, positions_BxS, kv_pos_BxU,
                                           segments)
        out_HxZxD = self.param("out", param_init(output_init_std(cfg), ("heads", "head_dim", "embed")),
                               (cfg.num_heads, z, d), jnp.float32)
        return jnp.einsum("bshz,hzd->bsd", out_BxSxHxZ, out_HxZxD.astype(dtype))

    def _cached(self, k_BxSxJxZ, v_BxSxJxZ, positions_BxS):
        """Writes this call's keys and values at their positions; returns the whole cache.

        Slots past a sequence's last written position hold stale values, but a query at
        position p only sees slots <= p, and those are written before any query reaches them.
        """
        b = positions_BxS.shape[0]
        cached_k = self.variable("cache", "key", jnp.zeros, k_BxSxJxZ.shape, k_BxSxJxZ.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v_BxSxJxZ.shape, v_BxSxJxZ.dtype)
        rows_Bx1 = jnp.arange(b)[:, None]
        # Split as the model is: rows over the batch axes, KV heads over "tensor" (under a mesh).
        names = ("batch", "seq", "kv_heads", "head_dim")
        cached_k.value = nn.with_logical_constraint(cached_k.value.at[rows_Bx1, positions_BxS].set(k_BxSxJxZ), names)
        cached_v.value = nn.with_logical_constraint(cached_v.value.at[rows_Bx1, positions_BxS].set(v_BxSxJxZ), names)
        size = cached_k.value.shape[1]
        return cached_k.value, cached_v.value, jnp.broadcast_to(jnp.arange(size)[None, :], (b, size))


def output_logits(x_BxSxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
    """The output head's logits, x @ head, accumulated in float32 (the softmax over a large
    vocabulary needs the precision).

    On CPU the gradient is written out. XLA:CPU runs the head's weight gradient as autodiff
    writes it, x^T g contracting the leading (token) axis of both operands, at about a third of
    the speed of the forward matmul of the same size; with the transpose of x made first (D x N,
    small beside the N x V gradient) it runs at full speed. For the studies' model (D = 64,
    8,192 words, 512 tokens) that makes a whole train step 1.33x faster
    (benchmarks/output_head.py). Elsewhere autodiff's own gradient is used."""
    return (_cpu_logits if sharding.platform() == "cpu" else _logits)(x_BxSxD, head_DxV)


def _logits(x_BxSxD, head_DxV):
    return jnp.einsum("bsd,dv->bsv", x_BxSxD, head_DxV, preferred_element_type=jnp.float32)


_cpu_logits = jax.custom_vjp(_logits)


def _cpu_logits_fwd(x_BxSxD, head_DxV):
    return _logits(x_BxSxD, head_DxV), (x_BxSxD, head_DxV)


def _cpu_logits_bwd(residuals, dlogits_BxSxV):
    x_BxSxD, head_DxV = residuals
    dx_BxSxD = jnp.einsum("bsv,dv->bsd", dlogits_BxSxV, head_DxV, preferred_element_type=jnp.float32)
    # The barrier keeps XLA from folding the transpose back into the matmul's dimensions.
    x_DxN = jax.lax.optimization_barrier(x_BxSxD.reshape(-1, x_BxSxD.shape[-1]).T)
    dhead_DxV = jnp.matmul(x_DxN, dlogits_BxSxV.reshape(-1, dlogits_BxSxV.shape[-1]),
                           preferred_element_type=jnp.float32)
    return dx_BxSxD.astype(x_BxSxD.dtype), dhead_DxV.astype(head_DxV.dtype)


_cpu_logits.defvjp(_cpu_logits_fwd, _cpu_logits_bwd)


def swiglu(x, gate, up, down, matmul: Callable = jnp.matmul):
    """down(silu(gate x) * up x), the FFN of every expert: x (..., D) with weights gate and up
    (..., D, F) and down (..., F, D), batched as `matmul` batches (jnp.matmul broadcasts leading
    axes, so x_1xTxD with a pool's P experts gives y_PxTxD; a grouped matmul passes its own).
    The named scopes label the three matmuls in a profile (benchmarks/profile_step.py)."""
    with jax.named_scope("ffn_gate"):
        activated = nn.silu(matmul(x, gate))
    with jax.named_scope("ffn_up"):
        hidden = activated * matmul(x, up)
    with jax.named_scope("ffn_down"):
        return matmul(hidden, down)


class SwiGLU(nn.Module):
    """A dense SwiGLU layer: the shared experts, fused.

    S shared experts of width F are one SwiGLU of width S*F: the sum of their outputs is exactly
    the output of the concatenated MLP.
    """

    config: ModelConfig
    compute: ComputeConfig
    hidden: int

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = dtype_of(self.compute.dtype)

        def weight(name, shape, names, std):
            return self.param(name, param_init(std, names), shape, jnp.float32).astype(dtype)

        d, f = cfg.d_model, self.hidden
        return swiglu(x_BxSxD, weight("gate", (d, f), ("embed", "mlp"), cfg.init_std),
                      weight("up", (d, f), ("embed", "mlp"), cfg.init_std),
                      weight("down", (f, d), ("mlp", "embed"), output_init_std(cfg)))
