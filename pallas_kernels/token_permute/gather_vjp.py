"""permute and combine as custom VJPs over three row-gather kernels, shared by the Mosaic TPU
(pallas.py) and Mosaic GPU (mosaic_gpu.py) kernel sets. Forward and backward passes are all
gathers by the permutation or its inverse: no scatter-add, no atomics.

A kernel set provides, with `interpret` last:
    rows(src_MxD, idx_A, scale_A or None)        out[a] = scale[a] * src[idx[a]]
    combine(src_AxD, idx_A, weights_TxK or None) out[t] = sum_k w[t, k] * src[idx[t K + k]]
    dot(src_AxD, idx_A, dy_TxD)                  out[t, k] = <dy[t], src[idx[t K + k]]>
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class RowGathers(NamedTuple):
    rows: Callable
    combine: Callable  # also takes top_k=, for when the weights are None
    dot: Callable  # also takes top_k=


def permute_and_combine(kernels: RowGathers) -> tuple[Callable, Callable]:
    """(permute(x, order, inverse, top_k, interpret), combine(y, order, inverse, gates, interpret))."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def permute(x_TxD, order_A, inverse_A, top_k, interpret=False):
        return kernels.rows(x_TxD, order_A // top_k, None, interpret)

    def permute_fwd(x_TxD, order_A, inverse_A, top_k, interpret):
        return permute(x_TxD, order_A, inverse_A, top_k, interpret), inverse_A

    def permute_bwd(top_k, interpret, inverse_A, dout_AxD):
        # Each token's gradient is the sum of its K permuted rows' gradients: a gather by the inverse.
        return kernels.combine(dout_AxD, inverse_A, None, interpret, top_k=top_k), None, None

    permute.defvjp(permute_fwd, permute_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def combine(y_AxD, order_A, inverse_A, gates_TxK, interpret=False):
        return kernels.combine(y_AxD, inverse_A, gates_TxK, interpret, top_k=gates_TxK.shape[1])

    def combine_fwd(y_AxD, order_A, inverse_A, gates_TxK, interpret):
        return combine(y_AxD, order_A, inverse_A, gates_TxK, interpret), (y_AxD, order_A, inverse_A, gates_TxK)

    def combine_bwd(interpret, residuals, dout_TxD):
        y_AxD, order_A, inverse_A, gates_TxK = residuals
        k = gates_TxK.shape[1]
        scale_A = jnp.take(gates_TxK.reshape(-1).astype(jnp.float32), order_A)
        dy = kernels.rows(dout_TxD.astype(y_AxD.dtype), order_A // k, scale_A, interpret)
        dgates = kernels.dot(y_AxD, inverse_A, dout_TxD, interpret, top_k=k)
        return dy, None, None, dgates.astype(gates_TxK.dtype)

    combine.defvjp(combine_fwd, combine_bwd)
    return permute, combine
