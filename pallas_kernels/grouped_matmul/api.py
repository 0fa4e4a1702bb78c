"""grouped_matmul: out[m] = lhs[m] @ rhs[group(m)], rows sorted by group.

Shapes: lhs (M, I), rhs (E, I, O), group_sizes (E,) int32 summing to at most M; rows beyond
the sum give zeros. Implementations:
  "ragged_dot"  jax.lax.ragged_dot (XLA; every group computed for every row on CPU, and on TPU in
                the weight gradient, see "auto")
  "blocked"     a loop over row blocks, each one whole matmul (see blocked.py); fast on CPU
  "tokamax"     tokamax.ragged_dot: on GPU its Mosaic GPU kernel (Hopper), I and O zero-padded to
                multiples of 64 as it needs (exact: zero columns add nothing); on TPU its Mosaic
                TPU kernels (megablox gmm, and tgmm for the weight gradient), any widths
  "reference"   one masked dense matmul per group; the oracle
  "auto"        per platform: "blocked" on CPU (5 to 12 times ragged_dot at small shapes) and
                TPU, "tokamax" on GPU when installed (20 to 30 times ragged_dot on an H100; both
                in benchmarks/RESULTS.md), else "ragged_dot". Not ragged_dot on TPU: XLA
                (libtpu 0.0.42.1) computes its weight gradient as one masked dense matmul per
                group, G times the work (32 times at the 2.3B preset's 32 local experts). Not
                tokamax on TPU: its Mosaic TPU kernels (gmm, and tgmm for the weight gradient)
                do only each group's rows, but tokamax 0.0.12 leaves their outputs' manual axis
                type unset, which the model's checking shard_map rejects. blocked runs one matmul
                per block of rows in use, in plain XLA.
"""

from __future__ import annotations

import logging
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
    if backend in ("cpu", "tpu"):
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
    tpu = (platform or jax.default_backend()) == "tpu"
    return _TOKAMAX_ALIGN if resolve(implementation, platform) == "tokamax" and not tpu else 1


class _NoAutotuningNotes(logging.Filter):
    """tokamax warns, once per shape, that it has no tuned tiling and takes its default one."""

    def filter(self, record):
        return "Autotuning cache miss" not in record.getMessage()


def _tokamax(lhs_MxI, rhs_ExIxO, group_sizes_E, preferred_element_type, platform):
    try:
        import tokamax
        from absl import flags
    except ImportError:
        raise ValueError("grouped_matmul implementation 'tokamax' needs tokamax: pip install tokamax") from None
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; they must not parse our command line
        flags.FLAGS.mark_as_parsed()
    if not any(isinstance(f, _NoAutotuningNotes) for f in logging.getLogger("absl").filters):
        logging.getLogger("absl").addFilter(_NoAutotuningNotes())
    # Named, not left to tokamax: it would pick by the default backend, a CPU when compiling for a TPU.
    kernel = {"tpu": "mosaic_tpu"}.get(platform or jax.default_backend())
    _, width_in = lhs_MxI.shape
    width_out = rhs_ExIxO.shape[2]
    align = alignment("tokamax", platform)
    pad_in, pad_out = -width_in % align, -width_out % align
    if pad_in or pad_out:
        lhs_MxI = jnp.pad(lhs_MxI, ((0, 0), (0, pad_in)))
        rhs_ExIxO = jnp.pad(rhs_ExIxO, ((0, 0), (0, pad_in), (0, pad_out)))
    out = tokamax.ragged_dot(lhs_MxI, rhs_ExIxO, group_sizes_E.astype(jnp.int32),
                             preferred_element_type=preferred_element_type, implementation=kernel)[:, :width_out]
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
        return _tokamax(lhs_MxI, rhs_ExIxO, group_sizes_E, preferred_element_type, platform)
    if implementation == "reference":
        return reference.grouped_matmul(lhs_MxI, rhs_ExIxO, group_sizes_E,
                                        preferred_element_type=preferred_element_type)
    raise ValueError(f"unknown grouped_matmul implementation {implementation!r}; "
                     "expected auto, ragged_dot, blocked, tokamax or reference")
