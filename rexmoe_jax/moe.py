"""The MoE FFN of one layer: router scores, top-K gating, and dispatch -> experts -> combine.

Shape suffixes: T tokens (batch x sequence, flattened), D model width, P the layer's candidate
pool (r*N experts, or fewer in a smaller last group), K experts chosen per token, F expert width.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul
from rexmoe_jax import losses
from rexmoe_jax.config import ModelConfig
from rexmoe_jax.layers import SwiGLU, dtype_of, param_init


class ExpertWeights(NamedTuple):
    """A pool of SwiGLU experts: expert p computes down_p(silu(gate_p x) * up_p x)."""

    gate_PxDxF: jax.Array
    up_PxDxF: jax.Array
    down_PxFxD: jax.Array


class Routing(NamedTuple):
    gates_TxK: jax.Array  # float32 gate values (the router probabilities of the chosen experts)
    experts_TxK: jax.Array  # int32 pool indices
    probs_TxP: jax.Array  # float32 softmax over the whole pool


class RouterStats(NamedTuple):
    """Per-layer routing statistics, stacked over layers by the scan."""

    load_balance: jax.Array  # Switch loss over the pool; 1.0 for uniform routing
    z_loss: jax.Array
    expert_load_P: jax.Array  # share of the T*K assignments that went to each pool expert


def route(logits_TxP: jax.Array, available_TxP: jax.Array | None, top_k: int,
          renormalize: bool) -> Routing:
    """Eq. 2-3: s = softmax(W h) over the whole pool, PSR-masked experts zeroed, then top-K.

    The gate of a chosen expert is its softmax score, not renormalised over the K (the paper);
    `renormalize` divides by their sum instead. Masked experts get -1 rather than 0 for the
    selection, so that not even a score that underflowed to 0 can tie with them.
    """
    probs_TxP = jax.nn.softmax(logits_TxP.astype(jnp.float32), axis=-1)
    scores_TxP = probs_TxP if available_TxP is None else jnp.where(available_TxP, probs_TxP, -1.0)
    _, experts_TxK = jax.lax.top_k(scores_TxP, top_k)
    gates_TxK = jnp.take_along_axis(probs_TxP, experts_TxK, axis=-1)
    if renormalize:
        gates_TxK = gates_TxK / jnp.sum(gates_TxK, axis=-1, keepdims=True)
    return Routing(gates_TxK, experts_TxK.astype(jnp.int32), probs_TxP)


def _swiglu(x, gate_w, up_w, down_w, matmul):
    return matmul(nn.silu(matmul(x, gate_w)) * matmul(x, up_w), down_w)


def dense_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
    """The reference dispatch: every expert on every token, weighted by the (mostly zero) gates."""
    num_tokens, pool = routing.probs_TxP.shape
    gates_TxP = jnp.zeros((num_tokens, pool), jnp.float32).at[
        jnp.arange(num_tokens)[:, None], routing.experts_TxK].add(routing.gates_TxK)
    h_TxPxF = nn.silu(jnp.einsum("td,pdf->tpf", x_TxD, weights.gate_PxDxF)) * jnp.einsum(
        "td,pdf->tpf", x_TxD, weights.up_PxDxF)
    y_TxPxD = jnp.einsum("tpf,pfd->tpd", h_TxPxF, weights.down_PxFxD)
    return jnp.einsum("tpd,tp->td", y_TxPxD, gates_TxP.astype(y_TxPxD.dtype))


def sorted_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights,
                   implementation: str) -> jax.Array:
    """The dropless dispatch: sort the T*K (token, expert) pairs by expert, gather the tokens,
    run each expert on its contiguous rows with a grouped matmul, gather back and weight."""
    num_tokens, top_k = routing.experts_TxK.shape
    pool = weights.gate_PxDxF.shape[0]
    experts_A = routing.experts_TxK.reshape(-1)  # A = T*K assignments, token-major
    order_A = jnp.argsort(experts_A, stable=True)  # sorted position -> assignment
    group_sizes_P = jnp.bincount(experts_A, length=pool).astype(jnp.int32)
    x_AxD = x_TxD[order_A // top_k]

    def matmul(lhs, rhs):
        return grouped_matmul(lhs, rhs, group_sizes_P, implementation=implementation)

    y_AxD = _swiglu(x_AxD, *weights, matmul)
    inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0]))
    y_TxKxD = y_AxD[inverse_A].reshape(num_tokens, top_k, -1)
    return jnp.einsum("tkd,tk->td", y_TxKxD, routing.gates_TxK.astype(y_TxKxD.dtype))


class MoEFFN(nn.Module):
    """One layer's MoE FFN: its own router over a pool of experts it may share with its group."""

    config: ModelConfig
    pool_size: int

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, weights: ExpertWeights,
                 available_TxP: jax.Array | None) -> tuple[jax.Array, RouterStats]:
        cfg = self.config
        b, s, d = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(b * s, d)
        # Router in float32: top-K and the aux losses are sensitive to bf16 rounding of logits.
        router_DxP = self.param("router", param_init(cfg.init_std, ("embed", "pool")),
                                (d, self.pool_size), jnp.float32)
        logits_TxP = x_TxD.astype(jnp.float32) @ router_DxP
        routing = route(logits_TxP, available_TxP, cfg.top_k, cfg.renormalize_gates)
        # Kept only when applied with mutable=["intermediates"] (routing analysis and tests).
        self.sow("intermediates", "experts", routing.experts_TxK)
        self.sow("intermediates", "gates", routing.gates_TxK)

        dtype = dtype_of(cfg.dtype)
        weights = ExpertWeights(*(w.astype(dtype) for w in weights))
        if cfg.dispatch == "dense":
            y_TxD = dense_experts(x_TxD, routing, weights)
        else:
            y_TxD = sorted_experts(x_TxD, routing, weights, cfg.grouped_matmul)
        y_BxSxD = y_TxD.reshape(b, s, d).astype(dtype)
        if cfg.num_shared_experts:
            # Decision: shared experts stay per layer; only routed experts are pooled.
            y_BxSxD = y_BxSxD + SwiGLU(cfg, cfg.num_shared_experts * cfg.expert_ffn,
                                       name="shared_experts")(x_BxSxD)

        expert_load_P = jnp.bincount(routing.experts_TxK.reshape(-1), length=self.pool_size) / (
            b * s * cfg.top_k)
        stats = RouterStats(
            load_balance=losses.load_balancing_loss(expert_load_P, jnp.mean(routing.probs_TxP, axis=0)),
            z_loss=losses.router_z_loss(logits_TxP),
            expert_load_P=expert_load_P)
        return y_BxSxD, stats
