"""Routing and dispatch as plain functions of arrays: gating (Eq. 2-3), the dense oracle, the
sort-based dropless path (permute -> grouped SwiGLU -> combine), the capacity path, and the
places where `compute.dispatch` is read: `compute_for` (the settings a purpose runs with) and
`choose_path` (the path those settings name).

Shape letters: the glossary in rexmoe_jax/model/__init__.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import token_permute
from pallas_kernels.grouped_matmul import alignment, blocked, grouped_matmul, resolve
from rexmoe_jax import sharding
from rexmoe_jax.config import ComputeConfig, ConfigError
from rexmoe_jax.model.layers import swiglu


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
          renormalize: bool, bias_P: jax.Array | None = None) -> Routing:
    """Eq. 2-3: s = softmax(W h) over the whole pool, PSR-masked experts excluded, then top-K.

    The gate of a chosen expert is its softmax score, not renormalised over the K (the paper);
    `renormalize` divides by their sum instead. Masked experts score -inf for the selection, so
    that not even a score that underflowed to 0 can tie with them.
    `bias_P` (model.router_bias, auxiliary-loss-free balancing) is added to the logits for the
    selection only: the gates stay the unbiased scores. Decision: on the logits, not on the
    probabilities as DeepSeek-V3 adds it to its sigmoid scores: a softmax score shrinks as PSR
    widens the pool, a logit shift multiplies it by exp(bias) at any pool size.
    """
    with jax.named_scope("router"):  # Named scopes label the parts in a profile.
        probs_TxP = jax.nn.softmax(logits_TxP.astype(jnp.float32), axis=-1)
    scores_TxP = probs_TxP
    if bias_P is not None:
        scores_TxP = logits_TxP.astype(jnp.float32) + jax.lax.stop_gradient(bias_P)[None, :]
    with jax.named_scope("psr_mask"):
        if available_TxP is not None:
            scores_TxP = jnp.where(available_TxP, scores_TxP, -jnp.inf)
    with jax.named_scope("top_k"):
        _, experts_TxK = jax.lax.top_k(scores_TxP, top_k)
        gates_TxK = jnp.take_along_axis(probs_TxP, experts_TxK, axis=-1)
        if renormalize:
            gates_TxK = gates_TxK / jnp.sum(gates_TxK, axis=-1, keepdims=True)
    return Routing(gates_TxK, experts_TxK.astype(jnp.int32), probs_TxP)


def dense_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
    """The reference dispatch: every expert on every token, weighted by the (mostly zero) gates."""
    num_tokens, pool = routing.experts_TxK.shape[0], weights.gate_PxDxF.shape[0]
    gates_TxP = jnp.zeros((num_tokens, pool), jnp.float32).at[
        jnp.arange(num_tokens)[:, None], routing.experts_TxK].add(routing.gates_TxK)
    y_PxTxD = swiglu(x_TxD[None], *weights)
    return jnp.einsum("ptd,tp->td", y_PxTxD, gates_TxP.astype(y_PxTxD.dtype))


def gathered_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
    """Each token's K experts applied with their weights gathered per token: reads T*K experts'
    weights whatever the pool size, so it is the path for a handful of tokens (a decode step),
    where grouped matmuls pay per expert of the pool."""
    e_TxK = routing.experts_TxK
    y_TxKx1xD = swiglu(x_TxD[:, None, None, :], *(w[e_TxK] for w in weights))
    return jnp.einsum("tkd,tk->td", y_TxKx1xD[:, :, 0], routing.gates_TxK.astype(y_TxKx1xD.dtype))


def kernel_aligned(weights: ExpertWeights, compute: ComputeConfig) -> ExpertWeights:
    """The pool with the expert width F zero-padded to what the grouped matmul wants (tokamax:
    multiples of 64; 744 -> 768 at the 2.3B shape), done once per group and step instead of in
    each of the matmuls of every layer that shares the pool. Exact: the padded columns of gate
    and up give silu(0) * 0 = 0, which the padded rows of down multiply; their gradients are
    sliced away by the pad's transpose."""
    pad = -weights.gate_PxDxF.shape[-1] % alignment(compute.grouped_matmul, sharding.platform())
    if compute.dispatch != "sort" or not pad:
        return weights
    return ExpertWeights(jnp.pad(weights.gate_PxDxF, ((0, 0), (0, 0), (0, pad))),
                         jnp.pad(weights.up_PxDxF, ((0, 0), (0, 0), (0, pad))),
                         jnp.pad(weights.down_PxFxD, ((0, 0), (0, pad), (0, 0))))


def grouped_swiglu(x_AxD: jax.Array, group_sizes_P: jax.Array, weights: ExpertWeights,
                   implementation: str) -> jax.Array:
    """Rows sorted by expert, group_sizes_P rows per expert, through their experts' SwiGLU.
    Rows past sum(group_sizes) come out as zeros. The blocked implementation runs the whole
    expert in one loop (blocked.swiglu); the others make three grouped matmuls."""
    platform = sharding.platform()
    if resolve(implementation, platform) == "blocked":
        with jax.named_scope("expert_ffn"):  # Named scopes label the parts in a profile.
            return blocked.swiglu(x_AxD, *weights, group_sizes_P)

    def matmul(lhs, rhs):
        return grouped_matmul(lhs, rhs, group_sizes_P, implementation=implementation, platform=platform)

    return swiglu(x_AxD, *weights, matmul=matmul)


def sorted_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights, implementation: str,
                   permute_implementation: str = "xla", reduce_rows=None) -> jax.Array:
    """The dropless dispatch: sort the T*K (token, expert) assignments by expert, gather the
    tokens (permute), run each expert on its contiguous rows with a grouped matmul, gather the
    rows back and weight them by the gates (combine). `reduce_rows` (e.g. a psum over a tensor
    axis that split the expert width) is applied to the expert outputs before the combine."""
    top_k = routing.experts_TxK.shape[1]
    with jax.named_scope("sort"):
        experts_A = routing.experts_TxK.reshape(-1)  # A = T*K assignments, token-major
        order_A = jnp.argsort(experts_A, stable=True).astype(jnp.int32)  # sorted position -> assignment
        inverse_A = token_permute.inverse_permutation(order_A)
        group_sizes_P = jnp.bincount(experts_A, length=weights.gate_PxDxF.shape[0]).astype(jnp.int32)
    with jax.named_scope("permute"):
        x_AxD = token_permute.permute(x_TxD, order_A, inverse_A, top_k, implementation=permute_implementation,
                                      platform=sharding.platform())
    y_AxD = grouped_swiglu(x_AxD, group_sizes_P, weights, implementation)
    if reduce_rows is not None:
        y_AxD = reduce_rows(y_AxD)
    with jax.named_scope("combine"):
        return token_permute.combine(y_AxD, order_A, inverse_A, routing.gates_TxK,
                                     implementation=permute_implementation, platform=sharding.platform())


class Slots(NamedTuple):
    """T*K assignments bucketed into fixed-size slots: bucket e holds slots e*C ... e*C + C - 1."""

    order_A: jax.Array  # assignments sorted by bucket (stable)
    slot_A: jax.Array  # sorted assignment -> its slot (meaningful where kept)
    kept_A: jax.Array  # sorted assignment fits in its bucket's C slots
    source_Y: jax.Array  # slot -> the assignment it holds (meaningful where filled)
    filled_Y: jax.Array


def bucket_slots(bucket_A: jax.Array, num_buckets: int, capacity: int) -> Slots:
    """Assigns each assignment a slot in its bucket, first come (in assignment order) first
    served; assignments past a bucket's `capacity` are dropped."""
    assignments = bucket_A.shape[0]
    order_A = jnp.argsort(bucket_A, stable=True)
    bucket_sorted_A = bucket_A[order_A]
    counts_E = jnp.bincount(bucket_A, length=num_buckets)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_A = jnp.arange(assignments) - starts_E[bucket_sorted_A]
    kept_A = rank_A < capacity
    slot_A = jnp.where(kept_A, bucket_sorted_A * capacity + jnp.minimum(rank_A, capacity - 1), 0)
    slot_Y = jnp.arange(num_buckets * capacity)
    bucket_Y, c_Y = slot_Y // capacity, slot_Y % capacity
    filled_Y = c_Y < counts_E[bucket_Y]
    source_Y = order_A[jnp.minimum(starts_E[bucket_Y] + c_Y, assignments - 1)]
    return Slots(order_A, slot_A, kept_A, source_Y, filled_Y)


def gather_from_slots(y_YxD: jax.Array, slots: Slots, gates_TxK: jax.Array) -> jax.Array:
    """The combine after a slotted dispatch: each kept assignment's row, weighted by its gate
    and summed over the token's K choices; dropped assignments add nothing."""
    t, k = gates_TxK.shape
    y_sorted_AxD = jnp.where(slots.kept_A[:, None], y_YxD[slots.slot_A], 0)
    inverse_A = token_permute.inverse_permutation(slots.order_A)
    y_TxKxD = y_sorted_AxD[inverse_A].reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))


def capacity(num_assignments: int, num_buckets: int, capacity_factor: float, live_share: float = 1.0) -> int:
    """Slots per bucket: the factor times the even share of the assignments over the live part
    of the buckets (under PSR only N_t of the pool can be chosen: with live_share = N / pool the
    buckets are sized for the smallest live pool); factor 0 means every assignment fits."""
    if capacity_factor <= 0:
        return num_assignments
    even = num_assignments / (num_buckets * live_share)
    return max(1, min(num_assignments, math.ceil(capacity_factor * even)))


def capacity_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights,
                     capacity_factor: float, live_share: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The capacity dispatch: each expert gets C = capacity_factor * T*K / P row slots, filled
    in token order, and one batched einsum runs every expert on its slots (no raggedness, so
    the fastest matmul at small expert widths). Assignments past C are dropped; returns the
    outputs and the share of dropped assignments. `live_share`: see `capacity`."""
    t, k = routing.experts_TxK.shape
    pool = weights.gate_PxDxF.shape[0]
    c = capacity(t * k, pool, capacity_factor, live_share)
    slots = bucket_slots(routing.experts_TxK.reshape(-1), pool, c)
    x_PxCxD = jnp.where(slots.filled_Y[:, None], x_TxD[slots.source_Y // k], 0).reshape(pool, c, -1)
    y_YxD = swiglu(x_PxCxD, *weights).reshape(pool * c, -1)
    dropped = jnp.mean((~slots.kept_A).astype(jnp.float32))
    return gather_from_slots(y_YxD, slots, routing.gates_TxK), dropped


# A dispatch path: (x_TxD, routing, weights, reduce_rows) -> (y_TxD, share of assignments dropped).
Path = Callable[[jax.Array, Routing, ExpertWeights, Callable], tuple[jax.Array, jax.Array]]


class Choice(NamedTuple):
    path: Path
    sharded: bool  # runs on each device's own tokens inside shard_map (else on the whole arrays)
    exchange: str  # with an expert axis: "ragged" (exact rows) or "fixed" (equal buffers)
    permute: str  # the token permute's implementation (compute.permute, "auto" as the chip allows)


Purpose = Literal["train", "score", "decode"]


def compute_for(compute: ComputeConfig, purpose: Purpose) -> ComputeConfig:
    """The compute settings a model runs with for `purpose`. Training and evaluation: as
    configured. Scoring and a generation's prompt pass: dropless, since a drop depends on what
    else is in the batch (a score or a continuation would depend on its neighbours): "sort"
    instead of "capacity" (the same experts, none dropped) and no cap on the slots an expert
    device receives in the "fixed" exchange (capacity_factor 0). Decoding one token per
    sequence: "gather", whose K experts' weights cost the same for any pool size, where grouped
    matmuls pay per pool expert (benchmarks/inference.py); it drops nothing."""
    if purpose == "decode":
        return dataclasses.replace(compute, dispatch="gather", capacity_factor=0.0)
    if purpose == "score":
        dispatch = "sort" if compute.dispatch == "capacity" else compute.dispatch
        return dataclasses.replace(compute, dispatch=dispatch, capacity_factor=0.0)
    return compute


def choose_path(compute: ComputeConfig, live_share: float) -> Choice:
    """Where `compute.dispatch` and `compute.expert_exchange` are read (with `compute_for`): the
    path, whether it runs on each device's own tokens inside shard_map ("sort", "capacity": on
    every mesh, a one-device one included) or on the whole arrays ("dense", "gather": they read
    every expert's weights), how tokens travel between devices of an expert axis, and how they
    are permuted. "capacity" on an expert axis caps what each expert device receives, which is
    the "fixed" exchange's cap (the "ragged" one sends every row; ComputeConfig refuses both)."""
    grouped = compute.dispatch in ("sort", "capacity")  # the paths that run grouped matmuls
    if grouped and compute.grouped_matmul == "tokamax" and sharding.platform() == "tpu":
        raise ConfigError("compute.grouped_matmul=tokamax does not compile on TPU inside the MoE layer's "
                          "shard_map (tokamax leaves its outputs' manual axes unset); use auto (blocked) "
                          "or ragged_dot")
    exchange = compute.expert_exchange
    if exchange == "auto":  # the CPU's ragged_all_to_all is an emulation that moves E times more
        exchange = "fixed" if sharding.platform() == "cpu" or compute.dispatch == "capacity" else "ragged"
    permute = compute.permute
    if permute == "auto" and not token_permute.pallas_supported(sharding.device()):
        permute = "xla"  # a TPU before v5e or a GPU before Hopper
    if compute.dispatch == "capacity":
        def path(x_TxD, routing, weights, reduce_rows):
            y_TxD, dropped = capacity_experts(x_TxD, routing, weights, compute.capacity_factor, live_share)
            return reduce_rows(y_TxD), dropped
        return Choice(path, True, exchange, permute)
    if compute.dispatch == "sort":
        def path(x_TxD, routing, weights, reduce_rows):
            return sorted_experts(x_TxD, routing, weights, compute.grouped_matmul, permute,
                                  reduce_rows), jnp.zeros((), jnp.float32)
        return Choice(path, True, exchange, permute)
    whole = {"dense": dense_experts, "gather": gathered_experts}[compute.dispatch]
    def path(x_TxD, routing, weights, reduce_rows):
        return whole(x_TxD, routing, weights), jnp.zeros((), jnp.float32)
    return Choice(path, False, exchange, permute)
