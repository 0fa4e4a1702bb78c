"""Sampling text from a trained model (full pool, no PSR).

This decoder recomputes the whole (fixed-size) sequence for every new token: simple and
obviously right, and the oracle for a KV-cache decoder.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample_next(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy when temperature is 0; otherwise sampling from the top_k (0: all) tokens."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k"))
def _generate(model, params, buffer_BxS, prompt_len, key, *, num_tokens, temperature, top_k):
    def body(i, carry):
        buffer, key = carry
        key, step_key = jax.random.split(key)
        logits_BxSxV, _ = model.apply({"params": params}, buffer)
        position = prompt_len + i
        token_B = sample_next(logits_BxSxV[:, position - 1], step_key, temperature, top_k)
        return buffer.at[:, position].set(token_B), key

    buffer, _ = jax.lax.fori_loop(0, num_tokens, body, (buffer_BxS, key))
    return buffer


def generate(model, params, prompt_ids: list[int], num_tokens: int, key: jax.Array, *,
             temperature: float = 0.8, top_k: int = 40, eod_id: int | None = None) -> list[int]:
    """Continues `prompt_ids` by `num_tokens` tokens; stops early at `eod_id`."""
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    buffer = np.zeros((1, len(prompt_ids) + num_tokens), np.int32)
    buffer[0, :len(prompt_ids)] = prompt_ids
    out = _generate(model, params, jnp.asarray(buffer), len(prompt_ids), key,
                    num_tokens=num_tokens, temperature=temperature, top_k=top_k)
    new = np.asarray(out[0, len(prompt_ids):]).tolist()
    if eod_id is not None and eod_id in new:
        new = new[:new.index(eod_id)]
    return new
