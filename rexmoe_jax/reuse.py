"""Cross-layer expert reuse: groups and pools (Eq. 4), PSR pool size (Eq. 6) and PSR masks.

This is the only module that knows about r. Everything else sees "a layer routes over a pool
of P experts"; with r = 1 the pool is the layer's own N experts and this is the baseline MoE.

Pool layout: in a group of r layers, pool index p = j * N + e is expert e of the group's j-th
layer. A layer's "own" experts are therefore the slice [j*N, (j+1)*N) of its group's pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax.config import ModelConfig, PSRConfig


def layer_group(layer: int, reuse: int) -> int:
    """Eq. 4 (with the reviewers' correction): 0-based layer l belongs to group l // r."""
    return layer // reuse


def layer_pool(layer: int, num_layers: int, reuse: int, num_experts: int) -> range:
    """Global ids (layer * N + e) of the experts layer `layer` may route to.

    Decision (L % r != 0): the last group is smaller and pools only its own layers' experts.
    """
    first = layer_group(layer, reuse) * reuse
    last = min(first + reuse, num_layers)
    return range(first * num_experts, last * num_experts)


def own_offset(layer, reuse: int, num_experts: int):
    """Where layer `layer`'s own N experts start in its group's pool (works on arrays too)."""
    return (layer % reuse) * num_experts


def layer_pool_sizes(config: ModelConfig) -> np.ndarray:
    """The pool size of every layer, (L,): r*N, or less in a smaller last group."""
    return np.asarray([len(layer_pool(layer, config.num_layers, config.reuse, config.num_experts))
                       for layer in range(config.num_layers)])


def group_layer_ids(config: ModelConfig) -> list[jax.Array]:
    """Per group-size block, the 0-based layer ids as an int array of shape (groups, size)."""
    full, rest = divmod(config.num_layers, config.reuse)
    blocks = []
    if full:
        blocks.append(jnp.arange(full * config.reuse, dtype=jnp.int32).reshape(full, config.reuse))
    if rest:
        blocks.append(jnp.arange(full * config.reuse, config.num_layers, dtype=jnp.int32)[None])
    return blocks


def _psr_thresholds(psr: PSRConfig, start: int, num_experts: int, pool_size: int) -> tuple[list[int], list[int]]:
    """The steps at which N_t changes and its value from each on: N_t = sizes[#thresholds <= t].

    Computed with Python integers, so floor() in Eq. 6 is exact at every step (a float32 ramp
    can land a hair under an integer and lose an expert).
    """
    span, grow = psr.end_step - psr.start_step, pool_size - start
    if psr.schedule == "linear":
        # start + floor(grow (t - t_s) / span) >= start + k  <=>  t >= t_s + ceil(k span / grow).
        thresholds = [psr.start_step + -(-k * span // grow) for k in range(1, grow + 1)]
        sizes = list(range(start, pool_size + 1))
    else:  # stepwise: S jumps at linspace(t_s, t_e, S): the first always at t_s, the last at t_e.
        stages = psr.stages or max(1, grow // num_experts)
        thresholds = [psr.start_step + -(-i * span // max(stages - 1, 1)) for i in range(stages)]
        sizes = [start + grow * i // stages for i in range(stages + 1)]
    return thresholds, sizes


def psr_pool_size(step: jax.Array, psr: PSRConfig, num_experts: int, pool_size: int) -> jax.Array:
    """Eq. 6, the PSR pool size N_t at optimizer step t (traced, so it never recompiles).

    linear:   N_t = N for t <= t_s; floor((1 + (r-1)(t - t_s)/(t_e - t_s)) N) up to t_e; r N after.
    stepwise: the same growth in `stages` equal jumps at the steps linspace(t_s, t_e, stages)
              (rounded up): the first jump is always at t_s, and with two or more the last is at
              t_e (default r - 1 jumps of N experts: with the paper's t_s = 10k and t_e = 30k at
              r = 4, its stepwise run's 64 -> 128 -> 192 -> 256 at steps 10k, 20k and 30k; at
              r = 2, the one jump at t_s).
    `psr.initial_experts` replaces N as the starting size (N by default; below N it grows the pool
    of a plain MoE, the reviewers' question).
    Decision (smaller last group, L % r != 0): its pool grows from N to its own size over the
    same [t_s, t_e], so every group reaches its full pool at t_e.
    """
    start = min(psr.initial_experts or num_experts, pool_size)
    if psr.schedule == "none" or start == pool_size:
        return jnp.asarray(pool_size, jnp.int32)
    thresholds, sizes = _psr_thresholds(psr, start, num_experts, pool_size)
    index = jnp.searchsorted(jnp.asarray(thresholds, jnp.int32), jnp.asarray(step, jnp.int32),
                             side="right")
    return jnp.asarray(sizes, jnp.int32)[index]


def psr_available(key: jax.Array, layer_id: jax.Array, pool_size_t: jax.Array, *,
                  psr: PSRConfig, pool_size: int, num_experts: int, own_offset: jax.Array,
                  num_tokens: int) -> jax.Array:
    """Which pool experts a layer may select this step: bool (1 or T, pool_size), N_t of them True.

    Decision (granularity): one mask per (seed, step, layer); `key` is already folded with
    (seed, step) and the layer id is folded in here, so every replica and every restart draws
    the same mask. `psr.granularity="token"` draws one mask per token instead.
    Decision (which experts): uniform over the pool (the paper); "local_first" ranks the layer's
    own N experts first so they stay available whenever N_t >= N.
    """
    key = jax.random.fold_in(key, layer_id)
    rows = num_tokens if psr.granularity == "token" else 1
    priority = jax.random.uniform(key, (rows, pool_size))
    if psr.order == "local_first":
        ids_1xP = jnp.arange(pool_size)[None, :]
        own_1xP = (ids_1xP >= own_offset) & (ids_1xP < own_offset + num_experts)
        priority = priority + jnp.where(own_1xP, 0.0, 1.0)
    # Rank of each expert by priority; the N_t lowest ranks are available.
    ranks = jnp.argsort(jnp.argsort(priority, axis=-1), axis=-1)
    return ranks < pool_size_t
