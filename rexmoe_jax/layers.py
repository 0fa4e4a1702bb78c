"""The dense parts of a decoder layer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Shape suffixes: B batch, S query positions, T key positions, D model width, H query heads,
V key/value heads, G query heads per key/value head, K head width, F hidden width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rexmoe_jax.config import ModelConfig


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


def apply_rope(x_BxSxHxK: jax.Array, positions_BxS: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (rotate-half convention), computed in float32."""
    half = x_BxSxHxK.shape[-1] // 2
    inv_freq_K2 = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxSxK2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq_K2[None, None, :]
    sin = jnp.sin(angles_BxSxK2)[:, :, None, :]
    cos = jnp.cos(angles_BxSxK2)[:, :, None, :]
    x32 = x_BxSxHxK.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BxSxHxK.dtype)


def causal_attention(q_BxSxHxK: jax.Array, k_BxTxVxK: jax.Array, v_BxTxVxK: jax.Array,
                     q_pos_BxS: jax.Array, kv_pos_BxT: jax.Array) -> jax.Array:
    """Softmax attention where a query sees the keys at positions <= its own.

    Masking by positions rather than by index lets the same function serve a KV cache.
    Query heads are grouped over key/value heads (GQA) without repeating the keys.
    """
    b, s, h, k = q_BxSxHxK.shape
    v_heads = k_BxTxVxK.shape[2]
    q_BxSxVxGxK = q_BxSxHxK.reshape(b, s, v_heads, h // v_heads, k)
    logits_BxVxGxSxT = jnp.einsum("bsvgk,btvk->bvgst", q_BxSxVxGxK, k_BxTxVxK,
                                  preferred_element_type=jnp.float32) * k ** -0.5
    visible_BxSxT = q_pos_BxS[:, :, None] >= kv_pos_BxT[:, None, :]
    logits_BxVxGxSxT = jnp.where(visible_BxSxT[:, None, None], logits_BxVxGxSxT,
                                 jnp.finfo(jnp.float32).min)
    probs_BxVxGxSxT = jax.nn.softmax(logits_BxVxGxSxT, axis=-1).astype(v_BxTxVxK.dtype)
    out_BxSxVxGxK = jnp.einsum("bvgst,btvk->bsvgk", probs_BxVxGxSxT, v_BxTxVxK)
    return out_BxSxVxGxK.reshape(b, s, h, k)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings.

    With `decode`, keys and values are also written into a "cache" collection at the tokens'
    positions, and queries attend over the whole cache: the cache is sized by the sequence
    length of the call that creates it (the decoder's init).
    """

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, positions_BxS: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, d, k = dtype_of(cfg.dtype), cfg.d_model, cfg.resolved_head_dim

        def proj(name, heads, axis_name):
            kernel_DxHxK = self.param(name, param_init(cfg.init_std, ("embed", axis_name, "head_dim")),
                                      (d, heads, k), jnp.float32)
            return jnp.einsum("bsd,dhk->bshk", x_BxSxD, kernel_DxHxK.astype(dtype))

        q_BxSxHxK = apply_rope(proj("query", cfg.num_heads, "heads"), positions_BxS, cfg.rope_base)
        k_BxSxVxK = apply_rope(proj("key", cfg.num_kv_heads, "kv_heads"), positions_BxS, cfg.rope_base)
        v_BxSxVxK = proj("value", cfg.num_kv_heads, "kv_heads")
        if self.decode:
            k_BxSxVxK, v_BxSxVxK, kv_pos_BxS = self._cached(k_BxSxVxK, v_BxSxVxK, positions_BxS)
        else:
            kv_pos_BxS = positions_BxS
        out_BxSxHxK = causal_attention(q_BxSxHxK, k_BxSxVxK, v_BxSxVxK, positions_BxS, kv_pos_BxS)
        out_HxKxD = self.param("out", param_init(output_init_std(cfg), ("heads", "head_dim", "embed")),
                               (cfg.num_heads, k, d), jnp.float32)
        return jnp.einsum("bshk,hkd->bsd", out_BxSxHxK, out_HxKxD.astype(dtype))

    def _cached(self, k_BxSxVxK, v_BxSxVxK, positions_BxS):
        """Writes this call's keys and values at their positions; returns the whole cache.

        Slots past a sequence's last written position hold stale values, but a query at
        position p only sees slots <= p, and those are written before any query reaches them.
        """
        b = positions_BxS.shape[0]
        cached_k = self.variable("cache", "key", jnp.zeros, k_BxSxVxK.shape, k_BxSxVxK.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v_BxSxVxK.shape, v_BxSxVxK.dtype)
        rows_Bx1 = jnp.arange(b)[:, None]
        cached_k.value = cached_k.value.at[rows_Bx1, positions_BxS].set(k_BxSxVxK)
        cached_v.value = cached_v.value.at[rows_Bx1, positions_BxS].set(v_BxSxVxK)
        size = cached_k.value.shape[1]
        return cached_k.value, cached_v.value, jnp.broadcast_to(jnp.arange(size)[None, :], (b, size))


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x): the FFN of every expert, and of the shared experts fused.

    S shared experts of width F are one SwiGLU of width S*F: the sum of their outputs is exactly
    the output of the concatenated MLP.
    """

    config: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = dtype_of(cfg.dtype)

        def weight(name, shape, names, std):
            return self.param(name, param_init(std, names), shape, jnp.float32).astype(dtype)

        d, f = cfg.d_model, self.hidden
        gate_BxSxF = x_BxSxD @ weight("gate", (d, f), ("embed", "mlp"), cfg.init_std)
        up_BxSxF = x_BxSxD @ weight("up", (d, f), ("embed", "mlp"), cfg.init_std)
        return (nn.silu(gate_BxSxF) * up_BxSxF) @ weight("down", (f, d), ("mlp", "embed"), output_init_std(cfg))
