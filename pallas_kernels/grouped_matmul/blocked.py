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

`swiglu` runs a whole SwiGLU expert the same way, as one loop: each block's rows go through
gate, up, silu(gate) * up and down in one iteration, and the gradient is one more loop (six
matmuls per block, gate and up taken from the forward pass). Three matmul loops and their six
backward loops pay the loop's per-block cost (slicing, indexing a weight, merging a window)
nine times; the fused loops pay it twice, and a block's intermediate rows stay small and hot
(benchmarks/RESULTS.md: up to 1.6x faster on this machine's shapes, never slower beyond noise).

On GPU and TPU a fused kernel (tokamax, Mosaic) is the better choice; this is what `auto`
picks on CPU, where `jax.lax.ragged_dot` computes every group for every row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def default_block(num_rows: int, num_groups: int, share: float = 0.5) -> int:
    """A power of two near `share` of the mean rows per group, between 16 and 128: small enough
    that a group's partial last block wastes little, large enough that the matmuls stay
    efficient and the loop short. Half the mean for one matmul per block, the whole mean for
    the fused SwiGLU's three (benchmarks/RESULTS.md)."""
    target = max(1, int(num_rows * share) // num_groups)
    return int(min(128, max(16, 1 << (target.bit_length() - 1))))


def grouped_matmul(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array,
                   block: int | None = None, preferred_element_type=None) -> jax.Array:
    m = lhs_MxI.shape[0]
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs_MxI, rhs_ExIxO))
    if m == 0:
        return jnp.zeros((0, rhs_ExIxO.shape[2]), out_dtype)
    block = min(m, block or default_block(m, rhs_ExIxO.shape[0]))
    lhs_MxI, rhs_ExIxO = _vary_alike(lhs_MxI, rhs_ExIxO)
    return _grouped(lhs_MxI, rhs_ExIxO, group_sizes_E.astype(jnp.int32), block, out_dtype)


def swiglu(x_MxD: jax.Array, gate_ExDxF: jax.Array, up_ExDxF: jax.Array, down_ExFxD: jax.Array,
           group_sizes_E: jax.Array, block: int | None = None) -> jax.Array:
    """down_e(silu(gate_e x) * up_e x) for the rows of each group e (sorted by group), as
    `layers.swiglu` computes it with three grouped matmuls, in one loop over row blocks; rows
    past sum(group_sizes) give zeros."""
    m = x_MxD.shape[0]
    if m == 0:
        return jnp.zeros((0, down_ExFxD.shape[2]), jnp.result_type(x_MxD, down_ExFxD))
    block = min(m, block or default_block(m, gate_ExDxF.shape[0], share=1.0))
    x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD = _vary_alike(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD)
    return _swiglu(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E.astype(jnp.int32), block)


def _vary_alike(*arrays):
    """Inside shard_map, every operand made to vary over the same mesh axes: the custom VJPs'
    cotangents then have their operands' types, and the sum of a gradient over the axes its
    operand did not vary over (data-parallel weights) is JAX's, the transpose of this broadcast."""
    zero = sum(jax.lax.full_like(a, 0, jnp.float32, ()) for a in arrays)
    return tuple(a + zero.astype(a.dtype) for a in arrays)


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
        return _merge(out_MxO, jnp.matmul(lhs_CxI, rhs_IxO, preferred_element_type=out_dtype), start, own_C)

    zeros = _zeros((blocks.num_rows, width_out), out_dtype, lhs_MxI)  # rows past the groups stay 0
    return jax.lax.fori_loop(0, blocks.count, body, zeros)


def _weight_gradient(lhs_MxI, dout_MxO, num_groups: int, blocks: _Blocks):
    """drhs[e] = sum over e's rows of lhs^T dout, accumulated in float32."""

    def body(w, drhs_ExIxO):
        start, group, own_C = blocks.window(w)
        lhs_CxI = jax.lax.dynamic_slice_in_dim(lhs_MxI, start, blocks.block)
        dout_CxO = jnp.where(own_C[:, None], jax.lax.dynamic_slice_in_dim(dout_MxO, start, blocks.block), 0)
        return _accumulate(drhs_ExIxO, group, lhs_CxI, dout_CxO)

    zeros = _zeros((num_groups, lhs_MxI.shape[1], dout_MxO.shape[1]), jnp.float32, lhs_MxI)
    return jax.lax.fori_loop(0, blocks.count, body, zeros)


def _merge(rows_MxO, new_CxO, start, own_C):
    """rows with the block's own rows (own_C) of the window at `start` replaced by new_CxO."""
    old_CxO = jax.lax.dynamic_slice_in_dim(rows_MxO, start, new_CxO.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(rows_MxO, jnp.where(own_C[:, None], new_CxO, old_CxO), start, 0)


def _accumulate(d_ExIxO, e, a_CxI, b_CxO):
    """d[e] += a^T b, in float32 (a block's contribution to its group's weight gradient)."""
    update_IxO = jnp.matmul(a_CxI.T, b_CxO, preferred_element_type=jnp.float32)
    current_IxO = jax.lax.dynamic_index_in_dim(d_ExIxO, e, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(d_ExIxO, current_IxO + update_IxO, e, 0)


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


def _swiglu_loop(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, blocks: _Blocks, keep: bool):
    """The forward loop; with `keep`, also each row's gate and up outputs, for the gradient."""
    dtype = jnp.result_type(x_MxD, gate_ExDxF)
    rows_f = (blocks.num_rows if keep else blocks.block, gate_ExDxF.shape[2])

    def body(w, carry):
        y_MxD, gate_MxF, up_MxF = carry
        start, e, own_C = blocks.window(w)
        x_CxD = jax.lax.dynamic_slice_in_dim(x_MxD, start, blocks.block)
        g_CxF = jnp.matmul(x_CxD, gate_ExDxF[e], preferred_element_type=dtype)
        u_CxF = jnp.matmul(x_CxD, up_ExDxF[e], preferred_element_type=dtype)
        y_CxD = jnp.matmul(jax.nn.silu(g_CxF) * u_CxF, down_ExFxD[e], preferred_element_type=dtype)
        if keep:
            gate_MxF, up_MxF = _merge(gate_MxF, g_CxF, start, own_C), _merge(up_MxF, u_CxF, start, own_C)
        return _merge(y_MxD, y_CxD, start, own_C), gate_MxF, up_MxF

    zeros = (_zeros((blocks.num_rows, down_ExFxD.shape[2]), dtype, x_MxD),
             _zeros(rows_f, dtype, x_MxD), _zeros(rows_f, dtype, x_MxD))
    return jax.lax.fori_loop(0, blocks.count, body, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E, block):
    blocks = _Blocks(group_sizes_E, x_MxD.shape[0], block)
    return _swiglu_loop(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, blocks, keep=False)[0]


def _swiglu_fwd(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E, block):
    blocks = _Blocks(group_sizes_E, x_MxD.shape[0], block)
    y_MxD, gate_MxF, up_MxF = _swiglu_loop(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, blocks, keep=True)
    return y_MxD, (x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E, gate_MxF, up_MxF)


def _swiglu_bwd(block, residuals, dy_MxD):
    """Per block: dh = dy down^T; d gate and d up through silu(g) * u; dx = dg gate^T + du up^T;
    each weight's gradient accumulated in float32 into its group's slot. A block's rows of
    other groups get a zero dy, so they add nothing to this group's weight gradients."""
    x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E, gate_MxF, up_MxF = residuals
    blocks = _Blocks(group_sizes_E, x_MxD.shape[0], block)
    dtype = gate_MxF.dtype

    def rows(a_MxN, start):
        return jax.lax.dynamic_slice_in_dim(a_MxN, start, blocks.block)

    def body(w, carry):
        dx_MxD, dgate_ExDxF, dup_ExDxF, ddown_ExFxD = carry
        start, e, own_C = blocks.window(w)
        x_CxD = rows(x_MxD, start)
        dy_CxD = jnp.where(own_C[:, None], rows(dy_MxD, start), 0).astype(dtype)
        g_CxF, u_CxF = rows(gate_MxF, start), rows(up_MxF, start)
        sigmoid_CxF = jax.nn.sigmoid(g_CxF)
        silu_CxF = g_CxF * sigmoid_CxF
        dh_CxF = jnp.matmul(dy_CxD, down_ExFxD[e].T, preferred_element_type=dtype)
        du_CxF = dh_CxF * silu_CxF
        dg_CxF = dh_CxF * u_CxF * (sigmoid_CxF + silu_CxF * (1 - sigmoid_CxF))
        ddown_ExFxD = _accumulate(ddown_ExFxD, e, silu_CxF * u_CxF, dy_CxD)
        dgate_ExDxF = _accumulate(dgate_ExDxF, e, x_CxD, dg_CxF)
        dup_ExDxF = _accumulate(dup_ExDxF, e, x_CxD, du_CxF)
        dx_CxD = (jnp.matmul(dg_CxF, gate_ExDxF[e].T, preferred_element_type=x_MxD.dtype)
                  + jnp.matmul(du_CxF, up_ExDxF[e].T, preferred_element_type=x_MxD.dtype))
        return _merge(dx_MxD, dx_CxD, start, own_C), dgate_ExDxF, dup_ExDxF, ddown_ExFxD

    zeros = (_zeros(x_MxD.shape, x_MxD.dtype, x_MxD),) + tuple(
        _zeros(w.shape, jnp.float32, x_MxD) for w in (gate_ExDxF, up_ExDxF, down_ExFxD))
    dx_MxD, *dweights = jax.lax.fori_loop(0, blocks.count, body, zeros)
    weights = (gate_ExDxF, up_ExDxF, down_ExFxD)
    return (dx_MxD, *(d.astype(w.dtype) for d, w in zip(dweights, weights)), None)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
