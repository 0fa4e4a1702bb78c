"""Gating (Eq. 2-3) and the dispatch paths: sorted, capacity and gather against the dense oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax.model import dispatch


def numpy_gating(logits, available, k, renormalize):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    masked = np.where(available, probs, 0.0)  # "scores set to zero" (Sec. 3)
    chosen = np.argsort(-masked, axis=-1, kind="stable")[:, :k]
    gates = np.take_along_axis(probs, chosen, -1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdims=True)
    return gates, chosen


@pytest.mark.parametrize("renormalize", [False, True])
def test_gating_is_eq2_eq3(renormalize, maybe_jit):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 12)).astype(np.float32)
    avail = rng.random((32, 12)) < 0.6
    avail[:, :3] = True  # at least K available per token
    routing = maybe_jit(dispatch.route, static_argnums=(2, 3))(jnp.asarray(logits), jnp.asarray(avail), 3,
                                                          renormalize)
    gates, chosen = numpy_gating(logits.astype(np.float64), avail, 3, renormalize)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.experts_TxK), -1), np.sort(chosen, -1))
    order = np.argsort(np.asarray(routing.experts_TxK), -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(routing.gates_TxK), order, -1),
                               np.take_along_axis(gates, np.argsort(chosen, -1), -1), rtol=1e-5)
    if not renormalize:  # Gates are the softmax over the whole pool: they sum to < 1.
        assert np.all(np.asarray(routing.gates_TxK).sum(-1) < 1)


def test_masked_expert_is_never_selected():
    """Even when the masked experts hold almost all the probability, or underflow to zero."""
    logits = np.full((4, 8), -200.0, np.float32)
    logits[:, :4] = 50.0  # experts 0..3 dominate
    avail = np.zeros((4, 8), bool)
    avail[:, 4:] = True  # ... but only 4..7 are available
    routing = dispatch.route(jnp.asarray(logits), jnp.asarray(avail), 2, False)
    assert np.all(np.asarray(routing.experts_TxK) >= 4)


def random_problem(tokens, d, f, pool, k, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (tokens, d), dtype)
    weights = dispatch.ExpertWeights(*(0.3 * jax.random.normal(kk, shape, dtype) for kk, shape in zip(
        keys[1:4], [(pool, d, f), (pool, d, f), (pool, f, d)])))
    # Some experts get no tokens: logits favour the first half of the pool.
    logits = jax.random.normal(keys[4], (tokens, pool)) + 3.0 * (jnp.arange(pool) < pool // 2)[None, :]
    return x, weights, dispatch.route(logits, None, k, False)


@pytest.mark.parametrize("implementation", ["ragged_dot", "blocked"])
@pytest.mark.parametrize("tokens,pool,k", [(24, 8, 2), (13, 6, 1), (40, 16, 4)])
def test_sorted_dispatch_equals_dense_values_and_gradients(implementation, tokens, pool, k):
    x, weights, routing = random_problem(tokens, 16, 8, pool, k, jnp.float32, seed=tokens)

    def out(fn):
        def loss(x, weights, gates):
            y = fn(x, routing._replace(gates_TxK=gates), weights)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weights, routing.gates_TxK)

    dense_value, dense_grads = out(dispatch.dense_experts)
    sort_value, sort_grads = out(lambda x, r, w: dispatch.sorted_experts(x, r, w, implementation))
    np.testing.assert_allclose(sort_value, dense_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sort_grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("permute", ["xla", "pallas", "reference"])
def test_sorted_dispatch_with_each_permute_equals_dense(permute):
    x, weights, routing = random_problem(19, 16, 8, 6, 2, jnp.float32, seed=3)

    def loss(fn):
        return jax.value_and_grad(lambda x, w, g: jnp.sum(
            fn(x, routing._replace(gates_TxK=g), w) ** 2), argnums=(0, 1, 2))(x, weights, routing.gates_TxK)

    value, grads = loss(lambda x, r, w: dispatch.sorted_experts(x, r, w, "blocked", permute))
    dense_value, dense_grads = loss(dispatch.dense_experts)
    np.testing.assert_allclose(value, dense_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_capacity_dispatch_drops_exactly_the_overflow():
    """Each expert keeps its first C assignments in token order (C = ceil(f T K / P)); with
    f = 0 nothing is dropped and the result is the dense oracle's."""
    x, weights, routing = random_problem(24, 8, 6, 8, 2, jnp.float32, seed=4)
    exact, none_dropped = dispatch.capacity_experts(x, routing, weights, 0.0)
    np.testing.assert_allclose(exact, dispatch.dense_experts(x, routing, weights), rtol=1e-5, atol=1e-6)
    assert float(none_dropped) == 0.0

    experts = np.asarray(routing.experts_TxK)
    capacity = int(np.ceil(1.0 * 24 * 2 / 8))
    keep, used = np.zeros(experts.shape, bool), {}
    for t in range(24):
        for j in range(2):
            used[experts[t, j]] = used.get(experts[t, j], 0) + 1
            keep[t, j] = used[experts[t, j]] <= capacity
    y, dropped = jax.jit(dispatch.capacity_experts, static_argnums=3)(x, routing, weights, 1.0)
    expected = dispatch.dense_experts(x, routing._replace(gates_TxK=jnp.where(keep, routing.gates_TxK, 0)), weights)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert float(dropped) == pytest.approx((~keep).mean()) and float(dropped) > 0


def test_gather_dispatch_equals_dense_values_and_gradients():
    x, weights, routing = random_problem(11, 8, 6, 8, 2, jnp.float32, seed=5)

    def loss(fn):
        return jax.value_and_grad(lambda x, w, g: jnp.sum(
            fn(x, routing._replace(gates_TxK=g), w) ** 2), argnums=(0, 1, 2))(x, weights, routing.gates_TxK)

    value, grads = loss(dispatch.gathered_experts)
    dense_value, dense_grads = loss(dispatch.dense_experts)
    np.testing.assert_allclose(value, dense_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_capacity_is_spread_over_the_live_experts():
    """With PSR only N of the P = 4N experts can be chosen: capacity sized for the live ones
    (live_share = 1/4) drops nothing where sizing for the whole pool drops most."""
    x, weights, _ = random_problem(32, 8, 6, 8, 2, jnp.float32, seed=6)
    logits = jax.random.normal(jax.random.key(6), (32, 8))
    available = jnp.broadcast_to(jnp.arange(8) < 2, (32, 8))  # 2 live experts of 8
    routing = dispatch.route(logits, available, 2, False)
    _, dropped_pool = dispatch.capacity_experts(x, routing, weights, 1.0)
    y, dropped_live = dispatch.capacity_experts(x, routing, weights, 1.0, live_share=2 / 8)
    assert float(dropped_pool) > 0.5 and float(dropped_live) == 0.0
    np.testing.assert_allclose(y, dispatch.dense_experts(x, routing, weights), rtol=1e-5, atol=1e-6)


def test_kernel_aligned_pool_is_exact_in_values_and_gradients():
    """Padding F to tokamax's 64 once per group changes nothing: same outputs, and the gradients
    of the unpadded weights are those of the padded pool's real part."""
    from rexmoe_jax.config import ComputeConfig

    x, weights, routing = random_problem(20, 16, 24, 6, 2, jnp.float32, seed=3)
    tokamax = ComputeConfig(grouped_matmul="tokamax")
    assert dispatch.kernel_aligned(weights, tokamax).gate_PxDxF.shape == (6, 16, 64)
    assert dispatch.kernel_aligned(weights, ComputeConfig(grouped_matmul="blocked")) is weights

    def loss(weights, aligned):
        w = dispatch.kernel_aligned(weights, tokamax) if aligned else weights
        y = dispatch.sorted_experts(x, routing, w, "reference")
        return jnp.sum(y * jnp.sin(jnp.arange(y.size).reshape(y.shape)))

    (plain, g_plain), (padded, g_padded) = (jax.value_and_grad(loss)(weights, a) for a in (False, True))
    np.testing.assert_allclose(padded, plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_padded), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
