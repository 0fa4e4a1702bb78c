"""Every grouped-matmul implementation against NumPy, values and gradients."""

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels.grouped_matmul import blocked, grouped_matmul, resolve

IMPLEMENTATIONS = ["ragged_dot", "blocked", "tokamax", "reference", "auto"]


def numpy_gmm(lhs, rhs, sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [10], [0, 0, 7], [1, 1, 1, 1, 1, 1, 1], [4, 4, 0]])
def test_values_and_gradients(implementation, sizes):
    """Including empty groups, a single group, and rows past the last group (zeros)."""
    rng = np.random.default_rng(len(sizes))
    m = sum(sizes) + (2 if sizes == [4, 4, 0] else 0)
    lhs = rng.standard_normal((m, 6)).astype(np.float32)
    rhs = rng.standard_normal((len(sizes), 6, 5)).astype(np.float32)
    cot = rng.standard_normal((m, 5)).astype(np.float32)
    sizes_arr = jnp.asarray(sizes, jnp.int32)

    def f(a, b):
        return jnp.sum(grouped_matmul(a, b, sizes_arr, implementation=implementation) * cot)

    out = jax.jit(lambda a, b: grouped_matmul(a, b, sizes_arr, implementation=implementation))(lhs, rhs)
    np.testing.assert_allclose(out, numpy_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    d_lhs, d_rhs = jax.jit(jax.grad(f, argnums=(0, 1)))(lhs, rhs)
    # d lhs[m] = cot[m] @ rhs[g(m)]^T;  d rhs[g] = lhs[rows of g]^T @ cot[rows of g]
    exp_lhs = numpy_gmm(cot, np.swapaxes(rhs, 1, 2), sizes)
    exp_rhs = np.zeros_like(rhs, dtype=np.float64)
    start = 0
    for g, size in enumerate(sizes):
        exp_rhs[g] = lhs[start:start + size].T @ cot[start:start + size]
        start += size
    np.testing.assert_allclose(d_lhs, exp_lhs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_rhs, exp_rhs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [None, 4, 7])
def test_blocked_with_many_groups_and_small_blocks(block):
    """Groups of several blocks, partial last blocks, a last block that reaches the end of the
    rows (its window moves back), empty groups; values and both gradients."""
    rng = np.random.default_rng(3)
    sizes = rng.multinomial(197, np.ones(16) / 16)
    sizes[5] = 0
    lhs = rng.standard_normal((200, 8)).astype(np.float32)
    rhs = rng.standard_normal((16, 8, 4)).astype(np.float32)
    cot = rng.standard_normal((200, 4)).astype(np.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def f(a, b):
        return jnp.sum(blocked.grouped_matmul(a, b, group_sizes, block=block) * cot)

    out = blocked.grouped_matmul(lhs, rhs, group_sizes, block=block)
    np.testing.assert_allclose(out, numpy_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    d_lhs, d_rhs = jax.jit(jax.grad(f, argnums=(0, 1)))(lhs, rhs)
    np.testing.assert_allclose(d_lhs, numpy_gmm(cot, np.swapaxes(rhs, 1, 2), sizes), rtol=1e-4, atol=1e-5)
    ends = np.cumsum(sizes)
    for g, (start, end) in enumerate(zip(ends - sizes, ends)):
        np.testing.assert_allclose(d_rhs[g], lhs[start:end].T @ cot[start:end], rtol=1e-4, atol=1e-5)


def test_default_block_is_half_the_mean_rows_per_group_within_16_to_128():
    # 4,096 rows over 32 groups: a mean of 128, half of it 64; 200 over 16: 6, raised to 16.
    assert blocked.default_block(4096, 32) == 64 and blocked.default_block(200, 16) == 16
    assert blocked.default_block(1 << 20, 8) == 128 and blocked.default_block(1000, 4) == 64
    # The fused SwiGLU's rule, the whole mean: 8,192 rows over 256 groups, 32; over 128, 64.
    assert blocked.default_block(8192, 256, share=1.0) == 32 and blocked.default_block(8192, 128, share=1.0) == 64
    assert blocked.default_block(1024, 64, share=1.0) == 16 and blocked.default_block(4096, 8, share=1.0) == 128


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 5, 2)), jnp.asarray([2, 2]))
    with pytest.raises(ValueError, match="unknown grouped_matmul implementation"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.asarray([2, 2]), implementation="magic")


def test_tokamax_pads_widths_exactly():
    """tokamax's GPU kernel needs widths that are multiples of 64: K = 40 and N = 744 are padded
    with zeros (to 64 and 768) and the result, and its gradients, are exactly the unpadded ones."""
    rng = np.random.default_rng(7)
    sizes = [5, 0, 9]
    lhs = rng.standard_normal((14, 40)).astype(np.float32)
    rhs = rng.standard_normal((3, 40, 744)).astype(np.float32)
    cot = rng.standard_normal((14, 744)).astype(np.float32)
    sizes_arr = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(lhs, rhs, sizes_arr, implementation="tokamax")
    assert out.shape == (14, 744)
    np.testing.assert_allclose(out, numpy_gmm(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)
    grads = jax.grad(lambda a, b: jnp.sum(grouped_matmul(a, b, sizes_arr, implementation="tokamax") * cot),
                     argnums=(0, 1))(lhs, rhs)
    assert grads[0].shape == lhs.shape and grads[1].shape == rhs.shape
    np.testing.assert_allclose(grads[0], numpy_gmm(cot, np.swapaxes(rhs, 1, 2), sizes), rtol=1e-4, atol=1e-3)
    # d rhs[g] = lhs[rows of g]^T @ cot[rows of g]: the padded N columns must not leak in; an
    # empty group's gradient is zero.
    ends = np.cumsum(sizes)
    for g, (start, end) in enumerate(zip(ends - sizes, ends)):
        np.testing.assert_allclose(grads[1][g], lhs[start:end].T @ cot[start:end], rtol=1e-4, atol=1e-3)


def test_auto_picks_blocked_on_cpu():
    assert jax.default_backend() == "cpu" and resolve("auto") == "blocked" and resolve("tokamax") == "tokamax"
    assert resolve("auto", platform="tpu") == "blocked" and resolve("auto", platform="cpu") == "blocked"


def numpy_swiglu(x, gate, up, down, sizes):
    """float64: down_e(silu(gate_e x) * up_e x) for each group's rows, zeros past the groups."""
    out = np.zeros((x.shape[0], down.shape[2]))
    start = 0
    for e, size in enumerate(sizes):
        rows = x[start:start + size].astype(np.float64)
        g = rows @ gate[e]
        out[start:start + size] = (g / (1 + np.exp(-g)) * (rows @ up[e])) @ down[e]
        start += size
    return out


def finite_difference(f, arrays, eps=1e-6):
    """Central differences of the scalar f(*arrays) in float64, one element at a time."""
    arrays = [a.astype(np.float64) for a in arrays]
    grads = []
    for a in arrays:
        grad = np.zeros_like(a)
        for index in np.ndindex(a.shape):
            saved = a[index]
            a[index] = saved + eps
            high = f(*arrays)
            a[index] = saved - eps
            low = f(*arrays)
            a[index] = saved
            grad[index] = (high - low) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("sizes, extra_rows, block", [
    ([3, 0, 5, 2], 2, None), ([0, 0, 7], 0, 2), ([1, 1, 1, 1, 1, 1, 1], 1, 3), ([6, 5, 0, 4], 0, 4)])
def test_blocked_swiglu_against_numpy_values_and_finite_differences(sizes, extra_rows, block):
    """The fused expert loop: values against NumPy, and the gradients of x and all three weights
    against float64 central differences of the NumPy forward (empty groups, rows past the
    groups, blocks that span several groups and a last window that moves back)."""
    rng = np.random.default_rng(sum(sizes) + extra_rows)
    m, d, f, e = sum(sizes) + extra_rows, 3, 2, len(sizes)
    x = rng.standard_normal((m, d)).astype(np.float32)
    gate, up = (rng.standard_normal((e, d, f)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((e, f, d)).astype(np.float32)
    cot = rng.standard_normal((m, d))
    group_sizes = jnp.asarray(sizes, jnp.int32)

    out = jax.jit(lambda *a: blocked.swiglu(*a, group_sizes, block=block))(x, gate, up, down)
    np.testing.assert_allclose(out, numpy_swiglu(x, gate, up, down, sizes), rtol=1e-5, atol=1e-5)

    grads = jax.jit(jax.grad(lambda *a: jnp.sum(blocked.swiglu(*a, group_sizes, block=block) * cot),
                             argnums=(0, 1, 2, 3)))(x, gate, up, down)
    expected = finite_difference(lambda *a: np.sum(numpy_swiglu(*a, sizes) * cot), [x, gate, up, down])
    for name, got, want in zip(["x", "gate", "up", "down"], grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.any(grads[0][sum(sizes):]), "rows past the groups get no gradient"


@pytest.mark.parametrize("implementation", ["ragged_dot", "tokamax"])
def test_tpu_weight_gradient_flops(tpu_devices, implementation):
    """Compiled by the real TPU compiler (forward and both gradients). With libtpu 0.0.42 (jax
    0.10.2), XLA's ragged_dot computes the weight gradient as one masked dense matmul per group,
    G times the work (what the compile report's FLOPs showed at the 2.3B preset); libtpu 0.0.50
    (jax 0.12) lowers all three to Mosaic kernels instead, with no XLA matmul, and the compiler
    counts only each group's rows. tokamax's Mosaic TPU kernels (gmm, tgmm) do only each group's
    rows on both, but not inside a checking shard_map, which is why "auto" is "blocked" on TPU."""
    from rexmoe_jax import sharding
    from rexmoe_jax.compile import hlo as hlo_analysis

    m, k, n, g = 1024, 256, 384, 8
    mesh = jax.sharding.Mesh(np.array(tpu_devices("v5e-1")), ("x",))

    def loss(lhs, rhs, sizes):
        out = grouped_matmul(lhs, rhs, sizes, implementation=implementation, platform="tpu")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    shapes = [((m, k), jnp.bfloat16), ((g, k, n), jnp.bfloat16), ((g,), jnp.int32)]
    with sharding.activate(mesh):  # the default device is then the TPU's, which tokamax asks for
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*(jax.ShapeDtypeStruct(*s) for s in shapes)).compile()
    flops = hlo_analysis.analyse(hlo.as_text())["flops"]
    libtpu = tuple(int(part) for part in importlib.metadata.version("libtpu").split(".")[:3])
    if implementation == "ragged_dot" and libtpu >= (0, 0, 50):
        # No XLA matmul: the kernels' own count (their cost_estimate), forward, d lhs and d rhs,
        # each over the m rows once, read by the analysis as by XLA's (whose count adds the
        # loss's elementwise work, 3 m n).
        assert flops == 3 * 2 * m * k * n
        assert hlo.cost_analysis()["flops"] == pytest.approx(3 * 2 * m * k * n, rel=0.01)
        return
    # libtpu 0.0.42: ragged_dot's forward and d lhs are Mosaic kernels stating m rows' work each,
    # and its weight gradient is g masked dense XLA matmuls over all m rows. tokamax's three
    # kernels state m rows' work each (in metadata that breaks its line: compile/hlo.py).
    assert flops == {"ragged_dot": (g + 2) * 2 * m * k * n, "tokamax": 3 * 2 * m * k * n}[implementation]
    assert hlo.as_text().count('custom_call_target="tpu_custom_call"') == 3  # fwd, d lhs, d rhs (tgmm)
    if implementation == "tokamax":
        step = jax.shard_map(loss, mesh=mesh, in_specs=(P("x"), P(), P()), out_specs=P())
        with sharding.activate(mesh), pytest.raises(ValueError, match="manual_axis_type"):
            jax.jit(jax.grad(step)).lower(*(jax.ShapeDtypeStruct(*s) for s in shapes))
