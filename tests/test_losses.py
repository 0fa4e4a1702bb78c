"""Cross-entropy, the load-balancing loss (over the experts PSR leaves available) and the z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax.model import losses


def test_load_balancing_loss_is_one_for_uniform_routing():
    pool = 16
    uniform_logits = jnp.zeros((5, pool))
    assert float(losses.load_balancing_loss(jnp.full((pool,), 1 / pool), uniform_logits)) == pytest.approx(1.0)
    # All assignments and (nearly) all probability on one expert: the loss is P.
    onehot = jnp.zeros((pool,)).at[3].set(1.0)
    peaked = jnp.zeros((5, pool)).at[:, 3].set(60.0)
    assert float(losses.load_balancing_loss(onehot, peaked)) == pytest.approx(pool)


def numpy_balance(load, logits, available):
    """n * sum_i f_i p_i with p the softmax over each token's available experts, n = N_t."""
    z = np.where(available, logits, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return available.sum(-1).mean() * np.sum(load * p.mean(0))


def test_load_balancing_loss_under_a_mask_counts_only_available_experts():
    rng = np.random.default_rng(1)
    tokens, pool, live = 12, 8, 5
    logits = rng.standard_normal((tokens, pool)).astype(np.float32)
    available = np.zeros((tokens, pool), bool)
    for row in available:
        row[rng.permutation(pool)[:live]] = True
    load = rng.random(pool) * available.any(0)
    load = (load / load.sum()).astype(np.float32)
    value, grad = jax.value_and_grad(losses.load_balancing_loss, argnums=1)(
        jnp.asarray(load), jnp.asarray(logits), jnp.asarray(available))
    assert float(value) == pytest.approx(numpy_balance(load, logits.astype(np.float64), available), rel=1e-5)
    # Masked logits get no gradient from this loss; available ones do.
    assert np.all(np.asarray(grad)[~available] == 0)
    assert np.all(np.abs(np.asarray(grad)[available]) > 0)
    # Uniform loads and router over the N_t available experts score 1, as over a full pool.
    same_mask = np.repeat(available[:1], tokens, 0)
    uniform = losses.load_balancing_loss(jnp.asarray(same_mask[0] / live, jnp.float32),
                                         jnp.zeros((tokens, pool)), jnp.asarray(same_mask))
    assert float(uniform) == pytest.approx(1.0, rel=1e-6)


def test_load_balancing_loss_over_the_pool_pushes_masked_logits_up():
    """The other reading (psr.balance_over=pool): masked experts have no load but get gradient."""
    logits = jnp.zeros((4, 6))
    available = jnp.asarray([[True] * 3 + [False] * 3] * 4)
    load = jnp.asarray([0.5, 0.25, 0.25, 0, 0, 0])
    grad = jax.grad(losses.load_balancing_loss, argnums=1)(load, logits, available, "pool")
    assert np.all(np.asarray(grad)[:, 3:] < 0)  # descending the loss raises them


def test_router_z_loss_by_hand():
    logits = np.array([[0.0, 0.0], [1.0, 2.0]], np.float32)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(losses.router_z_loss(jnp.asarray(logits))) == pytest.approx(np.mean(lse ** 2), rel=1e-6)


def test_cross_entropy_by_hand():
    logits = np.array([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]], np.float32)
    targets = np.array([[1, 2]])
    nll = [np.log(np.exp(logits[0, 0]).sum()) - 2.0, np.log(3.0)]
    assert float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(
        np.mean(nll), rel=1e-6)
    mask = jnp.asarray([[True, False]])
    assert float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), mask)) == pytest.approx(
        nll[0], rel=1e-6)
