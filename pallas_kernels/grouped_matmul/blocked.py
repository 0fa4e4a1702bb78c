"""A dropless grouped matmul as a loop over row blocks, in plain XLA ops: fast on CPU.

Each group's rows (contiguous, as the rows are sorted by group) are cut into blocks of `block`
rows; a group's last block is partial. A loop runs over the blocks in use, and nothing else:
each iteration slices its block's rows from the input in place, multiplies them by its group's
weights, and writes back only the rows of that group. There is no padded copy of the rows and
no gathered copy of the weights, and the trip count is the number of blocks holding rows,
sum_e ceil(rows_e / block), at most ceil(M / block) + E: padding is bounded by the rows each
group has, not by the pool. Every matmul is a whole (block, I) x (I, O) one, which XLA:CPU
runs at the speed of a dense matmul of that size.

The gradient is written out (a custom VJP) as two more loops of the same shape: dlhs with the
weights transposed, and drhs accumulating each block's lhs^T dout into its group's slot. Both
touch only the blocks in use; neither scatters.

On GPU and TPU a fused kernel (tokamax, Mosaic) is the better choice; this is what `auto`
picks on CPU, where `jax.lax.ragged_dot` computes every group for every row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def default_block(num_rows: int, num_groups: int) -> int:
    """A power of two near half the mean rows per group, between 16 and 128: small enough that
    a group's partial last block wastes little, large enough that the matmuls stay efficient
    and the loop short (benchmarks/RESULTS.md)."""
    half_mean = max(1, num_rows // (2 * num_groups))
    return int(min(128, max(16, 1 << (half_mean.bit_length() - 1))))


def grouped_matmul(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array,
                   block: int | None = None, preferred_element_type=None) -> jax.Array:
    m = lhs_MxI.shape[0]
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs_MxI, rhs_ExIxO))
    if m == 0:
        return jnp.zeros((0, rhs_ExIxO.shape[2]), out_dtype)
    block = min(m, block or default_block(m, rhs_ExIxO.shape[0]))
    # Inside shard_map, both operands made to vary over the same mesh axes: the custom VJP's
    # cotangents then have their operands' types, and the sum of a gradient over the axes its
    # operand did not vary over (data-parallel weights) is JAX's, the transpose of this broadcast.
    lhs_MxI = lhs_MxI + jax.lax.full_like(rhs_ExIxO, 0, lhs_MxI.dtype, ())
    rhs_ExIxO = rhs_ExIxO + jax.lax.full_like(lhs_MxI, 0, rhs_ExIxO.dtype, ())
    return _grouped(lhs_MxI, rhs_ExIxO, group_sizes_E.astype(jnp.int32), block, out_dtype)


class _Blocks:
    """The blocks in use, in row order: block w belongs to group `group_W[w]` and covers rows
    first_W[w] to end_W[w] - 1 (fewer than `block` for a group's last one); `count` of them."""

    def __init__(self, group_sizes_E: jax.Array, num_rows: int, block: int):
        e = group_sizes_E.shape[0]
        blocks_E = -(-group_sizes_E // block)
        block_ends_E = jnp.cumsum(blocks_E)
        row_starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
        w = jnp.arange(-(-num_rows // block) + e)  # a static bound on the blocks in use
        group_W = jnp.minimum(jnp.searchsorted(block_ends_E, w, side="right"), e - 1)
        index_in_group_W = w - (block_ends_E - blocks_E)[group_W]
        self.group_W = group_W
        self.first_W = row_starts_E[group_W] + index_in_group_W * block
        self.end_W = jnp.minimum(self.first_W + block, row_starts_E[group_W] + group_sizes_E[group_W])
        self.count = block_ends_E[-1]
        self.num_rows, self.block = num_rows, block

    def window(self, w):
        """Block w's window of `block` rows (moved back at the end of the array, as
        dynamic_slice clamps), its group, and which of its rows are the block's own."""
        start = jnp.minimum(self.first_W[w], self.num_rows - self.block)
        rows_C = start + jnp.arange(self.block)
        return start, self.group_W[w], (rows_C >= self.first_W[w]) & (rows_C < self.end_W[w])


def _rowwise(lhs_MxI, rhs_ExIxO, blocks: _Blocks, out_dtype, transpose_rhs: bool = False):
    """out[rows of block w] = lhs[those rows] @ rhs[group of w] (or its transpose)."""
    width_out = rhs_ExIxO.shape[1 if transpose_rhs else 2]

    def body(w, out_MxO):
        start, group, own_C = blocks.window(w)
        lhs_CxI = jax.lax.dynamic_slice_in_dim(lhs_MxI, start, blocks.block)
        rhs_IxO = jax.lax.dynamic_index_in_dim(rhs_ExIxO, group, keepdims=False)
        if transpose_rhs:
            rhs_IxO = rhs_IxO.T
        new_CxO = jnp.matmul(lhs_CxI, rhs_IxO, preferred_element_type=out_dtype)
        old_CxO = jax.lax.dynamic_slice_in_dim(out_MxO, start, blocks.block)
        merged_CxO = jnp.where(own_C[:, None], new_CxO, old_CxO)
        return jax.lax.dynamic_update_slice_in_dim(out_MxO, merged_CxO, start, 0)

    zeros = _zeros((blocks.num_rows, width_out), out_dtype, lhs_MxI)  # rows past the groups stay 0
    return jax.lax.fori_loop(0, blocks.count, body, zeros)


def _weight_gradient(lhs_MxI, dout_MxO, num_groups: int, blocks: _Blocks):
    """drhs[e] = sum over e's rows of lhs^T dout, accumulated in float32."""

    def body(w, drhs_ExIxO):
        start, group, own_C = blocks.window(w)
        lhs_CxI = jax.lax.dynamic_slice_in_dim(lhs_MxI, start, blocks.block)
        dout_CxO = jnp.where(own_C[:, None], jax.lax.dynamic_slice_in_dim(dout_MxO, start, blocks.block), 0)
        update_IxO = jnp.matmul(lhs_CxI.T, dout_CxO, preferred_element_type=jnp.float32)
        current_IxO = jax.lax.dynamic_index_in_dim(drhs_ExIxO, group, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(drhs_ExIxO, current_IxO + update_IxO, group, 0)

    zeros = _zeros((num_groups, lhs_MxI.shape[1], dout_MxO.shape[1]), jnp.float32, lhs_MxI)
    return jax.lax.fori_loop(0, blocks.count, body, zeros)


def _zeros(shape, dtype, like):
    """Zeros to accumulate into, varying over the shard_map axes `like` varies over (a loop's
    carry keeps its type)."""
    return jax.lax.full_like(like, 0, dtype, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(lhs_MxI, rhs_ExIxO, group_sizes_E, block, out_dtype):
    return _rowwise(lhs_MxI, rhs_ExIxO, _Blocks(group_sizes_E, lhs_MxI.shape[0], block), out_dtype)


def _grouped_fwd(lhs_MxI, rhs_ExIxO, group_sizes_E, block, out_dtype):
    return _grouped(lhs_MxI, rhs_ExIxO, group_sizes_E, block, out_dtype), (lhs_MxI, rhs_ExIxO, group_sizes_E)


def _grouped_bwd(block, out_dtype, residuals, dout_MxO):
    lhs_MxI, rhs_ExIxO, group_sizes_E = residuals
    blocks = _Blocks(group_sizes_E, lhs_MxI.shape[0], block)
    dlhs_MxI = _rowwise(dout_MxO, rhs_ExIxO, blocks, lhs_MxI.dtype, transpose_rhs=True)
    drhs_ExIxO = _weight_gradient(lhs_MxI, dout_MxO, rhs_ExIxO.shape[0], blocks).astype(rhs_ExIxO.dtype)
    return dlhs_MxI, drhs_ExIxO, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
