"""Permute and combine as Pallas kernels (Mosaic TPU; TPU interpret mode on CPU for tests).

Every kernel is a row gather: the indices are scalar-prefetched into SMEM, and each grid step
issues one DMA per row it needs, from the source in HBM straight into its VMEM block, then
waits for all of them and finishes the block in VMEM:

    gather_rows     out[i]    = scale[i] * src[idx[i]]                 permute; combine's dy
    gather_combine  out[t]    = sum_k w[t, k] * src[idx[t K + k]]      combine; permute's dx
    gather_dot      out[t, k] = <dy[t], src[idx[t K + k]]>             combine's d gates

so forward and backward are gathers by a permutation or its inverse: no scatter, no atomics.
Row counts that are not a multiple of the block are padded (index 0, weight 0) and cut off.
A block of rows covers whole tiles of the (rows, D) arrays it reads or writes: 8 rows of 32-bit
values, 16 of 16-bit ones (TPU7x tiles a bf16 array in HBM (16, 128) and rejects 8-row blocks
of it), 32 of 8-bit ones; widths that are multiples of 128 run at full speed. A call with
more indices than PREFETCH_INDICES runs as several kernels over runs of rows: a core's SMEM is
1 MiB (v5p), and 262,144 int32 indices (the 2.3B preset's 32,768 tokens x K = 8 on one chip)
fill it, which Mosaic rejects ("Ran out of memory in memory space smem").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.token_permute.gather_vjp import RowGathers, permute_and_combine

# The most indices one kernel scalar-prefetches into SMEM: 512 KiB of int32.
PREFETCH_INDICES = 1 << 17


def block_rows(dtype) -> int:
    """The rows of a block of a (rows, D) array of `dtype`: a TPU tile's sublanes, where values
    narrower than 32 bits pack two or four to a sublane."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


# The most rows a block takes (8-bit values), which every run of rows is a multiple of.
_MOST_BLOCK_ROWS = block_rows(jnp.int8)


def _in_runs(call, per_row: int, *row_major):
    """call(*pieces) over runs of leading rows of the `row_major` arrays, each run holding at
    most PREFETCH_INDICES indices (`per_row` a row), concatenated; one call when all fit."""
    rows = row_major[0].shape[0]
    run = max(PREFETCH_INDICES // per_row // _MOST_BLOCK_ROWS * _MOST_BLOCK_ROWS, _MOST_BLOCK_ROWS)
    if rows <= run:
        return call(*row_major)
    pieces = [call(*(a[start:start + run] for a in row_major)) for start in range(0, rows, run)]
    return jnp.concatenate(pieces)


def _pad_rows(x, multiple):
    rows = -(-x.shape[0] // multiple) * multiple
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _fetch_rows(idx_ref, src_hbm, dst_vmem, sem, first, count):
    """DMA src[idx[first + j]] into dst[j] for j < count, and wait for all of them. Both are
    (rows, 1, D): Mosaic tiles the last two dimensions of a VMEM buffer, and a copy into one
    row of a (rows, D) buffer would start inside a tile, which it rejects; the leading axis of
    a (rows, 1, D) buffer is not tiled."""
    def start(j, _):
        pltpu.make_async_copy(src_hbm.at[pl.ds(idx_ref[first + j], 1)], dst_vmem.at[pl.ds(j, 1)], sem).start()

    def wait(j, _):
        pltpu.make_async_copy(src_hbm.at[pl.ds(0, 1)], dst_vmem.at[pl.ds(j, 1)], sem).wait()

    jax.lax.fori_loop(0, count, start, None)
    jax.lax.fori_loop(0, count, wait, None)


def _varying(*operands):
    """The result's manual-axis type: inside a shard_map that checks it (check_vma, the model's),
    a kernel's output must say which mesh axes it varies over, that is every axis any operand
    varies over. Outside one, None."""
    types = [t for t in (jax.typeof(a).manual_axis_type for a in operands) if t is not None]
    if not types:
        return None
    return type(types[0])(varying=frozenset().union(*(t.varying for t in types)))


def _call(kernel, grid, idx, operands, in_specs, out_spec, out_shape, scratch, interpret):
    spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                        out_specs=out_spec, scratch_shapes=scratch)
    out_shape = jax.ShapeDtypeStruct(out_shape.shape, out_shape.dtype,
                                     manual_axis_type=_varying(idx, *operands))
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=spec,
                          interpret=pltpu.InterpretParams() if interpret else False)(idx, *operands)


def gather_rows(src_MxD, idx_A, scale_A, *, block: int | None = None, interpret: bool = False):
    """out[i] = scale[i] * src[idx[i]] (scale in float32), shape (N, D); `block` rows a grid
    step (default: block_rows of src's dtype)."""
    block = block or block_rows(src_MxD.dtype)
    return _in_runs(lambda idx, scale: _gather_rows(src_MxD, idx, scale, block, interpret), 1, idx_A, scale_A)


def _gather_rows(src_MxD, idx_A, scale_A, block, interpret):
    n, d = idx_A.shape[0], src_MxD.shape[1]
    idx = _pad_rows(idx_A.astype(jnp.int32), block)
    scale = _pad_rows(scale_A.astype(jnp.float32)[:, None], block)

    def kernel(idx_ref, scale_ref, src_hbm, out_ref, rows_vmem, sem):
        _fetch_rows(idx_ref, src_hbm, rows_vmem, sem, pl.program_id(0) * block, block)
        rows = rows_vmem[...].astype(jnp.float32).reshape(block, d)
        out_ref[...] = (rows * scale_ref[...]).astype(out_ref.dtype)

    out = _call(kernel, (idx.shape[0] // block,), idx, (scale, src_MxD[:, None]),
                [pl.BlockSpec((block, 1), lambda i, _: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
                pl.BlockSpec((block, d), lambda i, _: (i, 0)),
                jax.ShapeDtypeStruct((idx.shape[0], d), src_MxD.dtype),
                [pltpu.VMEM((block, 1, d), src_MxD.dtype), pltpu.SemaphoreType.DMA(())], interpret)
    return out[:n]


def gather_combine(src_AxD, idx_A, weights_TxK, *, block: int | None = None, interpret: bool = False):
    """out[t] = sum_k w[t, k] * src[idx[t K + k]], accumulated in float32, shape (T, D); `block`
    rows a grid step (default: block_rows of src's dtype)."""
    t, k = weights_TxK.shape
    block = block or block_rows(src_AxD.dtype)
    return _in_runs(lambda idx, w: _gather_combine(src_AxD, idx.reshape(-1), w, block, interpret), k,
                    idx_A.reshape(t, k), weights_TxK)


def _gather_combine(src_AxD, idx_A, weights_TxK, block, interpret):
    t, k = weights_TxK.shape
    d = src_AxD.shape[1]
    weights = _pad_rows(weights_TxK.astype(jnp.float32), block)
    idx = _pad_rows(idx_A.astype(jnp.int32).reshape(t, k), block).reshape(-1)

    def kernel(idx_ref, w_ref, src_hbm, out_ref, rows_vmem, sem):
        _fetch_rows(idx_ref, src_hbm, rows_vmem, sem, pl.program_id(0) * block * k, block * k)
        rows = rows_vmem[...].astype(jnp.float32).reshape(block, k, d)
        out_ref[...] = jnp.sum(rows * w_ref[...][:, :, None], axis=1).astype(out_ref.dtype)

    out = _call(kernel, (weights.shape[0] // block,), idx, (weights, src_AxD[:, None]),
                [pl.BlockSpec((block, k), lambda i, _: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
                pl.BlockSpec((block, d), lambda i, _: (i, 0)),
                jax.ShapeDtypeStruct((weights.shape[0], d), src_AxD.dtype),
                [pltpu.VMEM((block * k, 1, d), src_AxD.dtype), pltpu.SemaphoreType.DMA(())], interpret)
    return out[:t]


def gather_dot(src_AxD, idx_A, dy_TxD, top_k: int, *, block: int | None = None, interpret: bool = False):
    """out[t, k] = <dy[t], src[idx[t K + k]]> in float32, shape (T, K); `block` rows a grid
    step (default: block_rows of dy's dtype)."""
    t = dy_TxD.shape[0]
    block = block or block_rows(dy_TxD.dtype)
    return _in_runs(lambda idx, dy: _gather_dot(src_AxD, idx.reshape(-1), dy, top_k, block, interpret), top_k,
                    idx_A.reshape(t, top_k), dy_TxD)


def _gather_dot(src_AxD, idx_A, dy_TxD, top_k, block, interpret):
    t, d = dy_TxD.shape
    dy = _pad_rows(dy_TxD, block)
    idx = _pad_rows(idx_A.astype(jnp.int32).reshape(t, top_k), block).reshape(-1)

    def kernel(idx_ref, dy_ref, src_hbm, out_ref, rows_vmem, sem):
        _fetch_rows(idx_ref, src_hbm, rows_vmem, sem, pl.program_id(0) * block * top_k, block * top_k)
        rows = rows_vmem[...].astype(jnp.float32).reshape(block, top_k, d)
        out_ref[...] = jnp.sum(rows * dy_ref[...].astype(jnp.float32)[:, None, :], axis=2)

    out = _call(kernel, (dy.shape[0] // block,), idx, (dy, src_AxD[:, None]),
                [pl.BlockSpec((block, d), lambda i, _: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
                pl.BlockSpec((block, top_k), lambda i, _: (i, 0)),
                jax.ShapeDtypeStruct((dy.shape[0], top_k), jnp.float32),
                [pltpu.VMEM((block * top_k, 1, d), src_AxD.dtype), pltpu.SemaphoreType.DMA(())], interpret)
    return out[:t]


# The autodiff wrappers (gather_vjp.py): forward and backward are the kernels above.

def _rows(src_MxD, idx_A, scale_A, interpret):
    scale_A = jnp.ones(idx_A.shape, jnp.float32) if scale_A is None else scale_A
    return gather_rows(src_MxD, idx_A, scale_A, interpret=interpret)


def _combine(src_AxD, idx_A, weights_TxK, interpret, *, top_k):
    if weights_TxK is None:
        weights_TxK = jnp.ones((idx_A.shape[0] // top_k, top_k), jnp.float32)
    return gather_combine(src_AxD, idx_A, weights_TxK, interpret=interpret)


def _dot(src_AxD, idx_A, dy_TxD, interpret, *, top_k):
    return gather_dot(src_AxD, idx_A, dy_TxD, top_k, interpret=interpret)


permute, combine = permute_and_combine(RowGathers(_rows, _combine, _dot))
