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


def _valid(load_LxP, pool_sizes_L, available_LxP, xp=jnp):
    """The experts LBV is taken over: those of the layer's pool (a smaller last group's loads
    are zero-padded), and of those the ones PSR left available, when that is given."""
    valid_LxP = xp.arange(load_LxP.shape[-1])[None, :] < xp.asarray(pool_sizes_L)[:, None]
    return valid_LxP if available_LxP is None else valid_LxP & (available_LxP > 0)


def load_balance_violation(load_LxP: jax.Array, pool_sizes_L: np.ndarray,
                           available_LxP: jax.Array | None = None, xp=jnp) -> jax.Array:
    """The paper's LBV_i = (load_i - mean load) / mean load per layer and pool expert (0 is
    perfect balance, -1 an idle expert). `load` holds each expert's share of the layer's
    assignments (rows sum to 1), so the mean load is 1 / (number of experts counted): the pool,
    or during PSR the experts the mask left available (masked ones cannot be loaded, and would
    read as idle). Entries not counted are 0. `xp=np` computes it on the host, without jax."""
    valid_LxP = _valid(load_LxP, pool_sizes_L, available_LxP, xp)
    count_L1 = xp.sum(valid_LxP, axis=-1, keepdims=True).astype(xp.float32)
    return xp.where(valid_LxP, load_LxP * count_L1 - 1.0, 0.0)


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


def layer_routing(load_LxP: np.ndarray, pool_sizes_L: np.ndarray, num_experts: int, reuse: int) -> dict[str, np.ndarray]:
    """Per layer, on the host (NumPy, no jax computation), from its expert loads over the full
    pool at one evaluation: the largest LBV, the share of under-used experts and `foreign_share`.
    The evaluate command's and the study records' per-layer routing."""
    load_LxP = np.asarray(load_LxP, np.float64)
    lbv_LxP = load_balance_violation(load_LxP, pool_sizes_L, xp=np)
    valid_LxP = _valid(load_LxP, pool_sizes_L, None, np)
    return {"lbv_max": lbv_LxP.max(axis=-1),
            "underused_share": ((lbv_LxP < UNDERUSED_LBV) & valid_LxP).sum(axis=-1) / valid_LxP.sum(axis=-1),
            "foreign_share": foreign_share(load_LxP, num_experts, reuse)}


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


# Dense (not 2:4-sparse) peak FLOP/s of one NVIDIA GPU by jax's device_kind, for bfloat16 and
# for float32 matmuls, from NVIDIA's datasheets: A100 312 bf16 / 156 TF32; H100 SXM and H200
# 989 / 495; H100 PCIe 756 / 378; HGX B200 2,250 / 1,125 (half of the printed sparse figures).
# float32 runs on TF32 tensor cores, which XLA's default precision uses for f32 matmuls. The
# TPUs' figures are in targets.CHIPS, their one home (with sources).
_GPU_PEAK_FLOPS = {
    "NVIDIA A100": (312e12, 156e12),
    "NVIDIA H100 PCIe": (756e12, 378e12), "NVIDIA H100": (989e12, 495e12),
    "NVIDIA H200": (989e12, 495e12),
    "NVIDIA B200": (2250e12, 1125e12),
}


def device_peak_flops(device: jax.Device, dtype: str = "bfloat16") -> float | None:
    """The dense peak FLOP/s of `device` for matmuls in `dtype` (bfloat16 or float32), or None
    for a kind the table does not know (a CPU). The longest table name that begins the
    device's kind wins ("NVIDIA H100 PCIe" before "NVIDIA H100")."""
    kind = getattr(device, "device_kind", "")
    tpu = next((chip for chip in CHIPS.values() if chip.device_kind == kind), None)
    if tpu is not None:  # XLA's default precision runs a TPU's f32 matmuls as one bf16 pass.
        return tpu.share().peak_bf16_flops  # one device's (a TPU7x chip is two)
    names = sorted((k for k in _GPU_PEAK_FLOPS if kind.startswith(k)), key=len, reverse=True)
    if not names:
        return None
    bf16, f32 = _GPU_PEAK_FLOPS[names[0]]
    return f32 if dtype == "float32" else bf16


def utilisation(flops_per_token: float, tokens_per_sec: float, devices: int,
                peak_flops: float | None) -> tuple[float, float | None]:
    """(TFLOP/s achieved per device, model FLOPs utilisation or None without a peak)."""
    achieved = flops_per_token * tokens_per_sec / devices
    return achieved / 1e12, (achieved / peak_flops if peak_flops else None)
