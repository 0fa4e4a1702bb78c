"""The oracle: permute and combine as plain indexing, differentiated by XLA.

    permute:  out[i] = x[order[i] // K]                              (A, D) from (T, D)
    combine:  out[t] = sum_k gates[t, k] * y[inverse[t * K + k]]     (T, D) from (A, D)

`order` maps a sorted position i to its assignment a = t * K + k (token t's k-th choice), and
`inverse` is its inverse permutation. XLA differentiates the gathers into scatter-adds: the
gradients a user gets without this package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def permute(x_TxD: jax.Array, order_A: jax.Array, inverse_A: jax.Array, top_k: int) -> jax.Array:
    del inverse_A
    return x_TxD[order_A // top_k]


def combine(y_AxD: jax.Array, order_A: jax.Array, inverse_A: jax.Array, gates_TxK: jax.Array) -> jax.Array:
    del order_A
    t, k = gates_TxK.shape
    rows_TxKxD = y_AxD[inverse_A].reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", rows_TxKxD, gates_TxK.astype(y_AxD.dtype))
