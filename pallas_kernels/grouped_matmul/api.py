"""grouped_matmul: out[m] = lhs[m] @ rhs[group(m)], rows sorted by group.

Shapes: lhs (M, K), rhs (G, K, N), group_sizes (G,) int32 summing to at most M; rows beyond
the sum give zeros. Implementations:
  "ragged_dot"  jax.lax.ragged_dot (XLA; fused on TPU, every group computed on CPU)
  "blocked"     padded row blocks and one batched matmul (see blocked.py); fast on CPU
  "reference"   one masked dense matmul per group; the oracle
"""

from __future__ import annotations

from typing import Literal

import jax

from pallas_kernels.grouped_matmul import blocked, reference

Implementation = Literal["ragged_dot", "blocked", "reference"]


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array, *,
                   implementation: Implementation = "ragged_dot",
                   preferred_element_type=None) -> jax.Array:
    if lhs_MxK.ndim != 2 or rhs_GxKxN.ndim != 3 or group_sizes_G.ndim != 1:
        raise ValueError(f"grouped_matmul expects lhs (M, K), rhs (G, K, N), group_sizes (G,); got "
                         f"{lhs_MxK.shape}, {rhs_GxKxN.shape}, {group_sizes_G.shape}")
    if lhs_MxK.shape[1] != rhs_GxKxN.shape[1] or rhs_GxKxN.shape[0] != group_sizes_G.shape[0]:
        raise ValueError(f"grouped_matmul shape mismatch: lhs {lhs_MxK.shape}, rhs {rhs_GxKxN.shape}, "
                         f"group_sizes {group_sizes_G.shape}")
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes_G.astype("int32"),
                                  preferred_element_type=preferred_element_type)
    if implementation == "blocked":
        return blocked.grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G,
                                      preferred_element_type=preferred_element_type)
    if implementation == "reference":
        return reference.grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G,
                                        preferred_element_type=preferred_element_type)
    raise ValueError(f"unknown grouped_matmul implementation {implementation!r}; "
                     "expected ragged_dot, blocked or reference")
