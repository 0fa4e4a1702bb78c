"""Expert parallelism: the MoE dispatch inside shard_map, tokens sent to their experts' devices
and back, against the unsharded dispatch (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax import sharding
from rexmoe_jax.config import ComputeConfig, MeshConfig
from rexmoe_jax.model import collectives, dispatch, expert_parallel

SORT = dispatch.choose_path(ComputeConfig(dispatch="sort", grouped_matmul="ragged_dot"), live_share=1.0).path


def expert_parallel_case(capacity_factor, seed=0):
    rng = np.random.default_rng(seed)
    t, d, f, pool, k = 64, 8, 6, 8, 2
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    weights = dispatch.ExpertWeights(*(jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)
                                       for s in [(pool, d, f), (pool, d, f), (pool, f, d)]))
    # Skewed routing so that some devices receive more than their even share.
    logits = jnp.asarray(rng.standard_normal((t, pool)) + 2.0 * (np.arange(pool) < 3), jnp.float32)
    routing = dispatch.route(logits, None, k, False)
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))

    def run(x, weights, gates, fn):
        with sharding.activate(mesh):
            return jax.jit(jax.value_and_grad(
                lambda x, w, g: jnp.sum(fn(x, routing._replace(gates_TxK=g), w)[0] * jnp.cos(jnp.arange(t * d).reshape(t, d))),
                argnums=(0, 1, 2), has_aux=False))(x, weights, gates)

    return x, weights, routing, run


@pytest.mark.parametrize("exchange", ["fixed", "ragged"])
def test_expert_parallel_equals_unsharded_values_and_gradients(exchange):
    """Both exchanges, dropless (the fixed one with capacity_factor=0), under skewed routing:
    outputs and the gradients of inputs, weights and gates match the one-device dispatch."""
    x, weights, routing, run = expert_parallel_case(capacity_factor=0)
    sharded = run(x, weights, routing.gates_TxK, lambda x, r, w: expert_parallel.sharded_experts(
        x, r, w, SORT, exchange=exchange, implementation="ragged_dot", capacity_factor=0))
    plain = run(x, weights, routing.gates_TxK, lambda x, r, w: (dispatch.sorted_experts(x, r, w, "ragged_dot"),))
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_auto_exchange_is_fixed_on_cpu():
    assert dispatch.choose_path(ComputeConfig(), 1.0).exchange == "fixed"
    assert dispatch.choose_path(ComputeConfig(expert_exchange="ragged"), 1.0).exchange == "ragged"


def test_capacity_drops_exactly_the_overflow():
    """With C slots per destination, a device keeps, for each destination device, its first C
    assignments in token order; the rest contribute nothing. Simulated in NumPy."""
    x, weights, routing, _ = expert_parallel_case(capacity_factor=1.0)
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
    with sharding.activate(mesh):
        y, dropped = jax.jit(lambda x, r, w: expert_parallel.sharded_experts(
            x, r, w, SORT, exchange="fixed", implementation="ragged_dot", capacity_factor=1.0))(x, routing, weights)
    experts = np.asarray(routing.experts_TxK)
    keep = np.zeros(experts.shape, bool)
    t_local, k, per_device = 8, 2, 2  # 64 tokens over 8 batch shards; pool 8 over 4 devices
    capacity = int(np.ceil(1.0 * t_local * k / 4))
    for shard in range(8):
        rows = range(shard * t_local, (shard + 1) * t_local)
        used = {}
        for t, j in ((t, j) for t in rows for j in range(k)):  # assignment (token-major) order
            dest = experts[t, j] // per_device
            used[dest] = used.get(dest, 0) + 1
            keep[t, j] = used[dest] <= capacity
    kept_gates = jnp.where(jnp.asarray(keep), routing.gates_TxK, 0.0)
    expected = dispatch.sorted_experts(x, routing._replace(gates_TxK=kept_gates), weights, "ragged_dot")
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert float(dropped) == pytest.approx((~keep).mean()) and 0 < float(dropped) < 0.5


def test_the_native_ragged_exchange_lowers_with_its_gradient(monkeypatch):
    """XLA:CPU cannot compile jax.lax.ragged_all_to_all, but the program GPU and TPU run can be
    lowered here: values and gradients through the exchange, with the op in it four times
    (out and back, and their transposes)."""
    monkeypatch.setattr(collectives, "resolve", lambda implementation: "native")
    x, weights, routing, _ = expert_parallel_case(capacity_factor=0)
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))

    def loss(x, w, gates):
        y, _ = expert_parallel.sharded_experts(x, routing._replace(gates_TxK=gates), w, SORT, exchange="ragged",
                                               implementation="ragged_dot", capacity_factor=0)
        return jnp.sum(y)

    with sharding.activate(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, weights, routing.gates_TxK).as_text()
    assert text.count("ragged_all_to_all") == 4
