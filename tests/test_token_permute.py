"""permute / combine: every implementation against NumPy, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels import token_permute

# Fixed per dtype: float32 gathers are exact up to summation order; bf16 rounds once per op.
TOLERANCE = {jnp.float32: {"rtol": 1e-5, "atol": 1e-6}, jnp.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}
JAX_VERSION = tuple(int(part) for part in jax.__version__.split(".")[:2])
# Mosaic GPU's interpret mode (plgpu.InterpretGPUParams) arrived in jax 0.12, which needs Python 3.12
# (the main environment is Python 3.11 with jax 0.10.2): .ci/run runs them in a second, 3.12 leg.
needs_gpu_interpret = pytest.mark.skipif(
    JAX_VERSION < (0, 12),
    reason=f"Mosaic GPU interpret mode needs jax >= 0.12; this is jax {jax.__version__}")
# On a GPU, "pallas" is the Mosaic GPU kernels, which want widths that are multiples of 128.
gpu_widths = pytest.mark.skipif(
    jax.default_backend() == "gpu",
    reason="these widths are below the Mosaic GPU kernels' multiple of 128; tests/test_gpu.py checks D = 512")
# (implementation, interpret): "pallas" on CPU runs the TPU kernels in interpret mode by default.
IMPLEMENTATIONS = [pytest.param("xla", None, id="xla"),
                   pytest.param("pallas", None, id="pallas", marks=gpu_widths),
                   pytest.param("pallas", "gpu", id="pallas-gpu-interpret", marks=needs_gpu_interpret),
                   pytest.param("reference", None, id="reference")]


def problem(tokens, top_k, pool, d, dtype, seed):
    rng = np.random.default_rng(seed)
    # Only the first half of the pool is ever chosen: the rest receive no tokens.
    experts = np.stack([rng.choice(max(top_k, pool // 2), top_k, replace=False) for _ in range(tokens)])
    order = np.argsort(experts.reshape(-1), kind="stable").astype(np.int32)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=np.int32)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    y = rng.standard_normal((tokens * top_k, d)).astype(np.float32)
    gates = rng.random((tokens, top_k)).astype(np.float32)
    cot_p = rng.standard_normal((tokens * top_k, d)).astype(np.float32)
    cot_c = rng.standard_normal((tokens, d)).astype(np.float32)
    cast = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))  # the inputs as the dtype sees them
    return {"x": cast(x), "y": cast(y), "gates": gates, "order": order, "inverse": inverse, "k": top_k,
                "cot_p": cast(cot_p), "cot_c": cast(cot_c)}


def numpy_expected(p):
    k, order, inverse = p["k"], p["order"], p["inverse"]
    t = p["x"].shape[0]
    permuted = p["x"][order // k]
    dx = np.zeros_like(p["x"])
    for i, a in enumerate(order):  # each sorted row sends its cotangent back to its token
        dx[a // k] += p["cot_p"][i]
    rows = p["y"][inverse].reshape(t, k, -1)
    combined = np.einsum("tkd,tk->td", rows, p["gates"])
    dy = np.zeros_like(p["y"])
    for a in range(t * k):
        dy[inverse[a]] = p["gates"].reshape(-1)[a] * p["cot_c"][a // k]
    dgates = np.einsum("tkd,td->tk", rows, p["cot_c"])
    return permuted, dx, combined, dy, dgates


CASES = [(13, 2, 8, 16), (8, 1, 4, 8), (21, 4, 16, 8)]  # tokens not a multiple of 8, K = 1, K = 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}K{c[1]}" for c in CASES])
@pytest.mark.parametrize("implementation,interpret", IMPLEMENTATIONS)
def test_values_and_gradients_match_numpy(implementation, interpret, case, dtype):
    p = problem(*case, dtype, seed=case[0])
    order, inverse, k = jnp.asarray(p["order"]), jnp.asarray(p["inverse"]), p["k"]
    x, y = jnp.asarray(p["x"], dtype), jnp.asarray(p["y"], dtype)
    gates = jnp.asarray(p["gates"])

    def perm(x):
        return token_permute.permute(x, order, inverse, k, implementation=implementation, interpret=interpret)

    def comb(y, gates):
        return token_permute.combine(y, order, inverse, gates, implementation=implementation,
                                     interpret=interpret)

    permuted, permute_vjp = jax.vjp(perm, x)
    combined, combine_vjp = jax.vjp(comb, y, gates)
    (dx,) = permute_vjp(jnp.asarray(p["cot_p"], dtype))
    dy, dgates = combine_vjp(jnp.asarray(p["cot_c"], dtype))
    expected = numpy_expected(p)
    for got, want, name in zip((permuted, dx, combined, dy, dgates), expected,
                               ("permute", "d x", "combine", "d y", "d gates")):
        assert got.dtype == (jnp.float32 if name == "d gates" else dtype), name
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, err_msg=name, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_kernels_in_runs_of_rows_match_numpy(monkeypatch, dtype):
    """A call with more indices than one kernel prefetches into SMEM runs as several kernels over
    runs of rows (a multiple of the largest block, 32 rows): with at most 128 indices a kernel,
    70 tokens at K = 4 run as 32 + 32 + 6 tokens for combine and its gradients, and their 280
    rows as 128 + 128 + 24 for permute; the results are still numpy's."""
    monkeypatch.setattr(token_permute.pallas, "PREFETCH_INDICES", 128)
    calls = []
    real = token_permute.pallas._call
    monkeypatch.setattr(token_permute.pallas, "_call", lambda *a: calls.append(a[1]) or real(*a))
    test_values_and_gradients_match_numpy("pallas", None, (70, 4, 16, 8), dtype)
    # Each run's grid in blocks of 8 rows (float32) or 16 (bf16), the last run padded to a
    # whole block: 128 rows are 16 or 8 blocks, 32 tokens 4 or 2, 24 rows 3 or 2, 6 tokens 1.
    grids = sorted({grid[0] for grid in calls})
    assert grids == {jnp.float32: [1, 3, 4, 16], jnp.bfloat16: [1, 2, 8]}[dtype]


def test_a_block_is_a_tiles_sublanes_of_the_rows_dtype():
    """A TPU tile is 8 sublanes of 32 bits: 8 rows of float32, 16 of bf16, 32 of int8."""
    assert [token_permute.pallas.block_rows(t) for t in (jnp.float32, jnp.int32, jnp.bfloat16, jnp.int8)] == \
        [8, 8, 16, 32]


def test_inverse_permutation_and_input_checks():
    order = jnp.asarray([2, 0, 3, 1])
    np.testing.assert_array_equal(token_permute.inverse_permutation(order), [1, 3, 0, 2])
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="tokens x top_k"):
        token_permute.permute(x, jnp.arange(3), jnp.arange(3), 2)
    with pytest.raises(ValueError, match="unknown permute implementation"):
        token_permute.permute(x, jnp.arange(4), jnp.arange(4), 2, implementation="cuda")
    with pytest.raises(ValueError, match="float x"):
        token_permute.permute(jnp.ones((2, 4), jnp.int32), jnp.arange(4), jnp.arange(4), 2)
    with pytest.raises(ValueError, match="y has 3 rows"):
        token_permute.combine(jnp.ones((3, 4)), jnp.arange(4), jnp.arange(4), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="applies to implementation='pallas' only"):
        token_permute.permute(x, jnp.arange(4), jnp.arange(4), 2, interpret="gpu")
    with pytest.raises(ValueError, match="unknown interpret mode"):
        token_permute.permute(x, jnp.arange(4), jnp.arange(4), 2, implementation="pallas", interpret="cuda")


def test_xla_gradients_contain_no_scatter():
    """The point of the custom VJP: the backward pass of permute and combine has gathers only."""
    p = problem(16, 2, 8, 8, jnp.float32, seed=0)
    order, inverse = jnp.asarray(p["order"]), jnp.asarray(p["inverse"])

    def backward_program(implementation):
        def loss(x, gates):
            rows = token_permute.permute(x, order, inverse, 2, implementation=implementation)
            return jnp.sum(token_permute.combine(rows * 2, order, inverse, gates, implementation=implementation) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(jnp.asarray(p["x"]), jnp.asarray(p["gates"])).as_text()

    assert "scatter" not in backward_program("xla")
    assert "scatter" in backward_program("reference")  # XLA's own gradient of a gather


@needs_gpu_interpret
def test_mosaic_gpu_pipeline_is_race_free():
    """The five gathers the Mosaic GPU path runs, each over several blocks per CTA, a tail block
    and an uneven split of blocks, under the interpreter's race detector: a read of a row slot
    that does not wait for its copies, or a refill that does not wait for the store before it,
    raises. Expected values are the NumPy oracle's."""
    from pallas_kernels.token_permute import mosaic_gpu

    p = problem(21, 2, 8, 16, jnp.float32, seed=1)
    params = mosaic_gpu.interpret_params(detect_races=True)
    order, inverse, k = jnp.asarray(p["order"]), jnp.asarray(p["inverse"]), p["k"]
    y, gates, cot_c = jnp.asarray(p["y"]), jnp.asarray(p["gates"]), jnp.asarray(p["cot_c"])
    gathered = (mosaic_gpu.gather_rows(jnp.asarray(p["x"]), order // k, interpret=params),
           mosaic_gpu.gather_combine(jnp.asarray(p["cot_p"]), inverse, top_k=k, interpret=params),
           mosaic_gpu.gather_combine(y, inverse, gates, top_k=k, interpret=params),
           mosaic_gpu.gather_rows(cot_c, order // k, gates.reshape(-1)[order], interpret=params),
           mosaic_gpu.gather_dot(y, inverse, cot_c, k, interpret=params))
    for got, want, name in zip(gathered, numpy_expected(p), ("permute", "d x", "combine", "d y", "d gates")):
        np.testing.assert_allclose(np.asarray(got), want, err_msg=name, **TOLERANCE[jnp.float32])


def test_mosaic_gpu_kernels_lower_for_a_gpu_with_gathers_only():
    """No GPU here, but lowering for CUDA runs Mosaic GPU's layout inference and its SMEM budget
    check: at a paper width (D = 512, bf16, K = 8) permute and combine, forward and backward,
    become Mosaic GPU kernels and no scatter. A width that is not a multiple of 128 is refused."""
    from pallas_kernels.token_permute import mosaic_gpu

    t, k, d = 256, 8, 512
    order = jnp.asarray(np.random.default_rng(0).permutation(t * k), jnp.int32)

    def loss(x, y, gates):
        rows = mosaic_gpu.permute(x, order, order, k)
        return jnp.sum(mosaic_gpu.combine(rows + y, order, order, gates).astype(jnp.float32))

    args = (jnp.zeros((t, d), jnp.bfloat16), jnp.zeros((t * k, d), jnp.bfloat16), jnp.zeros((t, k)))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    # permute; d x, d y, d gates (combine's own output is not needed by the gradient).
    assert text.count("custom_call @mosaic_gpu") == 4 and "stablehlo.scatter" not in text
    with pytest.raises(ValueError, match="multiple of 128"):
        mosaic_gpu.gather_rows(jnp.zeros((8, 64)), jnp.arange(8))


def test_auto_is_xla_on_cpu_and_pallas_elsewhere():
    from pallas_kernels.token_permute import api

    assert api.resolve("auto", 256) == "xla" and api.resolve("reference", 256) == "reference"  # this CPU
    assert api.resolve("auto", 64, platform="tpu") == "pallas"
    assert (api.resolve("auto", 256, "gpu"), api.resolve("auto", 200, "gpu")) == ("pallas", "xla")  # D % 128
    assert api._pallas(None, "tpu") == (api.pallas, False)  # the Mosaic kernels, not interpret mode
    assert api._pallas(None, "cpu") == (api.pallas, True)


def compiled_for_tpu(devices, tokens: int, d: int, k: int) -> str:
    """The HLO of permute then combine and both gradients through the Pallas TPU kernels, compiled
    by the real TPU compiler inside a checking shard_map with `tokens` tokens on each device."""
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))

    def loss(x, gates, order, inverse):
        y = token_permute.permute(x, order, inverse, k, implementation="pallas", platform="tpu")
        out = token_permute.combine(y, order, inverse, gates, implementation="pallas", platform="tpu")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh, in_specs=(P("x"),) * 4,
                         out_specs=(P("x"), P("x")))
    n = len(devices)
    shapes = [((n * tokens, d), jnp.bfloat16), ((n * tokens, k), jnp.float32),
              ((n * tokens * k,), jnp.int32), ((n * tokens * k,), jnp.int32)]
    return jax.jit(step).lower(*(jax.ShapeDtypeStruct(s, t) for s, t in shapes)).compile().as_text()


@pytest.mark.parametrize("target", ["v5e-8", "v6e-8", "tpu7x-8"])
def test_pallas_kernels_compile_through_mosaic_for_three_tpu_generations(tpu_devices, target):
    """The TPU kernels, not their interpret mode, at the 2.3B preset's per-device shape (4,096
    tokens, D = 512, K = 8 on a v5p-64 with fsdp 4 x expert 8 and grad_accum 16): forward and
    backward are five kernels (permute; combine; combine's dy and d gates; permute's dx), each
    one Mosaic custom call. TPU7x tiles the bf16 rows (16, 128) and refused blocks of 8 rows."""
    hlo = compiled_for_tpu(tpu_devices(target), 4096, 512, 8)
    assert hlo.count('custom_call_target="tpu_custom_call"') == 5
    assert "callback" not in hlo  # interpret mode would run the kernels as host callbacks


@pytest.mark.e2e
def test_more_indices_than_smem_holds_compile_for_tpu(tpu_devices):
    """32,768 tokens x K = 8 on one chip (the 2.3B preset with fsdp 4 on a v5p-8) are 262,144
    int32 indices, 1 MiB: as one kernel's scalar prefetch they overflowed the core's SMEM
    ("Ran out of memory in memory space smem"). In runs of PREFETCH_INDICES they compile."""
    tokens, k = 32768, 8
    assert tokens * k * 4 == 2 ** 20 and tokens * k == 2 * token_permute.pallas.PREFETCH_INDICES
    hlo = compiled_for_tpu(tpu_devices("v5p-8"), tokens, 512, k)
    assert hlo.count('custom_call_target="tpu_custom_call"') == 5 * 2  # five kernels, two runs each


def test_the_kernels_are_supported_from_tpu_v5e_and_hopper_on(tpu_devices):
    """v4's Mosaic has no sublane gather (the TPU kernels' row gather); the GPU kernels need TMA,
    which begins with Hopper (compute capability 9.0). GPU devices are stand-ins here."""
    import types

    assert not token_permute.pallas_supported(tpu_devices("v4-8")[0])
    assert token_permute.pallas_supported(tpu_devices("v5e-4")[0])
    assert token_permute.pallas_supported(tpu_devices("v5p-8")[0])
    assert token_permute.pallas_supported(tpu_devices("tpu7x-8")[0])

    def gpu(capability):
        return types.SimpleNamespace(platform="gpu", device_kind="NVIDIA", compute_capability=capability)
    capabilities = ("8.0", "8.9", "9.0", "10.0")  # A100, L40S, H100, B200
    assert [token_permute.pallas_supported(gpu(c)) for c in capabilities] == [False, False, True, True]
    assert token_permute.pallas_supported(jax.devices()[0])  # a CPU: interpret mode
