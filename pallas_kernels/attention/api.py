"""causal(q (B, S, H, Z), k (B, S, J, Z), v (B, S, J, Z)) -> (B, S, H, Z): softmax attention in
which the query at index s sees the keys at indices <= s, query head h using key/value head
h // (H / J) (grouped-query attention).

The kernel is JAX's Pallas TPU splash attention (jax.experimental.pallas.ops.tpu.
splash_attention), one multi-query kernel per key/value head: it walks the keys in blocks (below)
with an online softmax and skips the blocks above the diagonal, so the S x S scores never
reach HBM, and its backward recomputes them blockwise from the saved log-sum-exps. Mosaic
compiles it on TPU; on any other platform it runs in TPU interpret mode (slow: for tests).
The scores are float32; q is scaled by 1 / sqrt(Z) in its own dtype before the kernel (one
rounding in bf16; the XLA path scales the float32 scores). The XLA path the model
uses elsewhere, which writes the scores out, is rexmoe_jax/model/layers.causal_attention (the
readable reference).

S must be a multiple of BLOCK (`applies`). Run per device: under a mesh, inside shard_map with
check_vma=False (the kernel's outputs carry no manual-axis type).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

# Sequences must be a multiple of BLOCK rows. The kernels (forward, dq, dkv) take query and key
# blocks of the largest of 512, 256 and 128 that divides S (the kernel's own default is 128):
# fewer, larger blocks read K and V fewer times.
BLOCK = 128


def applies(seq_len: int) -> bool:
    """Whether the kernel takes sequences of this length."""
    return seq_len % BLOCK == 0


def _kernel(query_heads: int, seq_len: int, interpret: bool):
    """Made per call, not cached: the kernel holds its mask's block tables as jax arrays, which
    jax 0.12 creates as values of the trace that makes them (a cached kernel leaks them)."""
    block = next(b for b in (512, 256, BLOCK) if seq_len % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * query_heads)
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def causal(q_BxSxHxZ: jax.Array, k_BxSxJxZ: jax.Array, v_BxSxJxZ: jax.Array, *,
           platform: str | None = None) -> jax.Array:
    """`platform` ("cpu", "gpu", "tpu"; None: jax.default_backend()) is that of the devices the
    call is compiled for: Mosaic on "tpu", interpret mode elsewhere."""
    b, s, h, z = q_BxSxHxZ.shape
    j = k_BxSxJxZ.shape[2]
    if not applies(s) or h % j or k_BxSxJxZ.shape != (b, s, j, z) or v_BxSxJxZ.shape != k_BxSxJxZ.shape:
        raise ValueError(f"flash attention needs q (B, S, H, Z), k and v (B, S, J, Z) with J dividing H "
                         f"and S a multiple of {BLOCK}; got {q_BxSxHxZ.shape}, {k_BxSxJxZ.shape}, "
                         f"{v_BxSxJxZ.shape}")
    kernel = _kernel(h // j, s, (platform or jax.default_backend()) != "tpu")
    scaled = q_BxSxHxZ * jnp.asarray(z ** -0.5, q_BxSxHxZ.dtype)
    q_BxJxQxSxZ = scaled.reshape(b, s, j, h // j, z).transpose(0, 2, 3, 1, 4)
    k_BxJxSxZ, v_BxJxSxZ = (x.transpose(0, 2, 1, 3) for x in (k_BxSxJxZ, v_BxSxJxZ))
    out_BxJxQxSxZ = jax.vmap(jax.vmap(kernel))(q_BxJxQxSxZ, k_BxJxSxZ, v_BxJxSxZ)
    return out_BxJxQxSxZ.transpose(0, 3, 1, 2, 4).reshape(b, s, h, z)
