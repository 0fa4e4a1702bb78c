"""grouped_matmul: out[m] = lhs[m] @ rhs[group(m)], rows sorted by group.

Shapes: lhs (M, K), rhs (G, K, N), group_sizes (G,) int32 summing to at most M; rows beyond
the sum give zeros. Implementations:
  "ragged_dot"  jax.lax.ragged_dot (XLA; fused on TPU, every group computed on CPU)
  "blocked"     padded row blocks and one batched matmul (see blocked.py); fast on CPU
  "tokamax"     tokamax.ragged_dot (Mosaic GPU on Hopper, Mosaic TPU); K and N are zero-padded
                to multiples of 64 as its GPU kernel needs (exact: zero columns add nothing)
  "reference"   one masked dense matmul per group; the oracle
  "auto"        per backend, from measurements: "blocked" on CPU (8 to 12 times ragged_dot at
                the tiny preset's shapes), "tokamax" on GPU when installed (20 to 30 times
                ragged_dot on an H100, shared/docs/gpu-baselines.md), else "ragged_dot"
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import blocked, reference

Implementation = Literal["auto", "ragged_dot", "blocked", "tokamax", "reference"]
_TOKAMAX_ALIGN = 64


def resolve(implementation: Implementation) -> str:
    """The concrete implementation "auto" stands for on the default backend."""
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "blocked"
    if backend == "gpu":
        try:
            import tokamax  # noqa: F401
        except ImportError:
            return "ragged_dot"
        return "tokamax"
    return "ragged_dot"


def _tokamax(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type):
    try:
        import tokamax
        from absl import flags
    except ImportError:
        raise ValueError("grouped_matmul implementation 'tokamax' needs tokamax: pip install tokamax") from None
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; they must not parse our command line
        flags.FLAGS.mark_as_parsed()
    _, k = lhs_MxK.shape
    n = rhs_GxKxN.shape[2]
    pad_k, pad_n = -k % _TOKAMAX_ALIGN, -n % _TOKAMAX_ALIGN
    if pad_k or pad_n:
        lhs_MxK = jnp.pad(lhs_MxK, ((0, 0), (0, pad_k)))
        rhs_GxKxN = jnp.pad(rhs_GxKxN, ((0, 0), (0, pad_k), (0, pad_n)))
    out = tokamax.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32),
                             preferred_element_type=preferred_element_type)[:, :n]
    # The contract: rows past the last group are zero, whatever the kernel leaves there.
    in_groups = jnp.arange(out.shape[0]) < jnp.sum(group_sizes_G)
    return jnp.where(in_groups[:, None], out, 0).astype(out.dtype)


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array, *,
                   implementation: Implementation = "ragged_dot",
                   preferred_element_type=None) -> jax.Array:
    if lhs_MxK.ndim != 2 or rhs_GxKxN.ndim != 3 or group_sizes_G.ndim != 1:
        raise ValueError(f"grouped_matmul expects lhs (M, K), rhs (G, K, N), group_sizes (G,); got "
                         f"{lhs_MxK.shape}, {rhs_GxKxN.shape}, {group_sizes_G.shape}")
    if lhs_MxK.shape[1] != rhs_GxKxN.shape[1] or rhs_GxKxN.shape[0] != group_sizes_G.shape[0]:
        raise ValueError(f"grouped_matmul shape mismatch: lhs {lhs_MxK.shape}, rhs {rhs_GxKxN.shape}, "
                         f"group_sizes {group_sizes_G.shape}")
    implementation = resolve(implementation)
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes_G.astype("int32"),
                                  preferred_element_type=preferred_element_type)
    if implementation == "blocked":
        return blocked.grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G,
                                      preferred_element_type=preferred_element_type)
    if implementation == "tokamax":
        return _tokamax(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type)
    if implementation == "reference":
        return reference.grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G,
                                        preferred_element_type=preferred_element_type)
    raise ValueError(f"unknown grouped_matmul implementation {implementation!r}; "
                     "expected auto, ragged_dot, blocked, tokamax or reference")
