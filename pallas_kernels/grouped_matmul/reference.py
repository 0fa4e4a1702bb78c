"""The grouped-matmul oracle: one dense matmul per group, rows outside the group masked out.

Readable and exact, and its cost is E x M x I x O: for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_ids(group_sizes_E: jax.Array, num_rows: int) -> jax.Array:
    """The group of each row when rows are sorted by group; rows past the last group get G."""
    ends_E = jnp.cumsum(group_sizes_E)
    return jnp.searchsorted(ends_E, jnp.arange(num_rows), side="right")


def grouped_matmul(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array,
                   preferred_element_type=None) -> jax.Array:
    ids_M = group_ids(group_sizes_E, lhs_MxI.shape[0])
    out_ExMxO = jnp.einsum("mi,eio->emo", lhs_MxI, rhs_ExIxO,
                           preferred_element_type=preferred_element_type)
    mask_ExM = ids_M[None, :] == jnp.arange(rhs_ExIxO.shape[0])[:, None]
    return jnp.sum(jnp.where(mask_ExM[..., None], out_ExMxO, 0), axis=0).astype(out_ExMxO.dtype)
