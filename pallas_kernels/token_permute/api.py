"""permute / combine: the token shuffles around an MoE layer's grouped expert matmuls.

    permute(x (T, D), order (A,), inverse (A,), top_k)  -> (A, D): x[order[i] // top_k]
    combine(y (A, D), order, inverse, gates (T, K))      -> (T, D): sum_k gates[t, k] y[inverse[t K + k]]

A = T * K; `order` is a permutation of range(A) (sorted position -> assignment t K + k) and
`inverse` its inverse (see `inverse_permutation`). x and y are float (bf16 or float32), gates
float32 or the activations' dtype; combine accumulates in float32. Implementations:

  "xla"        jnp.take gathers; the backward passes are gathers by the inverse permutation
               (no scatter-add). Every backend; the default.
  "pallas"     the same math as Pallas kernels: Mosaic TPU on TPU, TPU interpret mode on CPU.
  "reference"  plain indexing with XLA's own gradients (scatter-adds): the oracle, and the
               baseline a user would otherwise get.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.token_permute import pallas, reference, xla

Implementation = Literal["xla", "pallas", "reference"]


def inverse_permutation(order_A: jax.Array) -> jax.Array:
    return jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0], dtype=order_A.dtype))


def _interpret() -> bool:
    backend = jax.default_backend()
    if backend == "gpu":
        raise ValueError("the 'pallas' token permute targets TPU (and CPU interpret mode); on GPU use "
                         "implementation='xla', whose backward passes are gathers as well")
    return backend == "cpu"


def _implementation(name: str, operation: str):
    """(module, trailing arguments) of an implementation: Pallas also needs interpret mode."""
    if name == "xla":
        return xla, ()
    if name == "pallas":
        return pallas, (_interpret(),)
    if name == "reference":
        return reference, ()
    raise ValueError(f"unknown {operation} implementation {name!r}; expected xla, pallas or reference")


def _check(order_A, inverse_A, rows, top_k):
    if order_A.ndim != 1 or order_A.shape != inverse_A.shape or not jnp.issubdtype(order_A.dtype, jnp.integer):
        raise ValueError(f"order and inverse must be 1-D integer arrays of one length; got {order_A.shape} "
                         f"{order_A.dtype} and {inverse_A.shape}")
    if order_A.shape[0] != rows * top_k:
        raise ValueError(f"order has {order_A.shape[0]} entries but tokens x top_k = {rows} x {top_k}")


def permute(x_TxD: jax.Array, order_A: jax.Array, inverse_A: jax.Array, top_k: int, *,
            implementation: Implementation = "xla") -> jax.Array:
    if x_TxD.ndim != 2 or not jnp.issubdtype(x_TxD.dtype, jnp.floating):
        raise ValueError(f"permute expects float x of shape (T, D); got {x_TxD.shape} {x_TxD.dtype}")
    _check(order_A, inverse_A, x_TxD.shape[0], top_k)
    module, extra = _implementation(implementation, "permute")
    return module.permute(x_TxD, order_A, inverse_A, top_k, *extra)


def combine(y_AxD: jax.Array, order_A: jax.Array, inverse_A: jax.Array, gates_TxK: jax.Array, *,
            implementation: Implementation = "xla") -> jax.Array:
    if y_AxD.ndim != 2 or gates_TxK.ndim != 2:
        raise ValueError(f"combine expects y (A, D) and gates (T, K); got {y_AxD.shape} and {gates_TxK.shape}")
    t, k = gates_TxK.shape
    _check(order_A, inverse_A, t, k)
    if y_AxD.shape[0] != t * k:
        raise ValueError(f"y has {y_AxD.shape[0]} rows but gates give {t} x {k} assignments")
    module, extra = _implementation(implementation, "combine")
    return module.combine(y_AxD, order_A, inverse_A, gates_TxK, *extra)
