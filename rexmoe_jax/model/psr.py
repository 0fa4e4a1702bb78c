"""Progressive Scaling Routing on device: the pool size N_t of a training step (Eq. 6, from the
integer schedule in reuse.py) and the random masks that leave N_t pool experts available."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rexmoe_jax import reuse
from rexmoe_jax.config import PSRConfig


def pool_size_t(step: jax.Array, psr: PSRConfig, num_experts: int, pool_size: int) -> jax.Array:
    """Eq. 6, N_t at optimizer step t (see reuse.psr_schedule); traced, so it never recompiles."""
    thresholds, sizes = reuse.psr_schedule(psr, num_experts, pool_size)
    index = jnp.searchsorted(jnp.asarray(thresholds, jnp.int32), jnp.asarray(step, jnp.int32), side="right")
    return jnp.asarray(sizes, jnp.int32)[index]


def available(key: jax.Array, layer_id: jax.Array, pool_size_t: jax.Array, *, psr: PSRConfig,
              pool_size: int, num_experts: int, reuse_factor: int, num_tokens: int,
              micro_batch: jax.Array | int = 0) -> jax.Array:
    """Which pool experts a layer may select this step: bool (1 or T, P), N_t of them True.

    Decision (granularity): one mask per (seed, step, layer); `key` is already folded with
    (seed, step) and the layer id is folded in here, so every replica and every restart draws
    the same mask. `psr.granularity="token"` draws one mask per token instead, keyed by the
    token's row in the step's whole batch (micro-batch `micro_batch` holds rows
    micro_batch * T ... + T - 1), so gradient accumulation sees the masks one big batch would;
    each micro-batch draws only its own T rows (rows are independent of one another, so the
    partitioner is free to split them over devices with the batch).
    Decision (which experts): uniform over the pool (the paper); "local_first" ranks the layer's
    own N experts first so they stay available whenever N_t >= N.
    """
    key = jax.random.fold_in(key, layer_id)
    if psr.granularity == "token":
        rows = micro_batch * num_tokens + jnp.arange(num_tokens)
        priority = jax.vmap(lambda row: jax.random.uniform(jax.random.fold_in(key, row), (pool_size,)))(rows)
    else:
        priority = jax.random.uniform(key, (1, pool_size))
    if psr.order == "local_first":
        own_P = reuse.own_experts(layer_id, pool_size, reuse_factor, num_experts)
        priority = priority + jnp.where(own_P, 0.0, 1.0)[None, :]
    # Rank of each expert by priority; the N_t lowest ranks are available.
    ranks = jnp.argsort(jnp.argsort(priority, axis=-1), axis=-1)
    return ranks < pool_size_t
