"""A dropless grouped matmul from fixed-size row blocks, in plain XLA ops.

Each group's rows are padded up to a multiple of `block` rows, so every block belongs to one
group; one batched matmul then multiplies every block by its group's weights. The number of
blocks is static (ceil(M / block) + E bounds it), so nothing is dropped and nothing recompiles.
Cost: the padding (at most one partial block per group) plus a gather of one weight matrix per
block. On CPU, where `jax.lax.ragged_dot` computes every group for every row, this is the fast
path; on accelerators a fused kernel (tokamax, Mosaic) avoids the weight gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def default_block(num_rows: int, num_groups: int) -> int:
    """A power of two that keeps padding (at most E partial blocks) near a quarter of M."""
    target = max(1, num_rows // (4 * num_groups))
    return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def grouped_matmul(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array,
                   block: int | None = None, preferred_element_type=None) -> jax.Array:
    m, width_in = lhs_MxI.shape
    e = rhs_ExIxO.shape[0]
    block = block or default_block(m, e)
    num_blocks = -(-m // block) + e

    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    padded_E = -(-group_sizes_E // block) * block
    padded_ends_E = jnp.cumsum(padded_E)
    padded_starts_E = padded_ends_E - padded_E

    # Padded slot -> its group, and the source row (or none, for padding).
    slot_Y = jnp.arange(num_blocks * block)
    slot_group_Y = jnp.minimum(jnp.searchsorted(padded_ends_E, slot_Y, side="right"), e - 1)
    offset_Y = slot_Y - padded_starts_E[slot_group_Y]
    valid_Y = offset_Y < group_sizes_E[slot_group_Y]
    source_Y = jnp.where(valid_Y, starts_E[slot_group_Y] + offset_Y, 0)
    blocks_WxCxI = jnp.where(valid_Y[:, None], lhs_MxI[source_Y], 0).reshape(num_blocks, block, width_in)

    block_group_W = slot_group_Y[::block]
    out_WxCxO = jnp.einsum("wci,wio->wco", blocks_WxCxI, rhs_ExIxO[block_group_W],
                           preferred_element_type=preferred_element_type)

    # Row -> its padded slot.
    row_group_M = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(m), side="right"), e - 1)
    row_slot_M = padded_starts_E[row_group_M] + jnp.arange(m) - starts_E[row_group_M]
    out_MxO = out_WxCxO.reshape(num_blocks * block, -1)[row_slot_M]
    # Rows past the last group (sum(group_sizes) < M) are zero, as in ragged_dot.
    in_groups_M = jnp.arange(m) < jnp.sum(group_sizes_E)
    return jnp.where(in_groups_M[:, None], out_MxO, 0)
