"""The grouped-matmul oracle: one dense matmul per group, rows outside the group masked out.

Readable and exact, and its cost is groups x rows x k x n: for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_ids(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
    """The group of each row when rows are sorted by group; rows past the last group get G."""
    ends_G = jnp.cumsum(group_sizes_G)
    return jnp.searchsorted(ends_G, jnp.arange(num_rows), side="right")


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array,
                   preferred_element_type=None) -> jax.Array:
    ids_M = group_ids(group_sizes_G, lhs_MxK.shape[0])
    out_GxMxN = jnp.einsum("mk,gkn->gmn", lhs_MxK, rhs_GxKxN,
                           preferred_element_type=preferred_element_type)
    mask_GxM = ids_M[None, :] == jnp.arange(rhs_GxKxN.shape[0])[:, None]
    return jnp.sum(jnp.where(mask_GxM[..., None], out_GxMxN, 0), axis=0).astype(out_GxMxN.dtype)
