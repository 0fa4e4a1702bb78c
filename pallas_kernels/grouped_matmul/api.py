"""grouped_matmul: out[m] = lhs[m] @ rhs[group(m)], rows sorted by group.

Shapes: lhs (M, I), rhs (E, I, O), group_sizes (E,) int32 summing to at most M; rows beyond
the sum give zeros. Implementations:
  "ragged_dot"  jax.lax.ragged_dot (XLA; fused on TPU, every group computed on CPU)
  "blocked"     a loop over row blocks, each one whole matmul (see blocked.py); fast on CPU
  "tokamax"     tokamax.ragged_dot (Mosaic GPU on Hopper, Mosaic TPU); I and O are zero-padded
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


def resolve(implementation: Implementation, platform: str | None = None) -> str:
    """The concrete implementation "auto" stands for on `platform` ("cpu", "gpu", "tpu": the
    platform of the devices compiled for; None: jax.default_backend())."""
    if implementation != "auto":
        return implementation
    backend = platform or jax.default_backend()
    if backend == "cpu":
        return "blocked"
    if backend == "gpu":
        try:
            import tokamax  # noqa: F401
        except ImportError:
            return "ragged_dot"
        return "tokamax"
    return "ragged_dot"


def alignment(implementation: Implementation, platform: str | None = None) -> int:
    """The multiple the widths I and O should be of for `implementation` (1: any). Callers that
    reuse weights across calls pad them once to this, and the call pads nothing."""
    return _TOKAMAX_ALIGN if resolve(implementation, platform) == "tokamax" else 1


def _tokamax(lhs_MxI, rhs_ExIxO, group_sizes_E, preferred_element_type):
    try:
        import tokamax
        from absl import flags
    except ImportError:
        raise ValueError("grouped_matmul implementation 'tokamax' needs tokamax: pip install tokamax") from None
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; they must not parse our command line
        flags.FLAGS.mark_as_parsed()
    _, width_in = lhs_MxI.shape
    width_out = rhs_ExIxO.shape[2]
    pad_in, pad_out = -width_in % _TOKAMAX_ALIGN, -width_out % _TOKAMAX_ALIGN
    if pad_in or pad_out:
        lhs_MxI = jnp.pad(lhs_MxI, ((0, 0), (0, pad_in)))
        rhs_ExIxO = jnp.pad(rhs_ExIxO, ((0, 0), (0, pad_in), (0, pad_out)))
    out = tokamax.ragged_dot(lhs_MxI, rhs_ExIxO, group_sizes_E.astype(jnp.int32),
                             preferred_element_type=preferred_element_type)[:, :width_out]
    # The contract: rows past the last group are zero, whatever the kernel leaves there.
    in_groups = jnp.arange(out.shape[0]) < jnp.sum(group_sizes_E)
    return jnp.where(in_groups[:, None], out, 0).astype(out.dtype)


def grouped_matmul(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array, *,
                   implementation: Implementation = "ragged_dot",
                   preferred_element_type=None, platform: str | None = None) -> jax.Array:
    if lhs_MxI.ndim != 2 or rhs_ExIxO.ndim != 3 or group_sizes_E.ndim != 1:
        raise ValueError(f"grouped_matmul expects lhs (M, I), rhs (E, I, O), group_sizes (E,); got "
                         f"{lhs_MxI.shape}, {rhs_ExIxO.shape}, {group_sizes_E.shape}")
    if lhs_MxI.shape[1] != rhs_ExIxO.shape[1] or rhs_ExIxO.shape[0] != group_sizes_E.shape[0]:
        raise ValueError(f"grouped_matmul shape mismatch: lhs {lhs_MxI.shape}, rhs {rhs_ExIxO.shape}, "
                         f"group_sizes {group_sizes_E.shape}")
    implementation = resolve(implementation, platform)
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(lhs_MxI, rhs_ExIxO, group_sizes_E.astype("int32"),
                                  preferred_element_type=preferred_element_type)
    if implementation == "blocked":
        return blocked.grouped_matmul(lhs_MxI, rhs_ExIxO, group_sizes_E,
                                      preferred_element_type=preferred_element_type)
    if implementation == "tokamax":
        return _tokamax(lhs_MxI, rhs_ExIxO, group_sizes_E, preferred_element_type)
    if implementation == "reference":
        return reference.grouped_matmul(lhs_MxI, rhs_ExIxO, group_sizes_E,
                                        preferred_element_type=preferred_element_type)
    raise ValueError(f"unknown grouped_matmul implementation {implementation!r}; "
                     "expected auto, ragged_dot, blocked, tokamax or reference")
