"""MoEFFN, one layer's MoE FFN, against a plain top-K MoE layer written in NumPy: r = 1 is that
layer over its own N experts; r > 1 is the same layer over its group's pool of r*N."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax.config import ComputeConfig, ModelConfig
from rexmoe_jax.model.dispatch import ExpertWeights
from rexmoe_jax.model.moe import MoEFFN

N, K, D, F = 4, 2, 8, 6


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_moe_layer(x, router, gate, up, down, available=None):
    """softmax router, top-K gates (not renormalised), SwiGLU experts, in float64.

    `available` (T, P) or (1, P), PSR's mask: masked experts cannot be chosen, and the Switch
    loss counts only the available ones (n = N_t, p the softmax over them; loss.balance_over
    "available")."""
    logits = x @ router
    probs = softmax(logits)
    available = np.ones_like(probs, bool) if available is None else np.broadcast_to(available, probs.shape)
    chosen = np.argsort(-np.where(available, probs, -1.0), axis=-1, kind="stable")[:, :K]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e in chosen[t]:
            h = x[t] @ gate[e]
            y[t] += probs[t, e] * ((h / (1 + np.exp(-h))) * (x[t] @ up[e])) @ down[e]
    load = np.bincount(chosen.ravel(), minlength=router.shape[1]) / chosen.size
    probs_available = softmax(np.where(available, logits, -np.inf))
    balance = available.sum(-1).mean() * np.sum(load * probs_available.mean(0))
    return y, chosen, load, balance


@pytest.mark.parametrize("reuse", [1, 3])
@pytest.mark.parametrize("dispatch", ["dense", "sort"])
def test_moe_ffn_is_a_top_k_moe_over_its_pool(reuse, dispatch):
    pool = reuse * N
    cfg = ModelConfig(d_model=D, expert_ffn=F, num_experts=N, top_k=K, num_layers=reuse, reuse=reuse)
    layer = MoEFFN(cfg, ComputeConfig(dispatch=dispatch), pool_size=pool, live_experts=pool)
    rng = np.random.default_rng(reuse)
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    weights = ExpertWeights(*(0.5 * rng.standard_normal(shape).astype(np.float32)
                              for shape in [(pool, D, F), (pool, D, F), (pool, F, D)]))
    router = rng.standard_normal((D, pool)).astype(np.float32)
    router[:, N:] += 0.5  # favour the experts a layer does not own: r > 1 must route to them
    params = {"router": router}

    (y, stats), state = jax.jit(lambda p: layer.apply({"params": p}, jnp.asarray(x), weights, None,
                                                      mutable=["intermediates"]))(params)
    want_y, want_chosen, want_load, want_balance = numpy_moe_layer(
        x.reshape(-1, D).astype(np.float64), router.astype(np.float64), *(np.float64(w) for w in weights))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want_y, rtol=2e-4, atol=2e-5)
    chosen = np.asarray(state["intermediates"]["experts"][0])
    np.testing.assert_array_equal(np.sort(chosen, -1), np.sort(want_chosen, -1))
    np.testing.assert_allclose(np.asarray(stats.expert_load_P), want_load, rtol=1e-6)
    assert float(stats.load_balance) == pytest.approx(want_balance, rel=1e-5)
    if reuse > 1:
        assert chosen.max() >= N  # routes over the pool, beyond its own N experts
    assert nn.meta.unbox(layer.init(jax.random.key(0), jnp.asarray(x), weights, None))["params"][
        "router"].shape == (D, pool)


@pytest.mark.parametrize("granularity", ["layer", "token"])
def test_masked_moe_ffn_against_numpy(granularity):
    """Under a PSR mask the layer is the NumPy top-K MoE over the available experts, and its
    Switch loss is taken over them alone (a layer that passed no mask to the loss would compute
    it over the whole pool and fail here)."""
    reuse, pool = 3, 3 * N
    cfg = ModelConfig(d_model=D, expert_ffn=F, num_experts=N, top_k=K, num_layers=reuse, reuse=reuse)
    layer = MoEFFN(cfg, ComputeConfig(dispatch="sort"), pool_size=pool, live_experts=5)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, D)).astype(np.float32)
    weights = ExpertWeights(*(0.5 * rng.standard_normal(shape).astype(np.float32)
                              for shape in [(pool, D, F), (pool, D, F), (pool, F, D)]))
    router = rng.standard_normal((D, pool)).astype(np.float32)
    rows = 1 if granularity == "layer" else 12
    available = np.zeros((rows, pool), bool)
    for row in available:
        row[rng.permutation(pool)[:5]] = True  # N_t = 5 of 12

    (y, stats), state = jax.jit(lambda p, a: layer.apply({"params": p}, jnp.asarray(x), weights, a,
                                                         mutable=["intermediates"]))(
        {"router": router}, jnp.asarray(available))
    want_y, want_chosen, want_load, want_balance = numpy_moe_layer(
        x.reshape(-1, D).astype(np.float64), router.astype(np.float64), *(np.float64(w) for w in weights),
        available=available)
    chosen = np.asarray(state["intermediates"]["experts"][0])
    np.testing.assert_array_equal(np.sort(chosen, -1), np.sort(want_chosen, -1))
    assert np.all(np.take_along_axis(np.broadcast_to(available, (12, pool)), chosen, -1))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want_y, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(stats.expert_load_P), want_load, rtol=1e-6)
    assert float(stats.load_balance) == pytest.approx(want_balance, rel=1e-5)
    np.testing.assert_allclose(np.asarray(stats.available_P), available.mean(0), rtol=1e-6)
