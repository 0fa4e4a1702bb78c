"""Cross-layer expert reuse: groups and pools (Eq. 4), each layer's own experts, and the PSR
pool-size schedule (Eq. 6) as exact integers.

This is the only module that knows about r, and the one home of these facts; it imports no jax
(the config validates with it before jax is loaded) and not the config (which uses it): the
functions that take a config section say which fields they read (the Protocols below).
`model/psr.py` turns the schedule into traced values and masks. Everything else sees "a layer
routes over a pool of P experts"; with r = 1 the pool is the layer's own N experts and this is
the baseline MoE.

Pool layout: in a group of r layers, pool index p = j * N + e is expert e of the group's j-th
layer. A layer's "own" experts are therefore the slice [j*N, (j+1)*N) of its group's pool.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ModelConfig(Protocol):
    """The fields of config.ModelConfig read here."""

    num_layers: int
    num_experts: int
    reuse: int


class PSRConfig(Protocol):
    """The fields of config.PSRConfig read here."""

    schedule: str
    start_step: int
    end_step: int
    stages: int
    initial_experts: int


def group_sizes(num_layers: int, reuse: int) -> tuple[int, ...]:
    """Layers per group (Eq. 4, fixed groups of r consecutive layers).

    Decision (L % r != 0): the last group is smaller and pools only its own layers' experts.
    """
    full, rest = divmod(num_layers, reuse)
    return (reuse,) * full + ((rest,) if rest else ())


def layer_group(layer: int, reuse: int) -> int:
    """Eq. 4 (with the reviewers' correction): 0-based layer l belongs to group l // r."""
    return layer // reuse


def layer_pool(layer: int, num_layers: int, reuse: int, num_experts: int) -> range:
    """Global ids (layer * N + e) of the experts layer `layer` may route to."""
    first = layer_group(layer, reuse) * reuse
    last = min(first + reuse, num_layers)
    return range(first * num_experts, last * num_experts)


def layer_pool_sizes(config: ModelConfig) -> np.ndarray:
    """The pool size of every layer, (L,): r*N, or less in a smaller last group."""
    return np.asarray([size * config.num_experts for size in group_sizes(config.num_layers, config.reuse)
                       for _ in range(size)])


def group_layer_ids(config: ModelConfig) -> list[np.ndarray]:
    """Per run of equal-size groups, the 0-based layer ids as int32 (groups, layers per group):
    one block of full groups, then the smaller last group if there is one."""
    sizes = group_sizes(config.num_layers, config.reuse)
    blocks, first = [], 0
    for size in sorted(set(sizes), key=sizes.index):
        count = sizes.count(size)
        blocks.append(np.arange(first, first + count * size, dtype=np.int32).reshape(count, size))
        first += count * size
    return blocks


def own_experts(layers, pool_size: int, reuse: int, num_experts: int):
    """bool (..., P): which experts of its group's pool each of `layers` owns (layer l owns pool
    ids j N ... j N + N - 1, j = l mod r). Works on NumPy and on traced jax arrays alike."""
    first = (layers % reuse * num_experts)[..., None]
    ids_P = np.arange(pool_size)
    return (ids_P >= first) & (ids_P < first + num_experts)


def initial_pool(initial_experts: int, num_experts: int, pool_size: int) -> int:
    """N_t up to t_s: `psr.initial_experts`, where 0 means N (the paper), never above the pool."""
    return min(initial_experts or num_experts, pool_size)


def psr_schedule(psr: PSRConfig, num_experts: int, pool_size: int) -> tuple[list[int], list[int]]:
    """Eq. 6 as integers: (thresholds, sizes) with N_t = sizes[number of thresholds <= t].

    linear:   N_t = N for t <= t_s; floor((1 + (r-1)(t - t_s)/(t_e - t_s)) N) up to t_e; r N after.
    stepwise: the same growth in `stages` equal jumps at the steps linspace(t_s, t_e, stages)
              (rounded up): the first jump is always at t_s, and with two or more the last is at
              t_e (default r - 1 jumps of N experts: with the paper's t_s = 10k and t_e = 30k at
              r = 4, its stepwise run's 64 -> 128 -> 192 -> 256 at steps 10k, 20k and 30k; at
              r = 2, the one jump at t_s).
    `psr.initial_experts` replaces N as the starting size (below N it grows the pool of a plain
    MoE, the reviewers' question).
    Decision (smaller last group, L % r != 0): its pool grows from N to its own size over the
    same [t_s, t_e], so every group reaches its full pool at t_e (linear; a stepwise group with a
    single stage, e.g. 2 layers, jumps to it at t_s).

    Python integers make floor() exact at every step (a float32 ramp can land a hair under an
    integer and lose an expert).
    """
    start = initial_pool(psr.initial_experts, num_experts, pool_size)
    if psr.schedule == "none" or start == pool_size:
        return [], [pool_size]
    span, grow = psr.end_step - psr.start_step, pool_size - start
    if psr.schedule == "linear":
        # start + floor(grow (t - t_s) / span) >= start + k  <=>  t >= t_s + ceil(k span / grow).
        return ([psr.start_step + -(-k * span // grow) for k in range(1, grow + 1)],
                list(range(start, pool_size + 1)))
    stages = psr.stages or max(1, grow // num_experts)
    return ([psr.start_step + -(-i * span // max(stages - 1, 1)) for i in range(stages)],
            [start + grow * i // stages for i in range(stages + 1)])
