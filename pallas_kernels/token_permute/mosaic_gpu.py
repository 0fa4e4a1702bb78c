"""Permute and combine as Mosaic GPU kernels (TMA, Hopper and newer; GPU interpret mode on CPU).

The same three row gathers as the Mosaic TPU kernels in pallas.py, behind the same custom VJP,
so that forward and backward passes are gathers by a permutation or its inverse (no scatter, no
atomics):

    gather_rows     out[a]    = scale[a] * src[idx[a]]                 permute (no scale); combine's dy
    gather_combine  out[t]    = sum_k w[t, k] * src[idx[t K + k]]      combine; permute's dx (no w)
    gather_dot      out[t, k] = <dy[t], src[idx[t K + k]]>             combine's d gates

How a kernel runs. The output rows are cut into W blocks of C rows, a block gathering C x fan-in
source rows (fan-in K, or 1 for gather_rows). Each CUDA block (CTA) owns a contiguous run of
blocks. It copies the run's indices (and weights) into SMEM once, then walks its blocks through
two row slots: the rows of block j + 1 are in flight into one slot while block j is computed
from the other and TMA-stored. A row gather cannot be one tiled TMA copy (Hopper has no TMA
gather, and Blackwell's 4-row gather is not used here), so every source row is its own bulk
copy (a contiguous row, hence `cp.async.bulk` without a descriptor or the 256-element box
limit), all the rows of a block arriving on one barrier. Register work goes one row at a time,
a row being one vector spread over the warpgroup's 128 threads: on a GPU the width D must be a
multiple of 128 (interpret mode takes any D whose row is a whole number of 16-byte units).

`interpret`: False on a GPU; True, or `interpret_params(...)`, runs a kernel in GPU interpret
mode on the CPU (jax >= 0.12), with blocks of 4 rows over two CTAs so that test sizes go through
the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.token_permute.gather_vjp import RowGathers, permute_and_combine

_GRID = "cta"
_SLOTS = 2  # Row slots per CTA: block j + 1 is fetched while block j is computed.
# Bytes of gathered rows per slot: two slots of 32 KiB and the output block leave room for two
# CTAs on one H100 SM (228 KiB of SMEM), each keeping a block in flight.
_SLOT_BYTES = 32 * 1024
_MAX_CTAS = 2 * 132  # Two per SM of an H100 SXM; more only adds per-CTA set-up.
_MAX_BLOCK = 64
ROW_ALIGN = 128  # On a GPU a row is one vector over a warpgroup's 128 threads.
_IN_BOUNDS = plgpu.OOBFillMode.PROMISE_IN_BOUNDS  # Indices are permutations: never out of bounds.


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static layout of one call: W blocks of C output rows over a grid of CTAs."""

    rows: int  # Output rows: T tokens, or A sorted rows.
    fan_in: int  # Source rows per output row: K, or 1.
    block: int  # C.
    ctas: int
    steps: int  # Blocks per CTA; the last CTA may own fewer.

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block)

    @property
    def gathered(self) -> int:  # Source rows fetched per block.
        return self.block * self.fan_in

    @property
    def meta(self) -> int:  # Index (or weight) entries per block: TMA moves whole 16-byte units.
        return -(-self.gathered // 4) * 4

    @property
    def tail(self) -> int:  # Output rows of the last block.
        return self.rows - (self.blocks - 1) * self.block


def _plan(rows: int, fan_in: int, row_bytes: int, interpret: bool) -> _Plan:
    if interpret:  # Test sizes then take several steps per CTA, a tail block and an uneven split.
        block, ctas = 4, 2
    else:
        block, ctas = max(1, min(_MAX_BLOCK, _SLOT_BYTES // (fan_in * row_bytes))), _MAX_CTAS
    blocks = -(-rows // block)
    steps = -(-blocks // min(ctas, blocks))
    return _Plan(rows, fan_in, block, -(-blocks // steps), steps)


def _per_block(values_A, plan: _Plan, dtype):
    """(ctas * steps, meta): block b's entries in row b, padded with zeros (index 0 is a valid row)."""
    padded = jnp.pad(values_A.astype(dtype), (0, plan.ctas * plan.steps * plan.gathered - values_A.shape[0]))
    return jnp.pad(padded.reshape(-1, plan.gathered), ((0, 0), (0, plan.meta - plan.gathered)))


def _check_width(src, interpret):
    if src.shape[1] * src.dtype.itemsize % 16:
        raise ValueError(f"rows of {src.shape[1]} x {src.dtype} are not whole 16-byte units, which TMA moves")
    if not interpret and src.shape[1] % ROW_ALIGN:
        raise ValueError(f"on a GPU the Mosaic GPU token permute needs a width that is a multiple of 128 "
                         f"(one row is one vector over a warpgroup); got {src.shape[1]}")


# Pieces of a kernel body, run by every CTA.

def _stage_meta(plan: _Plan, metas_gmem, metas_smem, barrier):
    """Copies this CTA's run of per-block indices and weights into SMEM, and waits for them."""
    first = jax.lax.axis_index(_GRID) * plan.steps
    for meta_gmem, meta_smem in zip(metas_gmem, metas_smem):
        plgpu.copy_gmem_to_smem(meta_gmem.at[pl.ds(first, plan.steps)], meta_smem, barrier,
                                oob_mode=_IN_BOUNDS)
    plgpu.barrier_wait(barrier)


def _fetch_rows(src_gmem, idx_smem, step, rows_smem, barrier):
    """Starts the copies rows[r] = src[idx[step, r]] for every row of the slot, on one barrier."""
    def start(r, _):
        plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(idx_smem[step, r], 1)], rows_smem.at[pl.ds(r, 1)], barrier,
                                oob_mode=_IN_BOUNDS)

    jax.lax.fori_loop(0, rows_smem.shape[0], start, None)


def _walk_blocks(plan: _Plan, fetch, finish):
    """This CTA's blocks in a two-slot pipeline: fetch(j, slot) starts block j's copies into a
    slot; finish(j, slot) waits for them, computes and starts block j's store."""
    count = jnp.minimum(plan.steps, plan.blocks - jax.lax.axis_index(_GRID) * plan.steps)
    fetch(0, 0)

    def step(j, carry):
        slot = j % _SLOTS
        # The store of block j - 1 has read its SMEM: its slot (and the output block) may be refilled.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(j + 1 < count)
        def _():
            fetch(j + 1, 1 - slot)

        finish(j, slot)
        return carry

    jax.lax.fori_loop(0, count, step, None)
    plgpu.wait_smem_to_gmem(0)  # Every store has landed before the kernel ends.


def _store_rows(plan: _Plan, out_smem, out_gmem, step):
    """Starts the TMA store of a block's C output rows; of the last block, only its rows < T."""
    block = jax.lax.axis_index(_GRID) * plan.steps + step
    if plan.tail == plan.block:
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(block * plan.block, plan.block)])
        return

    @pl.when(block < plan.blocks - 1)
    def _():
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(block * plan.block, plan.block)])

    @pl.when(block == plan.blocks - 1)
    def _():
        plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, plan.tail)],
                                out_gmem.at[pl.ds(block * plan.block, plan.tail)])


def _fetch_block(plan: _Plan, src_gmem, step, dst_smem, barrier):
    """Starts the copy of a block's C rows of a (T, D) operand (of the last block, its rows < T;
    the rest of the slot keeps stale rows whose results are cut off): one arrival either way."""
    block = jax.lax.axis_index(_GRID) * plan.steps + step
    if plan.tail == plan.block:
        plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(block * plan.block, plan.block)], dst_smem, barrier,
                                oob_mode=_IN_BOUNDS)
        return

    @pl.when(block < plan.blocks - 1)
    def _():
        plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(block * plan.block, plan.block)], dst_smem, barrier,
                                oob_mode=_IN_BOUNDS)

    @pl.when(block == plan.blocks - 1)
    def _():
        plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(block * plan.block, plan.tail)],
                                dst_smem.at[pl.ds(0, plan.tail)], barrier, oob_mode=_IN_BOUNDS)


def _each_row(count: int, body):
    """body(r) for r < count, as a loop (not unrolled: one row is already a whole vector op)."""
    def step(r, carry):
        body(r)
        return carry

    jax.lax.fori_loop(0, count, step, None)


def interpret_params(*, detect_races: bool = False):
    """GPU interpret mode with zeroed memory; with detect_races, a data race between the threads
    and the simulated TMA unit raises (the tests check the pipeline's waits that way)."""
    if not hasattr(plgpu, "InterpretGPUParams"):
        raise NotImplementedError(f"GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12; "
                                  f"this is jax {jax.__version__}")
    return plgpu.InterpretGPUParams(uninitialized_memory="zero", detect_races=detect_races)


def _call(plan: _Plan, body, operands, out_shape, interpret):
    """Runs body on a grid of CTAs: on the GPU, or in GPU interpret mode (True, or the parameters
    from interpret_params)."""
    if interpret is True:
        interpret = interpret_params()
    kernel = plgpu.kernel(body, out_type=out_shape, grid=(plan.ctas,), grid_names=(_GRID,),
                          interpret=interpret or None)
    return kernel(*operands)


def _slots(plan: _Plan, metas_gmem, src_gmem, arrivals: int):
    """The SMEM every kernel has: its run of indices and weights with their barrier, and the row
    slots with one barrier each (`arrivals` copies per block)."""
    return ([plgpu.SMEM((plan.steps, plan.meta), meta.dtype) for meta in metas_gmem],
            plgpu.Barrier(num_arrivals=len(metas_gmem)),
            plgpu.SMEM((_SLOTS, plan.gathered, src_gmem.shape[1]), src_gmem.dtype),
            plgpu.Barrier(num_arrivals=arrivals, num_barriers=_SLOTS))


# The kernels.

def gather_rows(src_TxD, idx_A, scale_A=None, *, interpret=False):
    """out[a] = scale[a] * src[idx[a]] (scale in float32; without one, a plain copy), shape (A, D)."""
    _check_width(src_TxD, interpret)
    a, d = idx_A.shape[0], src_TxD.shape[1]
    plan = _plan(a, 1, d * src_TxD.dtype.itemsize, interpret)
    metas = [_per_block(idx_A, plan, jnp.int32)]
    if scale_A is not None:
        metas.append(_per_block(scale_A, plan, jnp.float32))
    body = functools.partial(_gather_rows_body, plan)
    return _call(plan, body, (*metas, src_TxD), jax.ShapeDtypeStruct((a, d), src_TxD.dtype), interpret)


def _gather_rows_body(plan: _Plan, *refs):
    *metas_gmem, src_gmem, out_gmem = refs
    scaled = len(metas_gmem) == 2

    def scoped(metas_smem, meta_barrier, rows_smem, row_barriers, *out_smem):
        _stage_meta(plan, metas_gmem, metas_smem, meta_barrier)

        def fetch(j, slot):
            _fetch_rows(src_gmem, metas_smem[0], j, rows_smem.at[slot], row_barriers.at[slot])

        def scale(j, slot, r):
            row = rows_smem[slot, r].astype(jnp.float32) * metas_smem[1][j, r]
            out_smem[0][r] = row.astype(src_gmem.dtype)

        def finish(j, slot):
            plgpu.barrier_wait(row_barriers.at[slot])
            if not scaled:  # A plain gather: the rows go back out from the slot they arrived in.
                _store_rows(plan, rows_smem.at[slot], out_gmem, j)
                return
            _each_row(plan.block, functools.partial(scale, j, slot))
            plgpu.commit_smem()  # The threads' writes become visible to the TMA store.
            _store_rows(plan, out_smem[0], out_gmem, j)

        _walk_blocks(plan, fetch, finish)

    out = [plgpu.SMEM((plan.block, src_gmem.shape[1]), src_gmem.dtype)] if scaled else []
    pl.run_scoped(scoped, *_slots(plan, metas_gmem, src_gmem, plan.gathered), *out)


def gather_combine(src_AxD, idx_A, weights_TxK=None, *, top_k: int, interpret=False):
    """out[t] = sum_k w[t, k] * src[idx[t K + k]] accumulated in float32 (without weights, a plain
    sum over k), shape (T, D)."""
    _check_width(src_AxD, interpret)
    t, d = idx_A.shape[0] // top_k, src_AxD.shape[1]
    plan = _plan(t, top_k, d * src_AxD.dtype.itemsize, interpret)
    metas = [_per_block(idx_A, plan, jnp.int32)]
    if weights_TxK is not None:
        metas.append(_per_block(weights_TxK.reshape(-1), plan, jnp.float32))
    body = functools.partial(_gather_combine_body, plan)
    return _call(plan, body, (*metas, src_AxD), jax.ShapeDtypeStruct((t, d), src_AxD.dtype), interpret)


def _gather_combine_body(plan: _Plan, *refs):
    *metas_gmem, src_gmem, out_gmem = refs
    weighted, k = len(metas_gmem) == 2, plan.fan_in

    def scoped(metas_smem, meta_barrier, rows_smem, row_barriers, out_smem):
        _stage_meta(plan, metas_gmem, metas_smem, meta_barrier)

        def fetch(j, slot):
            _fetch_rows(src_gmem, metas_smem[0], j, rows_smem.at[slot], row_barriers.at[slot])

        def combine(j, slot, t):
            total = None
            for i in range(k):  # K is small and static: unrolled, summed in order k = 0, 1, ...
                row = rows_smem[slot, t * k + i].astype(jnp.float32)
                if weighted:
                    row = row * metas_smem[1][j, t * k + i]
                total = row if total is None else total + row
            out_smem[t] = total.astype(out_smem.dtype)

        def finish(j, slot):
            plgpu.barrier_wait(row_barriers.at[slot])
            _each_row(plan.block, functools.partial(combine, j, slot))
            plgpu.commit_smem()
            _store_rows(plan, out_smem, out_gmem, j)

        _walk_blocks(plan, fetch, finish)

    out = plgpu.SMEM((plan.block, src_gmem.shape[1]), src_gmem.dtype)
    pl.run_scoped(scoped, *_slots(plan, metas_gmem, src_gmem, plan.gathered), out)


def gather_dot(src_AxD, idx_A, dy_TxD, top_k: int, *, interpret=False):
    """out[t, k] = <dy[t], src[idx[t K + k]]> in float32, shape (T, K)."""
    _check_width(src_AxD, interpret)
    t, d = dy_TxD.shape
    plan = _plan(t, top_k, d * src_AxD.dtype.itemsize, interpret)
    body = functools.partial(_gather_dot_body, plan)
    # One float32 per gathered row, stored a whole block at a time (padded to 16-byte units).
    out = _call(plan, body, (_per_block(idx_A, plan, jnp.int32), src_AxD, dy_TxD),
                jax.ShapeDtypeStruct((plan.blocks, plan.meta), jnp.float32), interpret)
    return out[:, :plan.gathered].reshape(-1)[:t * top_k].reshape(t, top_k)


def _gather_dot_body(plan: _Plan, idx_gmem, src_gmem, dy_gmem, out_gmem):
    k = plan.fan_in

    def scoped(metas_smem, meta_barrier, rows_smem, row_barriers, dy_smem, out_smem):
        _stage_meta(plan, [idx_gmem], metas_smem, meta_barrier)

        def fetch(j, slot):
            _fetch_rows(src_gmem, metas_smem[0], j, rows_smem.at[slot], row_barriers.at[slot])
            _fetch_block(plan, dy_gmem, j, dy_smem.at[slot], row_barriers.at[slot])

        def dot(slot, i):
            products = rows_smem[slot, i].astype(jnp.float32) * dy_smem[slot, i // k].astype(jnp.float32)
            out_smem[i] = jnp.sum(products)

        def finish(j, slot):
            plgpu.barrier_wait(row_barriers.at[slot])
            _each_row(plan.gathered, functools.partial(dot, slot))
            plgpu.commit_smem()
            block = jax.lax.axis_index(_GRID) * plan.steps + j
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[block])

        _walk_blocks(plan, fetch, finish)

    dy = plgpu.SMEM((_SLOTS, plan.block, dy_gmem.shape[1]), dy_gmem.dtype)
    out = plgpu.SMEM((plan.meta,), jnp.float32)
    pl.run_scoped(scoped, *_slots(plan, [idx_gmem], src_gmem, plan.gathered + 1), dy, out)


# The autodiff wrappers (gather_vjp.py): forward and backward are the kernels above.

permute, combine = permute_and_combine(RowGathers(
    lambda src, idx, scale, interpret: gather_rows(src, idx, scale, interpret=interpret),
    lambda src, idx, weights, interpret, *, top_k: gather_combine(src, idx, weights, top_k=top_k,
                                                                  interpret=interpret),
    lambda src, idx, dy, interpret, *, top_k: gather_dot(src, idx, dy, top_k, interpret=interpret)))
