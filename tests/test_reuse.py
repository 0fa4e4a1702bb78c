"""Groups and pools (Eq. 4), the PSR pool size (Eq. 6) and the PSR masks."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
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
    fn = jax.jit(lambda t: reuse.psr_pool_size(t, psr, n, r * n))
    for t in steps:
        t = max(int(t), 0)
        assert int(fn(t)) == eq6(t, t_s, t_e, r, n), t


def test_linear_pool_size_paper_values():
    """The paper's 2.3B R4 run: N = 64, t_s = 10k, t_e = 30k: 64 before, 160 halfway, 256 after."""
    psr = PSRConfig(schedule="linear", start_step=10_000, end_step=30_000)
    sizes = [int(reuse.psr_pool_size(t, psr, 64, 256)) for t in (0, 10_000, 20_000, 30_000, 47_700)]
    assert sizes == [64, 64, 160, 256, 256]


def test_stepwise_matches_the_paper():
    """64 -> 128 -> 192 -> 256 at steps 10k, 20k and 30k (the paper's stepwise 2.3B run), with
    the t_s = 10k and t_e = 30k of its linear runs."""
    psr = PSRConfig(schedule="stepwise", start_step=10_000, end_step=30_000)
    got = {t: int(reuse.psr_pool_size(t, psr, 64, 256))
           for t in (0, 9_999, 10_000, 19_999, 20_000, 29_999, 30_000, 40_000)}
    assert got == {0: 64, 9_999: 64, 10_000: 128, 19_999: 128, 20_000: 192, 29_999: 192,
                   30_000: 256, 40_000: 256}
    # One rule for every r: the first jump is at t_s. One stage (r = 2): the whole pool at t_s.
    one = PSRConfig(schedule="stepwise", start_step=10, end_step=20)
    assert [int(reuse.psr_pool_size(t, one, 8, 16)) for t in (9, 10, 20)] == [8, 16, 16]
    # Two stages: at t_s and at t_e.
    two = PSRConfig(schedule="stepwise", start_step=10, end_step=20, stages=2)
    assert [int(reuse.psr_pool_size(t, two, 8, 16)) for t in (9, 10, 19, 20)] == [8, 12, 12, 16]


def test_no_schedule_and_initial_pool():
    assert int(reuse.psr_pool_size(0, PSRConfig(), 8, 32)) == 32
    # PSR inside a plain MoE (r = 1): grow from 2 to all 8 experts between steps 0 and 6.
    psr = PSRConfig(schedule="linear", start_step=0, end_step=6, initial_experts=2)
    assert [int(reuse.psr_pool_size(t, psr, 8, 8)) for t in range(8)] == [2, 3, 4, 5, 6, 7, 8, 8]


def available(psr, step_key, layer, n_t, pool=16, n=4, tokens=3):
    return np.asarray(reuse.psr_available(step_key, jnp.asarray(layer), jnp.asarray(n_t), psr=psr,
                                          pool_size=pool, num_experts=n,
                                          own_offset=jnp.asarray((layer % (pool // n)) * n),
                                          num_tokens=tokens))


def test_mask_counts_and_determinism():
    psr = PSRConfig(schedule="linear", start_step=0, end_step=10)
    key = lambda step: jax.random.fold_in(jax.random.key(0), step)
    for n_t in (4, 7, 16):
        mask = available(psr, key(3), 1, n_t)
        assert mask.shape == (1, 16) and mask.sum() == n_t
    np.testing.assert_array_equal(available(psr, key(3), 1, 6), available(psr, key(3), 1, 6))
    assert not np.array_equal(available(psr, key(3), 1, 6), available(psr, key(4), 1, 6))
    assert not np.array_equal(available(psr, key(3), 1, 6), available(psr, key(3), 2, 6))


def test_mask_is_uniform_over_the_pool():
    """Each expert is available in about N_t / P of the steps."""
    psr = PSRConfig(schedule="linear", start_step=0, end_step=10)
    fn = jax.jit(lambda k: reuse.psr_available(k, jnp.asarray(0), jnp.asarray(6), psr=psr,
                                                pool_size=16, num_experts=4, own_offset=jnp.asarray(0),
                                                num_tokens=1))
    freq = np.mean([np.asarray(fn(jax.random.key(s)))[0] for s in range(2000)], axis=0)
    np.testing.assert_allclose(freq, 6 / 16, atol=0.05)


def test_local_first_and_per_token_masks():
    psr = PSRConfig(schedule="linear", start_step=0, end_step=10, order="local_first", granularity="token")
    key = jax.random.key(5)
    mask = available(psr, key, layer=2, n_t=6, tokens=5)  # layer 2 owns pool ids 8..11
    assert mask.shape == (5, 16) and np.all(mask.sum(-1) == 6)
    assert np.all(mask[:, 8:12])
    assert len({row.tobytes() for row in mask}) > 1  # tokens draw their own masks
