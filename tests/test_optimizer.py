"""The learning-rate schedule and the weight-decay mask."""


import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rexmoe_jax.config import OptimConfig
from rexmoe_jax.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


def test_warmup_then_cosine_to_ten_percent():
    cfg = OptimConfig(learning_rate=3e-4, warmup_steps=100, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, 1000)
    assert float(lr(0)) == 0.0
    assert float(lr(50)) == pytest.approx(1.5e-4)
    assert float(lr(100)) == pytest.approx(3e-4)
    # Halfway through the decay: 3e-5 + (3e-4 - 3e-5) * (1 + cos(pi / 2)) / 2
    assert float(lr(550)) == pytest.approx(3e-5 + 2.7e-4 * 0.5, rel=1e-5)
    assert float(lr(1000)) == pytest.approx(3e-5)


def hand_schedule(name, step, *, peak=2.0, floor=0.5, warmup=4, total=20, decay=5):
    """The schedules written out: warm-up to the peak over `warmup` steps, then linear decay to
    `floor` at `total`, the peak throughout, or the peak until `total - decay` and linear decay
    from there."""
    if step < warmup:
        return peak * step / warmup
    start = {"linear": warmup, "constant": np.inf, "wsd": total - decay}[name]
    if step < start:
        return peak
    return peak + (floor - peak) * min(step - start, total - start) / (total - start)


@pytest.mark.parametrize("name", ["linear", "constant", "wsd"])
def test_linear_constant_and_warmup_stable_decay_schedules(name):
    """warm-up 4 steps to 2.0, 20 steps, min_lr_ratio 0.25; wsd decays over round(0.25 * 20) = 5
    steps, from step 15 to 20."""
    cfg = OptimConfig(learning_rate=2.0, warmup_steps=4, min_lr_ratio=0.25, schedule=name,
                      decay_fraction=0.25)
    lr = learning_rate_schedule(cfg, 20)
    np.testing.assert_allclose([float(lr(step)) for step in range(23)],
                               [hand_schedule(name, step) for step in range(23)], rtol=1e-6)


def test_a_wsd_decay_longer_than_the_run_after_warm_up_starts_at_the_warm_up_end():
    """decay_fraction 1 with 4 warm-up steps of 20: the decay cannot start before step 4, so wsd
    is the linear schedule."""
    wsd = learning_rate_schedule(OptimConfig(learning_rate=2.0, warmup_steps=4, min_lr_ratio=0.25,
                                             schedule="wsd", decay_fraction=1.0), 20)
    np.testing.assert_allclose([float(wsd(step)) for step in range(21)],
                               [hand_schedule("linear", step) for step in range(21)], rtol=1e-6)


def test_adamw_applies_the_wsd_rate_of_each_step():
    """With b1 = b2 = 0, no decay and a tiny eps, AdamW's update is -lr * sign(g): ten updates of
    a unit gradient move the weight by the sum of the schedule's first ten rates (warm-up 2,
    then 2.0 to step 5, then down by 0.3 a step)."""
    cfg = OptimConfig(learning_rate=2.0, warmup_steps=2, min_lr_ratio=0.25, schedule="wsd",
                      decay_fraction=0.5, b1=0.0, b2=0.0, eps=1e-12, weight_decay=0.0, clip_norm=0.0)
    tx = make_optimizer(cfg, 10)
    params, grads = {"w": jnp.zeros(())}, {"w": jnp.ones(())}
    state, moved = tx.init(params), []
    for _ in range(10):
        updates, state = tx.update(grads, state, params)
        moved.append(-float(updates["w"]))
    np.testing.assert_allclose(moved, [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.7, 1.4, 1.1, 0.8], rtol=1e-5)


def test_no_decay_on_norms():
    params = {"final_norm": {"scale": jnp.ones(3)}, "lm_head": jnp.ones((3, 2)),
              "groups": {"layers": {"attn_norm": {"scale": jnp.ones((2, 1, 3))},
                                    "moe": {"router": jnp.ones((2, 1, 3, 4))}}}}
    mask = weight_decay_mask(params)
    assert mask == {"final_norm": {"scale": False}, "lm_head": True,
                    "groups": {"layers": {"attn_norm": {"scale": False}, "moe": {"router": True}}}}


def test_adamw_step_by_hand():
    """One AdamW step with zero-initialised moments: p - lr * (g / (|g| + eps) + wd * p)."""
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    tx = make_optimizer(cfg, 10)
    params = {"w": jnp.asarray([[1.0, -2.0]]), "norm": {"scale": jnp.asarray([3.0])}}
    grads = {"w": jnp.asarray([[0.5, 0.25]]), "norm": {"scale": jnp.asarray([1.0])}}
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    lr = 0.1  # the schedule at step 0 with no warm-up is the peak
    np.testing.assert_allclose(new["w"], [[1 - lr * (1 + 0.5), -2 - lr * (1 - 1.0)]], rtol=1e-5)
    np.testing.assert_allclose(new["norm"]["scale"], [3 - lr * 1], rtol=1e-5)


def test_gradients_are_clipped_to_the_global_norm():
    """With b1 = b2 = 0 and a huge eps, AdamW's update is -lr * g / eps: linear in the gradient,
    so the clipped gradient (3, 4) -> (0.6, 0.8) shows in the update."""
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.asarray([3.0, 4.0])}  # global norm 5
    for clip, expected in ((1.0, [0.6, 0.8]), (0.0, [3.0, 4.0])):
        cfg = OptimConfig(learning_rate=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=clip,
                          b1=0.0, b2=0.0, eps=1e6)
        tx = make_optimizer(cfg, 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(-np.asarray(updates["w"]) * 1e6, expected, rtol=1e-4)
