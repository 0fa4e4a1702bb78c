"""AdamW with global-norm clipping and a learning-rate schedule: linear warm-up, then cosine
decay (the paper's recipe, Sec. 5), linear decay, a constant rate, or warm-up-stable-decay."""

from __future__ import annotations

import jax
import optax

from rexmoe_jax.config import OptimConfig


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """The rate for optax's update count (the train state's step): linear warm-up from 0 to the
    peak over `warmup_steps`, then `optim.schedule` (config.OptimConfig) ending at `total_steps`.

    wsd's decay takes the last round(decay_fraction * total_steps) steps (at least one), and
    starts no earlier than the end of the warm-up."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    peak, floor = optim.learning_rate, optim.learning_rate * optim.min_lr_ratio
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=floor)
    warm, stable = optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)
    if optim.schedule == "constant":
        return optax.join_schedules([warm, stable], [warmup])
    decay_start = warmup  # linear: the decay follows the warm-up
    if optim.schedule == "wsd":
        decay_start = max(warmup, total_steps - max(1, round(optim.decay_fraction * total_steps)))
    decay = optax.linear_schedule(peak, floor, max(total_steps - decay_start, 1))
    return optax.join_schedules([warm, stable, decay], [warmup, decay_start])


def weight_decay_mask(params):
    """Decay every weight matrix; not norm scales (nor biases, which this model does not have)."""
    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n or n == "bias" for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=weight_decay_mask)
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
    return adamw
