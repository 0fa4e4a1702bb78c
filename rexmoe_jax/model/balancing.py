"""Auxiliary-loss-free balancing (DeepSeek-V3, Sec. 2.1.2), the option beside the Switch loss
(model.router_bias): each layer has a bias over its pool that is added to the router logits
for the top-K selection only (dispatch.route), and that the trainer moves after every update,
outside the optimizer:

    b_i <- b_i + rate * sign(mean load - load_i)

for the experts the PSR mask made available that step, then centred over them, so that a
layer's biases keep their sum and no common drift builds up. An overloaded expert is chosen
less often next step, an idle one more often; the gates, and hence the gradients, never see
the bias. Masked experts keep their bias: they had no chance to be chosen.

The biases live in the parameter tree (params/.../moe/router_bias, logical axes like the
router's), so checkpoints, resume, sharding and inference carry them as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rexmoe_jax.config import ModelConfig

_BLOCKS = ("groups", "last_group")


def router_bias(params, config: ModelConfig) -> jax.Array:
    """Every layer's bias as one (L, P) array; a smaller last group's is zero-padded to P."""
    rows = []
    for name in _BLOCKS:
        if name in params:
            bias = params[name]["layers"]["moe"]["router_bias"]  # (groups, layers, pool)
            flat = bias.reshape(-1, bias.shape[-1])
            rows.append(jnp.pad(flat, ((0, 0), (0, config.pool_size - flat.shape[-1]))))
    return jnp.concatenate(rows)


def with_router_bias(params, bias_LxP: jax.Array, config: ModelConfig):
    """`params` with every layer's bias replaced by the rows of `bias_LxP` (router_bias's layout)."""
    params, first = dict(params), 0
    for name in _BLOCKS:
        if name in params:
            old = params[name]["layers"]["moe"]["router_bias"]
            groups, layers, pool = old.shape
            new = bias_LxP[first:first + groups * layers, :pool].reshape(old.shape)
            first += groups * layers
            moe = dict(params[name]["layers"]["moe"], router_bias=new)
            params[name] = dict(params[name], layers=dict(params[name]["layers"], moe=moe))
    return params


def bias_step(load_LxP: jax.Array, available_LxP: jax.Array, rate: float) -> jax.Array:
    """The change of every layer's bias after one update, (L, P).

    `load` holds each expert's share of the layer's assignments this step; `available` the
    share of tokens that could choose it (PSR; 0 for a masked expert and for padding). The
    mean load is taken over the available experts, 1 / N_t of the assignments each."""
    live_LxP = available_LxP > 0
    count_L1 = jnp.sum(live_LxP, axis=-1, keepdims=True).astype(jnp.float32)
    mean_L1 = jnp.sum(jnp.where(live_LxP, load_LxP, 0.0), axis=-1, keepdims=True) / count_L1
    step_LxP = jnp.where(live_LxP, rate * jnp.sign(mean_L1 - load_LxP), 0.0)
    centre_L1 = jnp.sum(step_LxP, axis=-1, keepdims=True) / count_L1
    return jnp.where(live_LxP, step_LxP - centre_L1, 0.0)

