"""MoEFFN, one layer's MoE FFN, against a plain top-K MoE layer written in NumPy: r = 1 is that
layer over its own N experts; r > 1 is the same layer over its group's pool of r*N."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax.config import ComputeConfig, ModelConfig
from rexmoe_jax.dispatch import ExpertWeights
from rexmoe_jax.moe import MoEFFN

N, K, D, F = 4, 2, 8, 6


def numpy_moe_layer(x, router, gate, up, down):
    """softmax router, top-K gates (not renormalised), SwiGLU experts, in float64."""
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e in chosen[t]:
            h = x[t] @ gate[e]
            y[t] += probs[t, e] * ((h / (1 + np.exp(-h))) * (x[t] @ up[e])) @ down[e]
    load = np.bincount(chosen.ravel(), minlength=router.shape[1]) / chosen.size
    balance = router.shape[1] * np.sum(load * probs.mean(0))
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
