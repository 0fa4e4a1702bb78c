"""Routing metrics (the paper's LBV and under-used experts) and model FLOPs utilisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax.config import ModelConfig
from rexmoe_jax.reuse import own_experts
from rexmoe_jax.targets import CHIPS

# Decision (the paper plots "under-used experts" without a threshold): an expert is under-used
# when its load is below half of the uniform share, i.e. LBV < -0.5.
UNDERUSED_LBV = -0.5


def _valid(load_LxP, pool_sizes_L, available_LxP):
    """The experts LBV is taken over: those of the layer's pool (a smaller last group's loads
    are zero-padded), and of those the ones PSR left available, when that is given."""
    valid_LxP = jnp.arange(load_LxP.shape[-1])[None, :] < jnp.asarray(pool_sizes_L)[:, None]
    return valid_LxP if available_LxP is None else valid_LxP & (available_LxP > 0)


def load_balance_violation(load_LxP: jax.Array, pool_sizes_L: np.ndarray,
                           available_LxP: jax.Array | None = None) -> jax.Array:
    """The paper's LBV_i = (load_i - mean load) / mean load per layer and pool expert (0 is
    perfect balance, -1 an idle expert). `load` holds each expert's share of the layer's
    assignments (rows sum to 1), so the mean load is 1 / (number of experts counted): the pool,
    or during PSR the experts the mask left available (masked ones cannot be loaded, and would
    read as idle). Entries not counted are 0."""
    valid_LxP = _valid(load_LxP, pool_sizes_L, available_LxP)
    count_L1 = jnp.sum(valid_LxP, axis=-1, keepdims=True).astype(jnp.float32)
    return jnp.where(valid_LxP, load_LxP * count_L1 - 1.0, 0.0)


def routing_metrics(load_LxP: jax.Array, pool_sizes_L: np.ndarray,
                    available_LxP: jax.Array | None = None) -> dict[str, jax.Array]:
    """Scalars for the log line, plus per-layer maxima (the LBV distribution over layers)."""
    lbv_LxP = load_balance_violation(load_LxP, pool_sizes_L, available_LxP)
    valid_LxP = _valid(load_LxP, pool_sizes_L, available_LxP)
    underused = jnp.sum((lbv_LxP < UNDERUSED_LBV) & valid_LxP) / jnp.sum(valid_LxP)
    return {
        "lbv_max": jnp.max(lbv_LxP),
        "lbv_min": jnp.min(jnp.where(valid_LxP, lbv_LxP, jnp.inf)),
        "underused_share": underused,
        "layer_lbv_max": jnp.max(lbv_LxP, axis=-1),
    }


def foreign_share(load_LxP, num_experts: int, reuse: int) -> np.ndarray:
    """Per layer, the share of its assignments that went to experts owned by another layer of
    its group (layer l owns pool ids j N ... j N + N - 1, j = l mod r); 0 when r = 1. This is
    what says whether a ReXMoE model uses reuse at all."""
    load = np.asarray(load_LxP, np.float64)
    own_LxP = own_experts(np.arange(load.shape[0]), load.shape[1], reuse, num_experts)
    return 1.0 - (load * own_LxP).sum(axis=1) / load.sum(axis=1)


def flops_per_token(config: ModelConfig, seq_len: int, params_active: int) -> float:
    """Training FLOPs per token, PaLM's convention: 6 x (active parameters + the output
    projection) for the matmuls, plus 12 L H K S for attention scores and values (the causal
    mask's savings are not subtracted). The embedding lookup costs nothing."""
    head = config.d_model * config.vocab_size  # Excluded from params_active, but multiplied.
    attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * seq_len
    return 6.0 * (params_active + head) + attention


# Dense bf16 peak FLOP/s of one device, by jax's device_kind; MFU is reported only for these.
# The TPUs' come from targets.CHIPS, their one home (with sources).
_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    **{chip.device_kind: chip.peak_bf16_flops for chip in CHIPS.values()},
}


def device_peak_flops(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    if kind in _PEAK_FLOPS:
        return _PEAK_FLOPS[kind]
    return next((v for k, v in _PEAK_FLOPS.items() if kind.startswith(k) and not k.startswith("TPU")), None)
