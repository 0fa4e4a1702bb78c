"""GPU-only checks (marked `gpu`; they skip on a machine without one): the kernels that run
only there, against the oracles, at bf16 and the paper's awkward expert width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_collectives import numpy_ragged_all_to_all, random_case, run_on_devices

from pallas_kernels.grouped_matmul import grouped_matmul
from rexmoe_jax import dispatch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def test_tokamax_mosaic_kernel_matches_reference_at_width_744():
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(rng.multinomial(4096, np.ones(64) / 64), jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((4096, 512)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((64, 512, 744)) * 0.05, jnp.bfloat16)
    got = grouped_matmul(lhs, rhs, sizes, implementation="tokamax", preferred_element_type=jnp.float32)
    want = grouped_matmul(lhs, rhs, sizes, implementation="reference", preferred_element_type=jnp.float32)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def test_sorted_dispatch_on_gpu_matches_dense():
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (512, 256), jnp.float32)
    weights = dispatch.ExpertWeights(*(0.05 * jax.random.normal(k, s) for k, s in zip(
        keys[1:4], [(32, 256, 128), (32, 256, 128), (32, 128, 256)])))
    routing = dispatch.route(jax.random.normal(keys[4], (512, 32)), None, 4, False)
    got = dispatch.sorted_experts(x, routing, weights, "auto", "xla")
    want = dispatch.dense_experts(x, routing, weights)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 3e-3  # tf32-class matmuls


def test_native_ragged_all_to_all_matches_the_numpy_model():
    """The real op, on as many GPUs as there are (up to 4), against the same NumPy model as the
    CPU emulation."""
    devices = min(4, jax.device_count())
    case = random_case(0, devices)
    got, want = run_on_devices(case, "native", jax.jit), numpy_ragged_all_to_all(*case)
    for device in range(devices):
        np.testing.assert_array_equal(got[device], want[device])
