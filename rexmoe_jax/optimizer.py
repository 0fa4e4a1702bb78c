"""AdamW with global-norm clipping, linear warm-up and cosine decay: the paper's recipe (Sec. 5)."""

from __future__ import annotations

import jax
import optax

from rexmoe_jax.config import OptimConfig


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then cosine to min_lr_ratio * peak
    at `total_steps`."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim.learning_rate * optim.min_lr_ratio)


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
