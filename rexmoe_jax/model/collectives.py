"""`ragged_all_to_all` on every backend: the dropless expert-parallel exchange (expert_parallel.py)
sends each device exactly its rows, and XLA:CPU does not implement the op.

Semantics (those of `jax.lax.ragged_all_to_all`), inside shard_map over `axis_name` of n
devices, with E slices (buckets of rows; E a multiple of n, s = E / n slices per destination),
from an operand of M rows into an output of Y rows:

    slice i of the operand, operand[input_offsets[i] : input_offsets[i] + send_sizes[i]], goes
    to device i // s, which writes it into its output at rows output_offsets[i] onwards: the
    offset in the receiver's buffer, chosen by the sender. On the receiver, recv_sizes[j] is the
    size of incoming slice j: slice (me * s + j % s) of device j // s. Output rows no slice
    lands on keep the values of `output`.

Implementations: "native" is the op (GPU, TPU); "emulated" pads every slice to the operand's
length, moves them with an ordinary all_to_all and scatters them into place (E x M rows
moved, so only for CPU and tests); "auto" is native except on CPU (the platform of
the current mesh's devices, sharding.platform). Both are differentiable
(the op's transpose is the op with the roles of sender and receiver swapped).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from rexmoe_jax import sharding

Implementation = Literal["auto", "native", "emulated"]


def resolve(implementation: Implementation) -> str:
    """The concrete implementation "auto" stands for on the current mesh's platform."""
    if implementation != "auto":
        return implementation
    return "emulated" if sharding.platform() == "cpu" else "native"


def _emulated(operand_MxD, output_YxD, input_offsets_E, send_sizes_E, output_offsets_E, recv_sizes_E,
              axis_name):
    rows = operand_MxD.shape[0]
    trailing = (1,) * (operand_MxD.ndim - 1)
    r_1xM = jnp.arange(rows)[None, :]
    # Slice i padded to the operand's length, so that a fixed-size all_to_all can carry any slice.
    source_ExM = jnp.minimum(input_offsets_E[:, None] + r_1xM, rows - 1)
    sent_ExM = r_1xM < send_sizes_E[:, None]
    send_ExMxD = jnp.where(sent_ExM.reshape(sent_ExM.shape + trailing), operand_MxD[source_ExM], 0)
    recv_ExMxD = jax.lax.all_to_all(send_ExMxD, axis_name, 0, 0, tiled=True)
    # Where each incoming slice goes: the offsets its sender chose for this device.
    offsets_E = jax.lax.all_to_all(output_offsets_E, axis_name, 0, 0, tiled=True)
    target_ExM = jnp.where(r_1xM < recv_sizes_E[:, None], offsets_E[:, None] + r_1xM, output_YxD.shape[0])
    return output_YxD.at[target_ExM.reshape(-1)].set(
        recv_ExMxD.reshape(-1, *operand_MxD.shape[1:]), mode="drop")  # padding targets past the end


def ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array, send_sizes: jax.Array,
                      output_offsets: jax.Array, recv_sizes: jax.Array, *, axis_name: str,
                      implementation: Implementation = "auto") -> jax.Array:
    """See the module doc. Offsets and sizes are int32 vectors of one length E. The op types its
    result like `output`, so inside shard_map make `output` from the operand (jnp.zeros_like(
    operand, shape=...)): a buffer from jnp.zeros is typed as equal on every device, which the
    received rows are not."""
    lengths = {a.shape for a in (input_offsets, send_sizes, output_offsets, recv_sizes)}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"offsets and sizes must be vectors of one length; got shapes {sorted(lengths)}")
    if operand.shape[1:] != output.shape[1:] or operand.dtype != output.dtype:
        raise ValueError(f"operand {operand.shape} {operand.dtype} and output {output.shape} {output.dtype} "
                         "must agree past the first axis and in dtype")
    implementation = resolve(implementation)
    if implementation == "native":
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                         recv_sizes, axis_name=axis_name)
    if implementation == "emulated":
        return _emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name)
    raise ValueError(f"unknown ragged_all_to_all implementation {implementation!r}; "
                     "expected auto, native or emulated")
