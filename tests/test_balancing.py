"""Auxiliary-loss-free balancing: the bias step by hand, gates untouched by the bias, the
trainer's update outside the optimizer, and a skewed router balanced faster with the bias."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax import trainer
from rexmoe_jax.config import ComputeConfig, Config, ModelConfig, apply_overrides
from rexmoe_jax.model import balancing
from rexmoe_jax.model.dispatch import ExpertWeights
from rexmoe_jax.model.moe import MoEFFN
from rexmoe_jax.optimizer import make_optimizer


def test_bias_step_signs_and_centring_by_hand():
    r = 0.01
    load = np.array([[0.5, 0.25, 0.25, 0.0, 0.0, 0.0],    # N_t = 4: mean load 1/4
                     [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]], np.float32)  # all 6: mean load 1/6
    available = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    # Layer 0: signs -1, 0, 0, +1 over the available four (sum 0: nothing to centre); the two
    # masked experts do not move. Layer 1: signs -1, -1, +1, +1, +1, +1 sum to 2, so every
    # step is lowered by 2 r / 6.
    want = np.array([[-r, 0, 0, r, 0, 0],
                     [-r - r / 3, -r - r / 3, r - r / 3, r - r / 3, r - r / 3, r - r / 3]])
    got = np.asarray(balancing.bias_step(jnp.asarray(load), jnp.asarray(available), r))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_bias_step_under_token_masks_moves_only_experts_some_token_could_choose():
    """Per-token masks give availability shares; an expert no token could choose keeps its bias,
    and the available experts' biases keep their sum."""
    rng = np.random.default_rng(0)
    available = rng.random((3, 8)).astype(np.float32)
    available[:, [2, 5]] = 0
    load = rng.random((3, 8)).astype(np.float32) * (available > 0)
    load /= load.sum(-1, keepdims=True)
    step = np.asarray(balancing.bias_step(jnp.asarray(load), jnp.asarray(available), 0.1))
    assert np.all(step[:, [2, 5]] == 0)
    np.testing.assert_allclose(step.sum(-1), 0, atol=1e-6)
    assert np.all(step[available > 0] != 0)


N, K, D, F, P = 4, 2, 8, 6, 8


def _layer_and_inputs(router_bias):
    cfg = ModelConfig(d_model=D, expert_ffn=F, num_experts=N, top_k=K, num_layers=2, reuse=2,
                      router_bias=router_bias)
    layer = MoEFFN(cfg, ComputeConfig(dispatch="sort"), pool_size=P, live_experts=P)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, D)).astype(np.float32)
    weights = ExpertWeights(*(0.5 * rng.standard_normal(shape).astype(np.float32)
                              for shape in [(P, D, F), (P, D, F), (P, F, D)]))
    router = rng.standard_normal((D, P)).astype(np.float32)
    return layer, x, weights, router


def _apply(layer, params, x, weights):
    return jax.jit(lambda p: layer.apply({"params": p}, jnp.asarray(x), weights, None,
                                         mutable=["intermediates"]))(params)


def test_the_bias_changes_the_choice_never_the_gates():
    """Chosen: the top K of logits + bias (NumPy); gates: their unbiased softmax scores. A zero
    bias routes exactly as no bias."""
    layer, x, weights, router = _layer_and_inputs(True)
    bias = np.array([3.0, -3.0, 0, 0, 0, 0, 2.0, 0], np.float32)
    (_, _), state = _apply(layer, {"router": router, "router_bias": bias}, x, weights)
    logits = x.reshape(-1, D).astype(np.float64) @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.sort(np.argsort(-(logits + bias), axis=-1, kind="stable")[:, :K], -1)
    chosen = np.asarray(state["intermediates"]["experts"][0])
    np.testing.assert_array_equal(np.sort(chosen, -1), want)
    assert not np.array_equal(want, np.sort(np.argsort(-logits, axis=-1)[:, :K], -1))  # the bias mattered
    np.testing.assert_allclose(np.asarray(state["intermediates"]["gates"][0]),
                               np.take_along_axis(probs, chosen, -1), rtol=1e-5)

    (y0, _), s0 = _apply(layer, {"router": router, "router_bias": np.zeros(P, np.float32)}, x, weights)
    plain, _, _, _ = _layer_and_inputs(False)
    (y1, _), s1 = _apply(plain, {"router": router}, x, weights)
    np.testing.assert_array_equal(np.asarray(s0["intermediates"]["experts"][0]),
                                  np.asarray(s1["intermediates"]["experts"][0]))
    np.testing.assert_array_equal(np.asarray(s0["intermediates"]["gates"][0]),
                                  np.asarray(s1["intermediates"]["gates"][0]))
    np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), rtol=1e-6, atol=1e-7)


SMALL = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=3", "model.num_heads=2",
         "model.num_kv_heads=1", "model.expert_ffn=16", "model.num_experts=4", "model.top_k=2",
         "model.reuse=2", "data.seq_len=16", "data.batch_size=8", "train.steps=40",
         "optim.warmup_steps=2", "loss.load_balance=0"]


def _setup(*extra):
    cfg = apply_overrides(Config(), SMALL + list(extra))
    model = trainer.build_model(cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    return cfg, trainer.init_state(cfg, model, tx), jax.jit(trainer.make_train_step(cfg, model, tx))


def test_bias_is_a_router_shaped_parameter_of_every_layer():
    """(groups, layers, pool) beside each router, with the router's logical axes for the pool:
    L = 3 at r = 2 gives one group of two and a last group of one."""
    cfg = apply_overrides(Config(), SMALL + ["model.router_bias=true"])
    boxed = jax.eval_shape(lambda: trainer.build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    for block, shape in (("groups", (1, 2, 8)), ("last_group", (1, 1, 4))):
        moe = boxed["params"][block]["layers"]["moe"]
        assert moe["router_bias"].value.shape == shape
        assert moe["router_bias"].names == moe["router"].names[:2] + moe["router"].names[3:]


@pytest.mark.e2e
def test_the_trainer_moves_the_bias_by_hand_outside_the_optimizer():
    """After one step (no PSR: every expert available) each layer's bias is
    rate * (sign(1/P - load) centred), from the step's loads; no weight decay or Adam touches it."""
    cfg, state, step_fn = _setup("model.router_bias=true", "loss.router_bias_rate=0.125", "optim.weight_decay=0.5")
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
    new, metrics = step_fn(state, tokens)
    load = np.asarray(metrics["expert_load"], np.float64)  # (L, 8); the last layer's pool is 4
    pools = [8, 8, 4]
    bias = np.asarray(balancing.router_bias(new.params, cfg.model))
    for layer, pool in enumerate(pools):
        signs = np.sign(1 / pool - load[layer, :pool])
        want = 0.125 * (signs - signs.mean())
        np.testing.assert_allclose(bias[layer, :pool], want, atol=1e-6)
        assert np.all(bias[layer, pool:] == 0)
    np.testing.assert_array_equal(np.asarray(metrics["router_bias"]), bias)
    assert float(metrics["router_bias_absmax"]) == pytest.approx(np.abs(bias).max())


def _skewed(state):
    """Every token embedding gets a common component along the first width coordinate, and
    every router reads it as a strong preference for experts 0 and 1 of its pool."""
    params = jax.tree.map(lambda x: x, state.params)
    params["token_embed"] = params["token_embed"].at[:, 0].add(0.03)
    for block in ("groups", "last_group"):
        router = params[block]["layers"]["moe"]["router"]  # (groups, layers, D, pool)
        params[block]["layers"]["moe"]["router"] = router.at[..., 0, 0].add(2.0).at[..., 0, 1].add(1.6)
    return dataclasses.replace(state, params=params)


@pytest.mark.e2e
def test_a_skewed_router_is_balanced_faster_with_the_bias():
    """Trained on one batch with no balancing loss, a skewed router stays skewed; with the bias
    its largest LBV over the last five of 30 steps is well under the plain router's."""
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 64)
    history = {}
    for on in (False, True):
        _, state, step_fn = _setup(f"model.router_bias={str(on).lower()}", "loss.router_bias_rate=0.1")
        state, lbv = _skewed(state), []
        for _ in range(30):
            state, metrics = step_fn(state, tokens)
            lbv.append(float(metrics["lbv_max"]))
        history[on] = lbv
    assert history[False][0] > 2.0  # an expert with three times its share
    assert np.mean(history[True][-5:]) < 0.6 * np.mean(history[False][-5:]), history
