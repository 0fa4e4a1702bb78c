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
