"""LBV, under-used experts and FLOPs per token against hand-computed values."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax import trainer
from rexmoe_jax.config import Config, ModelConfig
from rexmoe_jax.model import metrics


def test_lbv_by_hand():
    # Layer 0: pool 4, loads 0.5, 0.25, 0.25, 0 -> LBV 1, 0, 0, -1.
    # Layer 1: a smaller last group, pool 2 (padded to 4): loads 0.5, 0.5 -> LBV 0, 0.
    load = jnp.asarray([[0.5, 0.25, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0]])
    lbv = np.asarray(metrics.load_balance_violation(load, np.array([4, 2])))
    np.testing.assert_allclose(lbv, [[1, 0, 0, -1], [0, 0, 0, 0]])
    out = metrics.routing_metrics(load, np.array([4, 2]))
    assert float(out["lbv_max"]) == pytest.approx(1.0)
    assert float(out["lbv_min"]) == pytest.approx(-1.0)
    assert float(out["underused_share"]) == pytest.approx(1 / 6)  # one idle expert of 6 real ones
    np.testing.assert_allclose(np.asarray(out["layer_lbv_max"]), [1.0, 0.0])


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=100, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1,
                      expert_ffn=4, num_experts=4, top_k=1)
    # 6 * (active + head) + 12 * L * H * K * S
    assert metrics.flops_per_token(cfg, seq_len=10, params_active=1000) == 6 * (1000 + 800) + 12 * 2 * 2 * 4 * 10


def test_flops_per_token_of_the_dense_twin_by_hand():
    """model.ffn=dense: each layer's FFN is one SwiGLU of width K*F; its FLOPs are the MoE's
    minus the router's."""
    dense = Config(model=ModelConfig(vocab_size=100, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1,
                                     expert_ffn=4, num_experts=4, top_k=2, ffn="dense"))
    attention = 8 * 2 * 4 + 2 * (8 * 1 * 4) + 2 * 4 * 8  # query, key and value, out: D H Z, 2 D J Z, H Z D
    ffn = 3 * 8 * (2 * 4)  # gate, up and down of width K*F = 8
    active = 2 * (attention + ffn + 2 * 8) + 8  # two layers with their two norms, the final norm
    flops = 6 * (active + 8 * 100) + 12 * 2 * 2 * 4 * 10
    assert active == 808 and flops == 11_568
    assert metrics.flops_per_token(dense.model, 10, trainer.summary(dense)["params_active"]) == flops
    moe = dataclasses.replace(dense, model=dataclasses.replace(dense.model, ffn="moe"))
    router = 2 * 8 * 4  # L D N
    assert metrics.flops_per_token(moe.model, 10, trainer.summary(moe)["params_active"]) == flops + 6 * router


def test_lbv_over_the_experts_psr_left_available():
    """Layer of pool 4 where PSR masked experts 2 and 3: loads 0.5 / 0.5 on the two available
    ones is perfect balance (LBV 0), not two idle experts."""
    load = jnp.asarray([[0.5, 0.5, 0.0, 0.0]])
    available = jnp.asarray([[1.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(metrics.load_balance_violation(load, np.array([4]), available), [[0, 0, 0, 0]])
    out = metrics.routing_metrics(load, np.array([4]), available)
    assert float(out["underused_share"]) == 0.0 and float(out["lbv_max"]) == 0.0
    # Without the mask the same loads read as two idle experts of four.
    assert float(metrics.routing_metrics(load, np.array([4]))["underused_share"]) == 0.5


def test_foreign_share_by_hand():
    # r = 2, N = 2: layer 0 owns pool ids 0-1, layer 1 owns 2-3.
    load = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.0, 0.9, 0.0]])
    np.testing.assert_allclose(metrics.foreign_share(load, num_experts=2, reuse=2), [0.25, 0.1])


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_device_peaks_by_kind_and_dtype():
    """Dense peaks from the datasheets and Cloud TPU pages, as the tables state them: a TPU's
    float32 matmuls run at its bf16 rate, a GPU's on TF32 (half); the longest matching name
    wins; an unknown kind (a CPU) has none."""
    assert metrics.device_peak_flops(_Device("TPU v5 lite")) == 197e12
    assert metrics.device_peak_flops(_Device("TPU v5"), "float32") == 459e12
    assert metrics.device_peak_flops(_Device("TPU7x")) == 2307e12 / 2  # a device is half a chip
    assert metrics.device_peak_flops(_Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert metrics.device_peak_flops(_Device("NVIDIA H100 80GB HBM3"), "float32") == 495e12
    assert metrics.device_peak_flops(_Device("NVIDIA H100 PCIe")) == 756e12
    assert metrics.device_peak_flops(_Device("NVIDIA B200"), "bfloat16") == 2250e12
    assert metrics.device_peak_flops(_Device("cpu")) is None
    tflops, mfu = metrics.utilisation(1e6, 2e6, 4, 1e12)
    assert (tflops, mfu) == (0.5, 0.5)  # 1e6 FLOPs x 2e6 tokens/s over 4 devices = 5e11 each
