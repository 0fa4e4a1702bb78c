"""Groups and pools (Eq. 4), own experts, and the PSR schedule (Eq. 6) as integers."""

import bisect
import math
from fractions import Fraction

import numpy as np
import pytest

from rexmoe_jax import reuse
from rexmoe_jax.config import ModelConfig, PSRConfig


@pytest.mark.parametrize("num_layers,r", [(4, 1), (4, 2), (6, 3), (8, 4), (5, 2), (7, 3), (32, 3), (5, 5)])
def test_layer_pools(num_layers, r):
    """Layer l pools the experts of layers floor(l/r)*r ... min(that + r, L) - 1 (written out
    independently here); a smaller last group when r does not divide L."""
    n = 4
    for layer in range(num_layers):
        first = (layer // r) * r
        members = [m for m in range(num_layers) if first <= m < first + r]
        expected = [m * n + e for m in members for e in range(n)]
        assert list(reuse.layer_pool(layer, num_layers, r, n)) == expected
    cfg = ModelConfig(num_layers=num_layers, reuse=r, num_experts=n, top_k=2)
    ids = np.concatenate([np.asarray(b).ravel() for b in reuse.group_layer_ids(cfg)])
    np.testing.assert_array_equal(ids, np.arange(num_layers))
    assert sum(cfg.group_sizes) == num_layers and cfg.num_groups == math.ceil(num_layers / r)


def test_the_paper_7b_layout():
    """32 layers at r = 3: ten groups of 3 and a last group of 2 (Sec. 2 decision)."""
    cfg = ModelConfig(num_layers=32, reuse=3, num_experts=64, top_k=6)
    assert cfg.group_sizes == (3,) * 10 + (2,)
    assert list(reuse.layer_pool(31, 32, 3, 64)) == list(range(30 * 64, 32 * 64))


def pool_size(t, psr, n, pool):
    """N_t read off reuse.psr_schedule's thresholds."""
    thresholds, sizes = reuse.psr_schedule(psr, n, pool)
    return sizes[bisect.bisect_right(thresholds, t)]


def test_own_experts_and_initial_pool():
    """Layer l owns pool ids (l mod r) N ... (l mod r) N + N - 1, written out by hand for r = 3."""
    own = reuse.own_experts(np.arange(4), 9, 3, 3)
    expected = np.zeros((4, 9), bool)
    for layer, first in zip(range(4), (0, 3, 6, 0)):
        expected[layer, first:first + 3] = True
    np.testing.assert_array_equal(own, expected)
    assert reuse.initial_pool(0, 8, 32) == 8 and reuse.initial_pool(2, 8, 32) == 2
    assert reuse.initial_pool(0, 8, 4) == 4  # never above a smaller last group's pool


def eq6(t, t_s, t_e, r, n):
    """Eq. 6 in exact rational arithmetic."""
    if t <= t_s:
        return n
    if t > t_e:
        return r * n
    return math.floor((1 + (r - 1) * Fraction(t - t_s, t_e - t_s)) * n)


@pytest.mark.parametrize("r,n,t_s,t_e", [(2, 8, 10, 30), (4, 64, 10_000, 30_000), (3, 6, 0, 7),
                                         (4, 32, 100, 1_000_003)])
def test_linear_pool_size_is_eq6(r, n, t_s, t_e):
    psr = PSRConfig(schedule="linear", start_step=t_s, end_step=t_e)
    mid = (t_s + t_e) // 2
    steps = [0, t_s - 1, t_s, t_s + 1, mid, mid + 1, t_e - 1, t_e, t_e + 1, 10 * t_e]
    steps += list(np.random.default_rng(0).integers(t_s, t_e + 1, 50))
    for t in steps:
        t = max(int(t), 0)
        assert pool_size(t, psr, n, r * n) == eq6(t, t_s, t_e, r, n), t


def test_linear_pool_size_paper_values():
    """The paper's 2.3B R4 run: N = 64, t_s = 10k, t_e = 30k: 64 before, 160 halfway, 256 after."""
    psr = PSRConfig(schedule="linear", start_step=10_000, end_step=30_000)
    sizes = [pool_size(t, psr, 64, 256) for t in (0, 10_000, 20_000, 30_000, 47_700)]
    assert sizes == [64, 64, 160, 256, 256]


def test_stepwise_matches_the_paper():
    """64 -> 128 -> 192 -> 256 at steps 10k, 20k and 30k (the paper's stepwise 2.3B run), with
    the t_s = 10k and t_e = 30k of its linear runs."""
    psr = PSRConfig(schedule="stepwise", start_step=10_000, end_step=30_000)
    got = {t: pool_size(t, psr, 64, 256)
           for t in (0, 9_999, 10_000, 19_999, 20_000, 29_999, 30_000, 40_000)}
    assert got == {0: 64, 9_999: 64, 10_000: 128, 19_999: 128, 20_000: 192, 29_999: 192,
                   30_000: 256, 40_000: 256}
    # One rule for every r: the first jump is at t_s. One stage (r = 2): the whole pool at t_s.
    one = PSRConfig(schedule="stepwise", start_step=10, end_step=20)
    assert [pool_size(t, one, 8, 16) for t in (9, 10, 20)] == [8, 16, 16]
    # Two stages: at t_s and at t_e.
    two = PSRConfig(schedule="stepwise", start_step=10, end_step=20, stages=2)
    assert [pool_size(t, two, 8, 16) for t in (9, 10, 19, 20)] == [8, 12, 12, 16]


def test_no_schedule_and_initial_pool():
    assert pool_size(0, PSRConfig(), 8, 32) == 32
    # PSR inside a plain MoE (r = 1): grow from 2 to all 8 experts between steps 0 and 6.
    psr = PSRConfig(schedule="linear", start_step=0, end_step=6, initial_experts=2)
    assert [pool_size(t, psr, 8, 8) for t in range(8)] == [2, 3, 4, 5, 6, 7, 8, 8]
