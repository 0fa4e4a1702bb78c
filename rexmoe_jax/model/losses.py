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


def load_balancing_loss(expert_load_P: jax.Array, logits_TxP: jax.Array,
                        available_TxP: jax.Array | None = None, over: str = "available") -> jax.Array:
    """Switch Transformer's loss, n * sum_i f_i p_i, over the n experts a token could choose.

    f_i: the share of token->expert assignments that went to expert i (no gradient flows through
    it); p_i: the mean over tokens of the router probability of expert i. Equals 1 when both are
    uniform.
    Decision (PSR, `psr.balance_over`): with "available", p is the softmax over the experts the
    PSR mask left to each token and n = N_t, so masked experts' logits get no gradient from this
    loss. With "pool", p is the softmax over the whole pool and n = P; masked experts then have
    f_i = 0 but p_i > 0, and the gradient pushes their logits up.
    """
    logits_TxP = logits_TxP.astype(jnp.float32)
    pool = logits_TxP.shape[-1]
    if available_TxP is None or over == "pool":
        count = jnp.asarray(pool, jnp.float32)
    else:
        logits_TxP = jnp.where(available_TxP, logits_TxP, -jnp.inf)
        count = jnp.mean(jnp.sum(available_TxP, axis=-1, dtype=jnp.float32))  # N_t for every token
    mean_probs_P = jnp.mean(jax.nn.softmax(logits_TxP, axis=-1), axis=0)
    return count * jnp.sum(jax.lax.stop_gradient(expert_load_P) * mean_probs_P, axis=-1)


def router_z_loss(logits_TxP: jax.Array) -> jax.Array:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2; keeps logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxP.astype(jnp.float32), axis=-1)))
