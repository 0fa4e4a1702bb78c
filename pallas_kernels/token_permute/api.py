"""permute / combine: the token shuffles around an MoE layer's grouped expert matmuls.

    permute(x (T, D), order (A,), inverse (A,), top_k)  -> (A, D): x[order[i] // top_k]
    combine(y (A, D), order, inverse, gates (T, K))      -> (T, D): sum_k gates[t, k] y[inverse[t K + k]]

A = T * K; `order` is a permutation of range(A) (sorted position -> assignment t K + k) and
`inverse` its inverse (see `inverse_permutation`). x and y are float (bf16 or float32), gates
float32 or the activations' dtype; combine accumulates in float32. Implementations:

  "xla"        jnp.take gathers; the backward passes are gathers by the inverse permutation
               (no scatter-add). Every backend; the default.
  "pallas"     the same math as Pallas kernels: Mosaic TPU on TPU (pallas.py), Mosaic GPU on GPU
               (mosaic_gpu.py, TMA: Hopper or newer, D a multiple of 128), and on CPU the TPU
               kernels in TPU interpret mode.
  "reference"  plain indexing with XLA's own gradients (scatter-adds): the oracle, and the
               baseline a user would otherwise get.
  "auto"       "pallas" on GPU and TPU, where the kernels' gathers replace XLA's gather
               fusions (on GPU only for widths the Mosaic GPU kernels take, D % 128 == 0);
               "xla" on CPU, where Pallas runs only in interpret mode (slow). A caller that
               knows the device takes "xla" where not pallas_supported (the model does).

`interpret` picks, for "pallas" only, which kernels to run on the CPU whatever the backend:
"tpu" (TPU interpret mode) or "gpu" (GPU interpret mode, which needs jax >= 0.12). Left None,
the platform decides as above: `platform` ("cpu", "gpu", "tpu"), the platform of the devices
the call is compiled for, which a caller compiling for TPU devices from a CPU machine must
give; None means jax.default_backend().
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.token_permute import mosaic_gpu, pallas, reference, xla

Implementation = Literal["auto", "xla", "pallas", "reference"]
Interpret = Literal["tpu", "gpu"]

# TPUs (as jax names their devices) whose Mosaic compiler has no sublane gather, the TPU
# kernels' row gather ("Sublane gather not supported by this TPU generation").
_TPUS_WITHOUT_SUBLANE_GATHER = ("TPU v2", "TPU v3", "TPU v4")


def pallas_supported(device) -> bool:
    """Whether the Pallas kernels compile for `device` (a jax device, or a TPU slice's as libtpu
    describes it): TPUs from v5e on; GPUs from Hopper on (TMA: compute capability 9.0); CPUs,
    where they run in interpret mode."""
    if device.platform == "tpu":
        return not device.device_kind.startswith(_TPUS_WITHOUT_SUBLANE_GATHER)
    if device.platform == "gpu":
        return float(getattr(device, "compute_capability", "9.0")) >= 9.0
    return True


def inverse_permutation(order_A: jax.Array) -> jax.Array:
    return jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0], dtype=order_A.dtype))


def _pallas(interpret: Interpret | None, platform: str | None):
    """(kernel module, interpret flag) for "pallas": the platform's own kernels, or those asked for."""
    if interpret is None:
        backend = platform or jax.default_backend()
        if backend == "gpu":
            return mosaic_gpu, False
        return pallas, backend == "cpu"  # No GPU interpret mode by default: it needs jax >= 0.12.
    if interpret == "tpu":
        return pallas, True
    if interpret == "gpu":
        return mosaic_gpu, True
    raise ValueError(f"unknown interpret mode {interpret!r}; expected 'tpu', 'gpu' or None")


def resolve(implementation: Implementation, width: int, platform: str | None = None) -> str:
    """The concrete implementation "auto" stands for on `platform` (None: the default backend),
    for rows of `width`."""
    if implementation != "auto":
        return implementation
    backend = platform or jax.default_backend()
    if backend == "tpu" or (backend == "gpu" and width % mosaic_gpu.ROW_ALIGN == 0):
        return "pallas"
    return "xla"


def _implementation(name: str, operation: str, interpret: Interpret | None, width: int, platform: str | None):
    """(module, trailing arguments) of an implementation: Pallas also needs interpret mode."""
    name = resolve(name, width, platform) if interpret is None else name
    if name != "pallas" and interpret is not None:
        raise ValueError(f"interpret={interpret!r} applies to implementation='pallas' only, not {name!r}")
    if name == "xla":
        return xla, ()
    if name == "pallas":
        module, flag = _pallas(interpret, platform)
        return module, (flag,)
    if name == "reference":
        return reference, ()
    raise ValueError(f"unknown {operation} implementation {name!r}; expected auto, xla, pallas or reference")


def _check(order_A, inverse_A, rows, top_k):
    if order_A.ndim != 1 or order_A.shape != inverse_A.shape or not jnp.issubdtype(order_A.dtype, jnp.integer):
        raise ValueError(f"order and inverse must be 1-D integer arrays of one length; got {order_A.shape} "
                         f"{order_A.dtype} and {inverse_A.shape}")
    if order_A.shape[0] != rows * top_k:
        raise ValueError(f"order has {order_A.shape[0]} entries but tokens x top_k = {rows} x {top_k}")


def permute(x_TxD: jax.Array, order_A: jax.Array, inverse_A: jax.Array, top_k: int, *,
            implementation: Implementation = "xla", interpret: Interpret | None = None,
            platform: str | None = None) -> jax.Array:
    if x_TxD.ndim != 2 or not jnp.issubdtype(x_TxD.dtype, jnp.floating):
        raise ValueError(f"permute expects float x of shape (T, D); got {x_TxD.shape} {x_TxD.dtype}")
    _check(order_A, inverse_A, x_TxD.shape[0], top_k)
    module, extra = _implementation(implementation, "permute", interpret, x_TxD.shape[1], platform)
    return module.permute(x_TxD, order_A, inverse_A, top_k, *extra)


def combine(y_AxD: jax.Array, order_A: jax.Array, inverse_A: jax.Array, gates_TxK: jax.Array, *,
            implementation: Implementation = "xla", interpret: Interpret | None = None,
            platform: str | None = None) -> jax.Array:
    if y_AxD.ndim != 2 or gates_TxK.ndim != 2:
        raise ValueError(f"combine expects y (A, D) and gates (T, K); got {y_AxD.shape} and {gates_TxK.shape}")
    t, k = gates_TxK.shape
    _check(order_A, inverse_A, t, k)
    if y_AxD.shape[0] != t * k:
        raise ValueError(f"y has {y_AxD.shape[0]} rows but gates give {t} x {k} assignments")
    module, extra = _implementation(implementation, "combine", interpret, y_AxD.shape[1], platform)
    return module.combine(y_AxD, order_A, inverse_A, gates_TxK, *extra)
