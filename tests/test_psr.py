"""PSR on device: the traced pool size N_t (Eq. 6) and the masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_reuse import eq6

from rexmoe_jax.config import PSRConfig
from rexmoe_jax.model import psr as psr_lib


@pytest.mark.parametrize("r,n,t_s,t_e", [(2, 8, 10, 30), (4, 64, 10_000, 30_000)])
def test_traced_pool_size_is_eq6(r, n, t_s, t_e):
    """One compilation serves every step, and every step gives Eq. 6 exactly."""
    psr = PSRConfig(schedule="linear", start_step=t_s, end_step=t_e)
    fn = jax.jit(lambda t: psr_lib.pool_size_t(t, psr, n, r * n))
    for t in [0, t_s, t_s + 1, (t_s + t_e) // 2, t_e - 1, t_e, 10 * t_e]:
        assert int(fn(t)) == eq6(t, t_s, t_e, r, n), t


def available(psr, step_key, layer, n_t, pool=16, n=4, tokens=3):
    return np.asarray(psr_lib.available(step_key, jnp.asarray(layer), jnp.asarray(n_t), psr=psr,
                                        pool_size=pool, num_experts=n, reuse_factor=pool // n,
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
    fn = jax.jit(lambda k: psr_lib.available(k, jnp.asarray(0), jnp.asarray(6), psr=psr,
                                             pool_size=16, num_experts=4, reuse_factor=4, num_tokens=1))
    freq = np.mean([np.asarray(fn(jax.random.key(s)))[0] for s in range(2000)], axis=0)
    np.testing.assert_allclose(freq, 6 / 16, atol=0.05)


def test_local_first_and_per_token_masks():
    psr = PSRConfig(schedule="linear", start_step=0, end_step=10, order="local_first", granularity="token")
    key = jax.random.key(5)
    mask = available(psr, key, layer=2, n_t=6, tokens=5)  # layer 2 owns pool ids 8..11
    assert mask.shape == (5, 16) and np.all(mask.sum(-1) == 6)
    assert np.all(mask[:, 8:12])
    assert len({row.tobytes() for row in mask}) > 1  # tokens draw their own masks


def test_token_masks_of_micro_batches_are_the_rows_of_the_whole_batch():
    """Under gradient accumulation, micro-batch i gets rows i*T ... i*T + T - 1 of the masks one
    batch of 2T tokens would draw, so no two micro-batches share their masks."""
    psr = PSRConfig(schedule="linear", start_step=0, end_step=10, granularity="token")
    key = jax.random.key(7)
    whole = available(psr, key, 1, 6, tokens=8)
    parts = [np.asarray(psr_lib.available(key, jnp.asarray(1), jnp.asarray(6), psr=psr, pool_size=16,
                                          num_experts=4, reuse_factor=4, num_tokens=4, micro_batch=i))
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(parts[0], parts[1])


def _largest_array(jaxpr) -> int:
    """Elements of the largest value any equation of `jaxpr` (or of a jaxpr inside it) makes."""
    largest = 0
    for eqn in jaxpr.eqns:
        largest = max([largest] + [int(np.prod(v.aval.shape)) for v in eqn.outvars])
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(inner, "eqns") or hasattr(inner, "jaxpr"):
                    largest = max(largest, _largest_array(getattr(inner, "jaxpr", inner)))
    return largest


def test_a_micro_batch_draws_only_its_own_rows():
    """Micro-batch 3 of T = 32 tokens over a pool of 16 makes no array larger than its own T x P
    masks: it does not draw the rows of the other micro-batches (at scale those were a third of
    a step's HBM traffic)."""
    psr = PSRConfig(schedule="linear", start_step=0, end_step=10, granularity="token")
    jaxpr = jax.make_jaxpr(lambda micro_batch: psr_lib.available(
        jax.random.key(7), jnp.asarray(1), jnp.asarray(6), psr=psr, pool_size=16, num_experts=4,
        reuse_factor=4, num_tokens=32, micro_batch=micro_batch))(3).jaxpr
    assert _largest_array(jaxpr) == 32 * 16
