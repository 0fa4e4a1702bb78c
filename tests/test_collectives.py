"""ragged_all_to_all: the CPU emulation against a NumPy model of the op written from its
documented semantics (4 simulated devices, two slices per destination, ragged sizes, gaps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rexmoe_jax.model import collectives

E, SLICES, ROWS, OUT_ROWS, D = 4, 2, 24, 28, 3  # devices, slices per destination, operand/output rows


def numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """Per-device lists in, per-device results out: each sender's slice i lands on device
    i // SLICES at the offset the sender chose; recv_sizes must match what arrives."""
    results = [out.copy() for out in outputs]
    devices = len(operands)
    for sender in range(devices):
        for i in range(devices * SLICES):
            receiver, size = i // SLICES, send_sizes[sender][i]
            assert recv_sizes[receiver][sender * SLICES + i % SLICES] == size
            start, at = input_offsets[sender][i], output_offsets[sender][i]
            results[receiver][at:at + size] = operands[sender][start:start + size]
    return results


def random_case(seed, devices=E):
    """Ragged slices with gaps on both sides: each receiver's incoming slices are placed in a
    random order, with random space between them."""
    rng = np.random.default_rng(seed)
    send = rng.integers(0, 3, size=(devices, devices * SLICES))  # up to 2 rows per slice

    def place(sizes):
        """Offsets of slices laid out in a random order, with a gap of 0 or 1 row before each."""
        offsets, at = np.zeros(len(sizes), np.int64), 0
        for n in rng.permutation(len(sizes)):
            at += rng.integers(0, 2)
            offsets[n], at = at, at + sizes[n]
        return offsets

    input_offsets = np.stack([place(send[s]) for s in range(devices)])
    output_offsets, recv = np.zeros_like(send), np.zeros_like(send)
    for r in range(devices):
        incoming = [(s, r * SLICES + j) for s in range(devices) for j in range(SLICES)]  # (sender, slice)
        for (s, i), at in zip(incoming, place([send[s, i] for s, i in incoming])):
            output_offsets[s, i] = at
            recv[r, s * SLICES + i % SLICES] = send[s, i]
    operands = rng.standard_normal((devices, ROWS, D)).astype(np.float32)
    outputs = rng.standard_normal((devices, OUT_ROWS, D)).astype(np.float32)  # untouched rows keep these
    return operands, outputs, *(a.astype(np.int32) for a in (input_offsets, send, output_offsets, recv))


def run_on_devices(case, implementation, wrap=lambda f: f):
    """The op on one device per row of each case array, over a mesh axis "x"."""
    devices = len(case[0])
    mesh = jax.make_mesh((devices,), ("x",), devices=jax.devices()[:devices])

    def per_device(operand, output, *offsets_and_sizes):
        squeezed = [a[0] for a in (operand, output, *offsets_and_sizes)]
        return collectives.ragged_all_to_all(*squeezed, axis_name="x", implementation=implementation)[None]

    run = wrap(jax.shard_map(per_device, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x")))
    split = jax.sharding.NamedSharding(mesh, P("x"))
    return np.asarray(run(*(jax.device_put(a, split) for a in case)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulation_matches_the_numpy_model(seed, maybe_jit):
    case = random_case(seed)
    got, want = run_on_devices(case, "emulated", maybe_jit), numpy_ragged_all_to_all(*case)
    for device in range(E):
        np.testing.assert_array_equal(got[device], want[device])


def test_auto_is_the_emulation_on_cpu_and_shapes_are_checked():
    assert collectives.resolve("auto") == "emulated" and collectives.resolve("native") == "native"
    sizes = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="one length"):
        collectives.ragged_all_to_all(jnp.zeros((3, 2)), jnp.zeros((3, 2)), sizes, sizes, sizes, sizes[:2],
                                      axis_name="x")
