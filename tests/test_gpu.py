"""GPU-only checks (marked `gpu`; they skip on a machine without one): the kernels that run
only there, against the oracles, at bf16 and the paper's widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_collectives import numpy_ragged_all_to_all, random_case, run_on_devices

from pallas_kernels import token_permute
from pallas_kernels.grouped_matmul import grouped_matmul
from rexmoe_jax.model import dispatch

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


def test_mosaic_gpu_token_permute_matches_reference():
    """The "pallas" permute and combine on a GPU (the Mosaic GPU kernels) against the reference,
    values and gradients, at a paper width (D = 512, bf16, K = 8) and a token count that is no
    multiple of a block."""
    t, k, d = 1000, 8, 512
    rng = np.random.default_rng(0)
    order = jnp.asarray(np.argsort(rng.integers(0, 64, t * k), kind="stable"), jnp.int32)
    inverse = token_permute.inverse_permutation(order)
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
    y = jax.random.normal(keys[1], (t * k, d), jnp.bfloat16)
    gates = jax.random.uniform(keys[2], (t, k), jnp.float32)
    cot = jax.random.normal(keys[3], (t, d), jnp.bfloat16)

    def run(implementation):
        def loss(x, y, gates):
            rows = token_permute.permute(x, order, inverse, k, implementation=implementation)
            out = token_permute.combine(rows + y, order, inverse, gates, implementation=implementation)
            return jnp.sum((out * cot).astype(jnp.float32)), out
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, y, gates)

    (got_grads, got_out), (want_grads, want_out) = run("pallas"), run("reference")
    for got, want in zip((got_out, *got_grads), (want_out, *want_grads)):
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def test_native_ragged_all_to_all_matches_the_numpy_model():
    """The real op, on as many GPUs as there are (up to 4), against the same NumPy model as the
    CPU emulation."""
    devices = min(4, jax.device_count())
    case = random_case(0, devices)
    got, want = run_on_devices(case, "native", jax.jit), numpy_ragged_all_to_all(*case)
    for device in range(devices):
        np.testing.assert_array_equal(got[device], want[device])
