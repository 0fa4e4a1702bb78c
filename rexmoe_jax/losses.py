"""Training losses: next-token cross-entropy and the two router losses.

The paper names no auxiliary loss; this project's decision (method digest, Sec. 4) is a
Switch-style load-balancing loss over each layer's candidate pool plus a router z-loss, each
with a coefficient in `LossConfig` (0 turns it off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array,
                  mask_BxS: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in float32 over the positions where `mask` is true."""
    logits = logits_BxSxV.astype(jnp.float32)
    log_z_BxS = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxS = jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
    nll_BxS = log_z_BxS - target_logit_BxS
    if mask_BxS is None:
        return jnp.mean(nll_BxS)
    mask = mask_BxS.astype(jnp.float32)
    return jnp.sum(nll_BxS * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_balancing_loss(expert_load_P: jax.Array, mean_probs_P: jax.Array) -> jax.Array:
    """Switch Transformer's loss, P * sum_i f_i p_i, over a pool of P experts.

    f_i: the share of token->expert assignments that went to expert i (no gradient flows through
    it); p_i: the mean router probability of expert i. Equals 1 when both are uniform (1/P).
    Under PSR, f is zero on masked experts while p stays the softmax over the whole pool (as the
    gates do), so a uniform router still scores 1.
    """
    pool = expert_load_P.shape[-1]
    return pool * jnp.sum(jax.lax.stop_gradient(expert_load_P) * mean_probs_P, axis=-1)


def router_z_loss(logits_TxP: jax.Array) -> jax.Array:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2; keeps logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxP.astype(jnp.float32), axis=-1)))
