"""FLOPs, HBM bytes and collectives read from compiled HLO, counted through loops, against
counts by hand; on XLA:CPU (the loop's known trip count) and XLA:TPU (its condition)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import attention as flash
from rexmoe_jax.compile import hlo as hlo_analysis


def scanned_matmuls(n):
    def f(w_KxN, x_MxK):
        return jax.lax.scan(lambda x, _: (jnp.tanh(x @ w_KxN), None), x_MxK, None, length=n)[0]
    return f


def compile_on(devices, f, *shapes, spec=P(), dtype=jnp.bfloat16, donate=()):
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    args = [jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, spec)) for s in shapes]
    return jax.jit(f, donate_argnums=donate).lower(*args).compile()


@pytest.mark.parametrize("n", [1, 7])
def test_matmul_flops_are_counted_once_per_trip_on_cpu(n):
    compiled = compile_on(jax.devices()[:1], scanned_matmuls(n), (256, 256), (128, 256))
    assert hlo_analysis.analyse(compiled.as_text())["flops"] == n * 2 * 128 * 256 * 256


def test_tpu_loops_convolutions_and_what_xla_counts(tpu_devices):
    devices = tpu_devices("v5e-1")
    compiled = compile_on(devices, scanned_matmuls(7), (512, 512), (1024, 512))
    found = hlo_analysis.analyse(compiled.as_text())
    assert found["flops"] == 7 * 2 * 1024 * 512 * 512
    xla = compiled.cost_analysis()
    assert (xla[0] if isinstance(xla, list) else xla)["flops"] < 2 * 2 * 1024 * 512 * 512  # one trip's worth
    # Each trip reads x and w and writes x at least once: 7 x (1 + 0.5 + 1) MiB of bf16. At most
    # it also reads and writes x once more for an unfused tanh and once for a copy of the loop's
    # carry: 7 x 6.5 MiB (counted 39.0 MiB with libtpu 0.0.42.1); more would count bytes twice.
    assert 7 * (1024 * 512 + 512 * 512 + 1024 * 512) * 2 <= found["hbm_bytes"] <= 7 * 6.5 * 2 ** 20

    # A "same"-padded 1-D convolution: of the 16 x 5 (output, tap) pairs, 2 + 1 at each end
    # fall on padding, so 77 multiply-adds per (batch, in, out) triple.
    def conv(x_BxCxL, w_OxCxW):
        return jax.lax.conv_general_dilated(x_BxCxL, w_OxCxW, (1,), "SAME")
    compiled = compile_on(devices, conv, (4, 128, 16), (128, 128, 5))
    assert hlo_analysis.analyse(compiled.as_text())["flops"] == 2 * 4 * 128 * 128 * (16 * 5 - 3 - 3)


def test_a_kernel_whose_metadata_breaks_its_line_hides_nothing_after_it(tpu_devices):
    """The splash attention kernel's custom call carries metadata with a line break, its next
    line starting "}}": read as the end of the loop body, it hid every op after the kernel.
    Each of 5 trips: the kernel (which states no cost) and then a 512 x 256 x 256 matmul."""
    mesh = jax.sharding.Mesh(np.array(tpu_devices("v5p-8")[:1]), ("x",))

    def layers(w_ZxZ, x_BxSxHxZ):
        def layer(x, _):
            y = flash.causal(x, x[:, :, :1], x[:, :, :1], platform="tpu")
            return jnp.einsum("bshz,zy->bshy", y, w_ZxZ), None
        return jax.lax.scan(layer, x_BxSxHxZ, None, length=5)[0]

    step = jax.shard_map(layers, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)
    text = jax.jit(step).lower(jax.ShapeDtypeStruct((256, 256), jnp.bfloat16),
                               jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.bfloat16)).compile().as_text()
    assert any(line.startswith("}}") for line in text.splitlines())  # the break is there
    assert hlo_analysis.analyse(text)["flops"] == 5 * 2 * 512 * 256 * 256


def test_collectives_inside_a_loop_count_each_trip():
    devices = jax.devices()[:8]

    def step(x_TxD):
        def body(x, _):
            total = jax.lax.psum(x, "x")
            gathered = jax.lax.all_gather(x, "x", tiled=True)
            return total * 0.5 + gathered[:x.shape[0]], None
        return jax.lax.scan(body, x_TxD, None, length=3)[0]

    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    f = jax.shard_map(step, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    compiled = compile_on(devices, f, (64, 128), spec=P("x"), dtype=jnp.float32)
    c = hlo_analysis.analyse(compiled.as_text())["collectives"]
    assert (c["all-reduce"]["count"], c["all-reduce"]["bytes"]) == (3, 3 * 8 * 128 * 4)  # 8 rows a device
    gather = c["all-gather"]
    assert (gather["count"], gather["bytes"], gather["largest"]) == (3, 3 * 64 * 128 * 4, 64 * 128 * 4)
    # Sent per device over the interconnect, in groups of 8: an all-reduce's 8 x 128 floats
    # twice over (reduce-scatter then all-gather), the gather's 64 x 128, each times 7 / 8.
    assert c["all-reduce"]["sent_bytes"] == 3 * 2 * 8 * 128 * 4 * 7 // 8
    assert gather["sent_bytes"] == 3 * 64 * 128 * 4 * 7 // 8


def test_hbm_bytes_count_slices_of_stacked_weights_and_in_place_updates(tpu_devices):
    """A scan over 8 stacked weight matrices that writes each trip's result into one row of a
    (donated) buffer: each trip reads its own 512 x 512 slice and x, and writes x and one buffer
    row, not the whole stack or buffer (8 x 8 x 0.5 MiB read if slices were not told apart)."""
    layers, k, m = 8, 512, 128

    def f(w_LxKxK, x_MxK, buf_LxMxK):
        def body(carry, w_KxK):
            x, buf, i = carry
            x = jnp.tanh(x @ w_KxK)
            return (x, jax.lax.dynamic_update_index_in_dim(buf, x, i, 0), i + 1), None
        return jax.lax.scan(body, (x_MxK, buf_LxMxK, 0), w_LxKxK)[0][:2]

    compiled = compile_on(tpu_devices("v5e-1"), f, (layers, k, k), (m, k), (layers, m, k), donate=(2,))
    found = hlo_analysis.analyse(compiled.as_text())
    per_trip = (k * k + m * k + m * k + 2 * m * k) * 2  # w slice, x in, x out, the row read and written
    # Above it: the copies of x between memory spaces the TPU compiler adds (a quarter more here).
    assert layers * per_trip <= found["hbm_bytes"] <= 1.5 * layers * per_trip


@pytest.mark.parametrize("attrs,size", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", 4),  # listed
    ("replica_groups=[2,4]<=[8], to_apply=%add", 4),  # iota: 2 groups of 4
    ("replica_groups=mesh['data'=2,'fsdp'=2,'expert'=4] {'fsdp','expert'}, use_global_device_ids=true", 8),
    ("channel_id=1, to_apply=%add", 0),  # none written: every device
])
def test_replica_group_sizes_in_each_form_xla_writes(attrs, size):
    assert hlo_analysis._group_size(attrs) == size


# XLA:TPU's form of a reduce-scatter inside the model's loops (written here after the fusions
# it emitted for the fsdp gradients of the expert pool): an all-reduce, sliced to the device's
# share by its partition id.
FUSED_REDUCE_SCATTER = """
%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: f32[128,256]) -> f32[32,256] {
  %input.1 = f32[128,256]{1,0} parameter(0)
  %all-reduce.1 = f32[128,256]{1,0} all-reduce(%input.1), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%region_add
  %constant.1 = u32[] constant(0)
  %partition-id.1 = u32[] partition-id()
  %constant.2 = u32[] constant(32)
  %multiply.1 = u32[] multiply(%partition-id.1, %constant.2)
  ROOT %dynamic-slice.1 = f32[32,256]{1,0} dynamic-slice(%all-reduce.1, %multiply.1, %constant.1), dynamic_slice_sizes={32,256}
}

ENTRY %main (p: f32[128,256]) -> f32[32,256] {
  %p = f32[128,256]{1,0} parameter(0)
  ROOT %fusion.1 = f32[32,256]{1,0} fusion(%p), kind=kCustom, calls=%all-reduce-scatter.1
}
"""


def test_a_fused_reduce_scatter_counts_as_one_not_as_its_all_reduce():
    """Its result is the device's 32 x 256 share; it sends 3 / 4 of its 128 x 256 operand (a
    reduce-scatter in 4), where an all-reduce would send twice that."""
    c = hlo_analysis.analyse(FUSED_REDUCE_SCATTER)["collectives"]
    assert set(c) == {"reduce-scatter"}
    assert (c["reduce-scatter"]["count"], c["reduce-scatter"]["bytes"]) == (1, 32 * 256 * 4)
    assert c["reduce-scatter"]["sent_bytes"] == 128 * 256 * 4 * 3 // 4


def test_an_all_reduce_on_tpu7x_sparsecores_is_counted(tpu_devices):
    """XLA:TPU runs a TPU7x psum on the SparseCores, as an asynchronous call of a computation
    whose root is the all-reduce: it counts as one all-reduce of the 1,024 x 256 floats, which
    each of the 8 devices sends twice over, times 7 / 8. HBM: the all-reduce reads and writes
    its 1 MiB, and a copy of the result does the same; the call's own ops add nothing (libtpu
    0.0.50's call-update, whose tuple holds the operand and the result, read as 3 MiB more)."""
    devices = tpu_devices("tpu7x-8")
    compiled = compile_on(devices, jax.shard_map(
        lambda x: jax.lax.psum(x, "x"), mesh=jax.sharding.Mesh(np.array(devices), ("x",)),
        in_specs=P(), out_specs=P(), check_vma=False), (1024, 256), dtype=jnp.float32)
    text = compiled.as_text()
    assert "call-start(" in text and 'async_execution_thread="sparsecore"' in text  # the form read here
    step = hlo_analysis.analyse(text)
    c = step["collectives"]
    assert (c["all-reduce"]["count"], c["all-reduce"]["bytes"]) == (1, 1024 * 256 * 4)
    assert c["all-reduce"]["sent_bytes"] == 2 * 1024 * 256 * 4 * 7 // 8
    assert 4 * 2 ** 20 <= step["hbm_bytes"] <= 4 * 2 ** 20 + 64  # a few scalars besides


def test_traffic_between_slices_is_counted_apart(tpu_devices):
    """A reduce-scatter over the 16 chips of two v5e-8 slices: each chip's 1,024 x 256 floats
    are reduced within its slice, and its eighth of them (128 KiB) crosses to the other slice
    through the data-centre network's runtime, counted under CROSS_SLICE, not as ICI traffic."""
    devices = tpu_devices("2xv5e-8")
    compiled = compile_on(devices, jax.shard_map(
        lambda x: jax.lax.psum_scatter(x, "x", tiled=True), mesh=jax.sharding.Mesh(np.array(devices), ("x",)),
        in_specs=P(None), out_specs=P("x")), (16 * 64, 256), dtype=jnp.float32)
    c = hlo_analysis.analyse(compiled.as_text())["collectives"]
    crossing = c[hlo_analysis.CROSS_SLICE]
    assert crossing["count"] >= 1 and crossing["sent_bytes"] == 16 * 64 * 256 * 4 // 8
    assert hlo_analysis.CROSS_SLICE not in hlo_analysis.KINDS
