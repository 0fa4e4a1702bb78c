"""Permute and combine with XLA gathers, and backward passes that are gathers too.

The gradient of a row gather is a scatter-add; because `order` is a permutation, it can be
written instead as a gather by the inverse permutation (summed over the K copies of a token),
with no atomics:

    d permute / dx:    dx[t]    = sum_k dout[inverse[t K + k]]
    d combine / dy:    dy[i]    = gates[order[i]] * dout[order[i] // K]
    d combine / dgates: dg[t, k] = <dout[t], y[inverse[t K + k]]>
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _sum_k(rows_AxD, top_k):
    a, d = rows_AxD.shape
    return jnp.sum(rows_AxD.reshape(a // top_k, top_k, d).astype(jnp.float32), axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x_TxD, order_A, inverse_A, top_k):
    return jnp.take(x_TxD, order_A // top_k, axis=0)


def _permute_fwd(x_TxD, order_A, inverse_A, top_k):
    return permute(x_TxD, order_A, inverse_A, top_k), (order_A, inverse_A)


def _permute_bwd(top_k, residuals, dout_AxD):
    _order_A, inverse_A = residuals
    dx = _sum_k(jnp.take(dout_AxD, inverse_A, axis=0), top_k).astype(dout_AxD.dtype)
    return dx, None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def combine(y_AxD, order_A, inverse_A, gates_TxK):
    t, k = gates_TxK.shape
    rows = jnp.take(y_AxD, inverse_A, axis=0).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", rows, gates_TxK.astype(y_AxD.dtype),
                      preferred_element_type=jnp.float32).astype(y_AxD.dtype)


def _combine_fwd(y_AxD, order_A, inverse_A, gates_TxK):
    return combine(y_AxD, order_A, inverse_A, gates_TxK), (y_AxD, order_A, inverse_A, gates_TxK)


def _combine_bwd(residuals, dout_TxD):
    y_AxD, order_A, inverse_A, gates_TxK = residuals
    t, k = gates_TxK.shape
    scale_A = jnp.take(gates_TxK.reshape(-1), order_A)
    dy = (jnp.take(dout_TxD, order_A // k, axis=0).astype(jnp.float32) * scale_A[:, None]).astype(y_AxD.dtype)
    rows = jnp.take(y_AxD, inverse_A, axis=0).reshape(t, k, -1)
    dgates = jnp.einsum("tkd,td->tk", rows, dout_TxD, preferred_element_type=jnp.float32)
    return dy, None, None, dgates.astype(gates_TxK.dtype)


combine.defvjp(_combine_fwd, _combine_bwd)
