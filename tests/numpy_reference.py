"""An independent float64 NumPy implementation of the ReXMoE decoder, written from the method
digest, for tests. It reads the Flax parameter tree but shares no code with rexmoe_jax."""

from __future__ import annotations

import numpy as np


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, base):
    # x: (S, H, K); rotate-half convention.
    half = x.shape[-1] // 2
    inv_freq = base ** (-np.arange(half) / half)
    ang = positions[:, None] * inv_freq[None, :]
    sin, cos = np.sin(ang)[:, None, :], np.cos(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _silu(x):
    return x / (1 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_params(params, cfg, layer):
    """Layer `layer`'s own parameters and its group's expert pool, from the stacked tree."""
    r, n_full = cfg.reuse, cfg.num_layers // cfg.reuse
    if layer < n_full * r:
        block, g, j = params["groups"], layer // r, layer % r
    else:
        block, g, j = params["last_group"], 0, layer - n_full * r
    pick = lambda tree: {k: (pick(v) if isinstance(v, dict) else np.asarray(v[g, j], np.float64))
                         for k, v in tree.items()}
    own = pick(block["layers"])
    pool = {name: np.asarray(block[f"experts_{name}"][g], np.float64) for name in ("gate", "up", "down")}
    return own, pool


def moe(h, own, pool, cfg, available=None):
    """Eq. 2-3 for one sequence: h (S, D) -> (S, D), and the chosen experts (S, K)."""
    probs = _softmax(h @ own["moe"]["router"])
    scores = probs if available is None else np.where(available, probs, -1.0)
    chosen = np.argsort(-scores, axis=-1, kind="stable")[:, :cfg.top_k]
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        gates = probs[t, chosen[t]]
        if cfg.renormalize_gates:
            gates = gates / gates.sum()
        for gate, e in zip(gates, chosen[t]):
            out[t] += gate * (_silu(h[t] @ pool["gate"][e]) * (h[t] @ pool["up"][e])) @ pool["down"][e]
    if cfg.num_shared_experts:
        sh = own["moe"]["shared_experts"]
        out += (_silu(h @ sh["gate"]) * (h @ sh["up"])) @ sh["down"]
    return out, chosen


def forward(params, cfg, tokens):
    """Logits (B, S, V) for int tokens (B, S), and every layer's chosen experts (L, B, S, K)."""
    embed = np.asarray(params["token_embed"], np.float64)
    all_logits, all_chosen = [], []
    for seq in np.asarray(tokens):
        x = embed[seq]
        positions = np.arange(len(seq), dtype=np.float64)
        chosen_layers = []
        for layer in range(cfg.num_layers):
            own, pool = layer_params(params, cfg, layer)
            h = _rms_norm(x, own["attn_norm"]["scale"], cfg.norm_eps)
            att = own["attention"]
            q = _rope(np.einsum("sd,dhk->shk", h, att["query"]), positions, cfg.rope_base)
            k = _rope(np.einsum("sd,dhk->shk", h, att["key"]), positions, cfg.rope_base)
            v = np.einsum("sd,dhk->shk", h, att["value"])
            group = cfg.num_heads // cfg.num_kv_heads
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            logits = np.einsum("shk,thk->hst", q, k) / np.sqrt(q.shape[-1])
            logits = np.where(np.tril(np.ones((len(seq), len(seq)), bool))[None], logits, -np.inf)
            o = np.einsum("hst,thk->shk", _softmax(logits), v)
            x = x + np.einsum("shk,hkd->sd", o, att["out"])
            y, chosen = moe(_rms_norm(x, own["ffn_norm"]["scale"], cfg.norm_eps), own, pool, cfg)
            x = x + y
            chosen_layers.append(chosen)
        x = _rms_norm(x, np.asarray(params["final_norm"]["scale"]), cfg.norm_eps)
        head = embed.T if cfg.tie_embeddings else np.asarray(params["lm_head"], np.float64)
        all_logits.append(x @ head)
        all_chosen.append(np.stack(chosen_layers))
    return np.stack(all_logits), np.stack(all_chosen, axis=1)
