"""Routing and dispatch as plain functions of arrays: gating (Eq. 2-3), the dense oracle, and the
sort-based dropless path (permute -> grouped SwiGLU -> combine).

Shape suffixes: T tokens (batch x sequence, flattened), D model width, P a pool of experts,
K experts chosen per token, A = T*K assignments, F expert width.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul


class ExpertWeights(NamedTuple):
    """A pool of SwiGLU experts: expert p computes down_p(silu(gate_p x) * up_p x)."""

    gate_PxDxF: jax.Array
    up_PxDxF: jax.Array
    down_PxFxD: jax.Array


class Routing(NamedTuple):
    gates_TxK: jax.Array  # float32 gate values (the router probabilities of the chosen experts)
    experts_TxK: jax.Array  # int32 pool indices
    probs_TxP: jax.Array  # float32 softmax over the whole pool


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


def dense_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
    """The reference dispatch: every expert on every token, weighted by the (mostly zero) gates."""
    num_tokens, pool = routing.probs_TxP.shape
    gates_TxP = jnp.zeros((num_tokens, pool), jnp.float32).at[
        jnp.arange(num_tokens)[:, None], routing.experts_TxK].add(routing.gates_TxK)
    h_TxPxF = nn.silu(jnp.einsum("td,pdf->tpf", x_TxD, weights.gate_PxDxF)) * jnp.einsum(
        "td,pdf->tpf", x_TxD, weights.up_PxDxF)
    y_TxPxD = jnp.einsum("tpf,pfd->tpd", h_TxPxF, weights.down_PxFxD)
    return jnp.einsum("tpd,tp->td", y_TxPxD, gates_TxP.astype(y_TxPxD.dtype))


def grouped_swiglu(x_AxD: jax.Array, group_sizes_P: jax.Array, weights: ExpertWeights,
                   implementation: str) -> jax.Array:
    """Rows sorted by expert, group_sizes_P rows per expert, through their experts' SwiGLU.
    Rows past sum(group_sizes) come out as zeros."""
    def matmul(lhs, rhs):
        return grouped_matmul(lhs, rhs, group_sizes_P, implementation=implementation)

    return matmul(nn.silu(matmul(x_AxD, weights.gate_PxDxF)) * matmul(x_AxD, weights.up_PxDxF),
                  weights.down_PxFxD)


def inverse_permutation(order_A: jax.Array) -> jax.Array:
    return jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0], dtype=order_A.dtype))


def sorted_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights,
                   implementation: str) -> jax.Array:
    """The dropless dispatch: sort the T*K (token, expert) assignments by expert, gather the
    tokens (permute), run each expert on its contiguous rows with a grouped matmul, gather the
    rows back and weight them by the gates (combine)."""
    num_tokens, top_k = routing.experts_TxK.shape
    experts_A = routing.experts_TxK.reshape(-1)  # A = T*K assignments, token-major
    order_A = jnp.argsort(experts_A, stable=True)  # sorted position -> assignment
    group_sizes_P = jnp.bincount(experts_A, length=weights.gate_PxDxF.shape[0]).astype(jnp.int32)
    y_AxD = grouped_swiglu(x_TxD[order_A // top_k], group_sizes_P, weights, implementation)
    y_TxKxD = y_AxD[inverse_permutation(order_A)].reshape(num_tokens, top_k, -1)
    return jnp.einsum("tkd,tk->td", y_TxKxD, routing.gates_TxK.astype(y_TxKxD.dtype))
