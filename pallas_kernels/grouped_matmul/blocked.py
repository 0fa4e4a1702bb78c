"""A dropless grouped matmul from fixed-size row blocks, in plain XLA ops.

Each group's rows are padded up to a multiple of `block` rows, so every block belongs to one
group; one batched matmul then multiplies every block by its group's weights. The number of
blocks is static (ceil(M / block) + G bounds it), so nothing is dropped and nothing recompiles.
Cost: the padding (at most one partial block per group) plus a gather of one weight matrix per
block. On CPU, where `jax.lax.ragged_dot` computes every group for every row, this is the fast
path; on accelerators a fused kernel (tokamax, Mosaic) avoids the weight gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def default_block(num_rows: int, num_groups: int) -> int:
    """A power of two that keeps padding (at most G partial blocks) near a quarter of M."""
    target = max(1, num_rows // (4 * num_groups))
    return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array,
                   block: int | None = None, preferred_element_type=None) -> jax.Array:
    m, k = lhs_MxK.shape
    g = rhs_GxKxN.shape[0]
    block = block or default_block(m, g)
    num_blocks = -(-m // block) + g

    starts_G = jnp.cumsum(group_sizes_G) - group_sizes_G
    padded_G = -(-group_sizes_G // block) * block
    padded_ends_G = jnp.cumsum(padded_G)
    padded_starts_G = padded_ends_G - padded_G

    # Padded slot -> its group, and the source row (or none, for padding).
    slot_S = jnp.arange(num_blocks * block)
    slot_group_S = jnp.minimum(jnp.searchsorted(padded_ends_G, slot_S, side="right"), g - 1)
    offset_S = slot_S - padded_starts_G[slot_group_S]
    valid_S = offset_S < group_sizes_G[slot_group_S]
    source_S = jnp.where(valid_S, starts_G[slot_group_S] + offset_S, 0)
    blocks_BxRxK = jnp.where(valid_S[:, None], lhs_MxK[source_S], 0).reshape(num_blocks, block, k)

    block_group_B = slot_group_S[::block]
    out_BxRxN = jnp.einsum("brk,bkn->brn", blocks_BxRxK, rhs_GxKxN[block_group_B],
                           preferred_element_type=preferred_element_type)

    # Row -> its padded slot.
    row_group_M = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes_G), jnp.arange(m), side="right"), g - 1)
    row_slot_M = padded_starts_G[row_group_M] + jnp.arange(m) - starts_G[row_group_M]
    out_MxN = out_BxRxN.reshape(num_blocks * block, -1)[row_slot_M]
    # Rows past the last group (sum(group_sizes) < M) are zero, as in ragged_dot.
    in_groups_M = jnp.arange(m) < jnp.sum(group_sizes_G)
    return jnp.where(in_groups_M[:, None], out_MxN, 0)
