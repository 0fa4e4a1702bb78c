"""RMSNorm, rotary embeddings and grouped-query attention (XLA and the flash kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention as flash
from rexmoe_jax import sharding
from rexmoe_jax.config import ComputeConfig, ConfigError
from rexmoe_jax.model import layers


def test_rms_norm_by_hand(maybe_jit):
    x = np.array([[[3.0, 4.0]]], np.float32)  # rms = sqrt(12.5)
    norm = layers.RMSNorm(eps=0.0, dtype=jnp.float32)
    variables = {"params": {"scale": jnp.asarray([1.0, 2.0])}}
    out = maybe_jit(norm.apply)(variables, jnp.asarray(x))
    np.testing.assert_allclose(out, [[[3 / 12.5 ** 0.5, 8 / 12.5 ** 0.5]]], rtol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    """<rope(q, m), rope(k, n)> is a function of m - n, and rope preserves norms."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    rot = lambda x, p: layers.apply_rope(x, jnp.asarray([[p]]), 10_000.0)[0, 0, 0]
    s1 = float(jnp.dot(rot(q, 7), rot(k, 3)))
    s2 = float(jnp.dot(rot(q, 104), rot(k, 100)))
    assert s1 == pytest.approx(s2, rel=1e-4)
    assert float(jnp.linalg.norm(rot(q, 5))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
    # Position 0 is the identity.
    np.testing.assert_allclose(rot(q, 0), q[0, 0, 0], rtol=1e-6)


def test_documents_restart_after_each_end_token_by_hand():
    """End-of-document id 9: a document ends with its 9 (which belongs to it) and the next
    begins after it; positions restart there. Two 9s in a row make a document of one token."""
    tokens = np.array([[5, 9, 3, 4, 9, 9, 7], [9, 1, 2, 3, 4, 5, 6]], np.int32)
    segments, positions = jax.jit(layers.documents, static_argnums=1)(jnp.asarray(tokens), 9)
    assert np.asarray(segments.document_BxS).tolist() == [[1, 1, 2, 2, 2, 3, 4], [1, 2, 2, 2, 2, 2, 2]]
    assert np.asarray(positions).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    assert not np.asarray(segments.branch_BxS).any()


def numpy_attention(q, k, v):
    """Causal grouped-query attention written out: query head h uses key/value head h // (H / J)."""
    b, s, h, z = q.shape
    kv = np.repeat(k, h // k.shape[2], axis=2), np.repeat(v, h // v.shape[2], axis=2)
    logits = np.einsum("bshz,buhz->bhsu", q.astype(np.float64), kv[0]) / np.sqrt(z)
    logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhsu,buhz->bshz", p / p.sum(-1, keepdims=True), kv[1])


def test_grouped_query_attention_by_numpy(maybe_jit):
    """Each query head attends with its group's key/value head, causally."""
    rng = np.random.default_rng(1)
    b, s, h, v, k = 2, 5, 4, 2, 3
    q, kk, vv = (rng.standard_normal(shape).astype(np.float32) for shape in
                 [(b, s, h, k), (b, s, v, k), (b, s, v, k)])
    pos = np.broadcast_to(np.arange(s), (b, s))
    out = maybe_jit(layers.causal_attention)(q, kk, vv, pos, pos)
    expected = np.zeros((b, s, h, k))
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // v)
            for t in range(s):
                logits = kk[bi, :t + 1, kv] @ q[bi, t, hi] / np.sqrt(k)
                p = np.exp(logits - logits.max())
                expected[bi, t, hi] = (p / p.sum()) @ vv[bi, :t + 1, kv]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(numpy_attention(q, kk, vv), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_logits_and_their_written_out_gradients_by_numpy(maybe_jit, dtype):
    """On CPU the head's gradient is written out (x transposed first): logits x @ head in
    float32, d x = g head^T and d head = x^T g, each in its input's dtype."""
    rng = np.random.default_rng(3)
    x, head, g = (rng.standard_normal(shape).astype(np.float32) for shape in [(2, 5, 8), (8, 11), (2, 5, 11)])
    x_in, head_in = jnp.asarray(x, dtype), jnp.asarray(head, dtype)
    x, head = np.asarray(x_in, np.float32), np.asarray(head_in, np.float32)  # the values the matmul sees

    def weighted(x_BxSxD, head_DxV):
        return jnp.sum(layers.output_logits(x_BxSxD, head_DxV) * g)

    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == jnp.float32 else {"rtol": 2e-2, "atol": 5e-2}
    logits = maybe_jit(layers.output_logits)(x_in, head_in)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, x @ head, **tolerance)
    dx, dhead = maybe_jit(jax.grad(weighted, argnums=(0, 1)))(x_in, head_in)
    assert dx.dtype == dtype and dhead.dtype == dtype
    np.testing.assert_allclose(np.asarray(dx, np.float32), g @ head.T, **tolerance)
    np.testing.assert_allclose(np.asarray(dhead, np.float32), x.reshape(-1, 8).T @ g.reshape(-1, 11), **tolerance)
    # The written-out gradient is what runs here: its transposed copy sits behind a barrier.
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(weighted, argnums=1))(x_in, head_in))


def test_flash_attention_by_numpy_and_its_gradients():
    """The flash kernel (TPU interpret mode on this CPU) over 384 tokens, three blocks of 128
    (the diagonal blocks masked, the blocks above skipped), 4 query heads on 2 key/value heads:
    the outputs against NumPy, the gradients against the XLA attention's."""
    rng = np.random.default_rng(2)
    b, s, h, j, z = 1, 384, 4, 2, 32
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
               [(b, s, h, z), (b, s, j, z), (b, s, j, z)])
    np.testing.assert_allclose(flash.causal(q, k, v), numpy_attention(*map(np.asarray, (q, k, v))),
                               rtol=1e-4, atol=1e-5)
    weights = jnp.asarray(rng.standard_normal((b, s, h, z)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    grads = jax.grad(lambda *qkv: jnp.sum(flash.causal(*qkv) * weights), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *qkv: jnp.sum(layers.causal_attention(*qkv, pos, pos) * weights),
                        argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name)


def test_flash_attention_refuses_what_it_cannot_take(monkeypatch):
    q = jnp.zeros((1, 200, 4, 32))
    with pytest.raises(ValueError, match="multiple of 128"):
        flash.causal(q, q[:, :, :2], q[:, :, :2])
    assert flash.applies(4096) and not flash.applies(200)
    auto, xla = ComputeConfig(), ComputeConfig(attention="xla")
    assert layers.flash_applies(auto, 4096, "tpu") and not layers.flash_applies(auto, 4096, "cpu")
    assert not layers.flash_applies(auto, 200, "tpu") and not layers.flash_applies(xla, 4096, "tpu")
    monkeypatch.setattr(sharding, "platform", lambda: "gpu")  # a step compiled for GPUs
    q = jnp.zeros((1, 128, 4, 32))
    with pytest.raises(ConfigError, match="TPU kernel .* use compute.attention=xla"):
        layers.flash_attention(q, q[:, :, :2], q[:, :, :2])
