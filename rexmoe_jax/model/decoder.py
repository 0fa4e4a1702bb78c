"""The ReXMoE decoder: embed -> scan over groups of r layers -> norm -> logits.

Parameter layout. Layers are cut into groups of r consecutive layers (Eq. 4). A group owns one
pool of r*N experts (exactly the r layers' N experts each, so expert parameters are the
baseline's) and every layer of the group routes over all of them with its own router of shape
(D, r*N). The stack is an `nn.scan` over groups whose body is an `nn.scan` over the group's
layers, with the pool broadcast to every layer: compile time does not grow with L or r. When r
does not divide L, the remaining layers form one smaller group, scanned separately.

    params/token_embed                     (vocab, embed)
    params/groups/experts_{gate,up,down}   (groups, expert, embed|mlp, mlp|embed)
    params/groups/layers/...               (groups, layers, ...)   attention, norms, router
    params/last_group/...                  the same with groups = 1, when L % r != 0
    params/final_norm, params/lm_head

Logical axis names (mapped to mesh axes by the one table in sharding.py):
    vocab, embed, heads, kv_heads, head_dim, mlp   dense weights
    expert                                         the pool axis of expert weights
    pool                                           a router's output axis
    groups, layers                                 the two scanned axes
    norm                                           norm scales

Shape letters: the glossary in the model package's docstring (rexmoe_jax/model/__init__.py).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import reuse
from rexmoe_jax.config import ComputeConfig, ModelConfig, PSRConfig
from rexmoe_jax.model import psr as psr_lib
from rexmoe_jax.model.dispatch import ExpertWeights, kernel_aligned
from rexmoe_jax.model.layers import (
    Attention,
    RMSNorm,
    Segments,
    SwiGLU,
    dtype_of,
    output_init_std,
    output_logits,
    param_init,
)
from rexmoe_jax.model.moe import MoEFFN, RouterStats


class PSRInputs(NamedTuple):
    """What a training step gives the model for PSR: a key already folded with (seed, step), the
    optimizer step, and which of the step's micro-batches this is (gradient accumulation: a
    per-token mask is keyed by the token's row in the whole batch). Evaluation and generation
    pass None: they always see the full pool."""

    key: jax.Array
    step: jax.Array
    micro_batch: jax.Array | int = 0


_REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole layer in the backward pass.
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nn.Module):
    """Pre-norm attention and MoE FFN, each added to the residual stream."""

    config: ModelConfig
    compute: ComputeConfig
    psr: PSRConfig
    pool_size: int
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxSxD, layer_id, weights: ExpertWeights, positions_BxS,
                 psr_state: tuple[PSRInputs, jax.Array] | None, segments: Segments | None):
        cfg, compute = self.config, self.compute
        dtype = dtype_of(compute.dtype)
        h_BxSxD = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x_BxSxD)
        attention = Attention(cfg, compute, self.decode, name="attention")
        x_BxSxD = x_BxSxD + attention(h_BxSxD, positions_BxS, segments)
        h_BxSxD = RMSNorm(cfg.norm_eps, dtype, name="ffn_norm")(x_BxSxD)
        if cfg.ffn == "dense":
            y_BxSxD = SwiGLU(cfg, compute, cfg.dense_ffn, name="ffn")(h_BxSxD)
            return _constrain(x_BxSxD + y_BxSxD), _no_routing(self.pool_size)
        available_TxP, live = None, self.pool_size
        if psr_state is not None:
            inputs, pool_size_t = psr_state
            live = reuse.initial_pool(self.psr.initial_experts, cfg.num_experts, self.pool_size)
            with jax.named_scope("psr_mask"):  # Named scopes label the parts in a profile.
                available_TxP = psr_lib.available(
                    inputs.key, layer_id, pool_size_t, psr=self.psr, pool_size=self.pool_size,
                    num_experts=cfg.num_experts, reuse_factor=cfg.reuse,
                    num_tokens=h_BxSxD.shape[0] * h_BxSxD.shape[1], micro_batch=inputs.micro_batch)
        moe = MoEFFN(cfg, compute, self.pool_size, live, self.psr.balance_over, name="moe")
        y_BxSxD, stats = moe(h_BxSxD, weights, available_TxP)
        return _constrain(x_BxSxD + y_BxSxD), stats


class LayerGroup(nn.Module):
    """A group of `size` consecutive layers sharing one pool of size*N experts."""

    config: ModelConfig
    compute: ComputeConfig
    psr: PSRConfig
    size: int
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxSxD, layer_ids_R, positions_BxS, psr: PSRInputs | None,
                 segments: Segments | None):
        cfg = self.config
        pool, d, f = self.size * cfg.num_experts, cfg.d_model, cfg.expert_ffn
        weights = None if cfg.ffn == "dense" else self._pool(pool, d, f)
        psr_state = None
        if psr is not None:  # N_t once per group: its layers share the pool and the schedule.
            with jax.named_scope("psr_mask"):
                psr_state = (psr, psr_lib.pool_size_t(psr.step, self.psr, cfg.num_experts, pool))

        layer = DecoderLayer
        if self.compute.remat != "none":
            layer = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[self.compute.remat], prevent_cse=False)
        layers = nn.scan(layer, variable_axes={"params": 0, "intermediates": 0, "cache": 0},
                         split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                         length=self.size,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        return layers(cfg, self.compute, self.psr, pool, self.decode, name="layers")(
            x_BxSxD, layer_ids_R, weights, positions_BxS, psr_state, segments)

    def _pool(self, pool: int, d: int, f: int) -> ExpertWeights:
        """The group's experts, cast (and padded for the grouped-matmul kernel) once for the
        group, not once per layer that shares the pool."""
        cfg = self.config
        weights = ExpertWeights(
            self.param("experts_gate", param_init(cfg.init_std, ("expert", "embed", "mlp")), (pool, d, f)),
            self.param("experts_up", param_init(cfg.init_std, ("expert", "embed", "mlp")), (pool, d, f)),
            self.param("experts_down", param_init(output_init_std(cfg), ("expert", "mlp", "embed")),
                       (pool, f, d)))
        weights = ExpertWeights(*(w.astype(dtype_of(self.compute.dtype)) for w in weights))
        return kernel_aligned(weights, self.compute)


class Decoder(nn.Module):
    """Maps tokens (B, S) to float32 logits (B, S, V) and per-layer router statistics.

    `segments` packs several sequences into a row (layers.Segments; scoring only); routing is
    per token, so with a dropless dispatch packing changes no token's output."""

    config: ModelConfig
    compute: ComputeConfig = ComputeConfig()
    psr: PSRConfig = PSRConfig()
    decode: bool = False  # Keep a KV cache ("cache" collection) for incremental decoding.

    @nn.compact
    def __call__(self, tokens_BxS: jax.Array, positions_BxS: jax.Array | None = None,
                 psr: PSRInputs | None = None,
                 segments: Segments | None = None) -> tuple[jax.Array, RouterStats]:
        cfg = self.config
        dtype = dtype_of(self.compute.dtype)
        compute = self.compute
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
        elif compute.attention != "xla":
            # The mask must follow the given positions; the flash kernel masks by index only.
            compute = dataclasses.replace(compute, attention="xla")
        embed_VxD = self.param("token_embed", param_init(cfg.init_std, ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), jnp.float32)
        with jax.named_scope("embed"):  # Named scopes label the parts in a profile.
            x_BxSxD = _constrain(jnp.take(embed_VxD, tokens_BxS, axis=0).astype(dtype))

        stats = []
        for name, layer_ids_GxR in zip(("groups", "last_group"), reuse.group_layer_ids(cfg)):
            groups = nn.scan(LayerGroup, variable_axes={"params": 0, "intermediates": 0, "cache": 0},
                             split_rngs={"params": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                             length=layer_ids_GxR.shape[0],
                             metadata_params={nn.PARTITION_NAME: "groups"})
            x_BxSxD, block_stats = groups(cfg, compute, self.psr, layer_ids_GxR.shape[1], self.decode,
                                          name=name)(x_BxSxD, layer_ids_GxR, positions_BxS, psr, segments)
            stats.append(_flatten_layers(block_stats, cfg.pool_size))

        x_BxSxD = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x_BxSxD)
        if cfg.tie_embeddings:
            head_DxV = embed_VxD.T
        else:
            head_DxV = self.param("lm_head", param_init(cfg.init_std, ("embed", "vocab")),
                                  (cfg.d_model, cfg.vocab_size), jnp.float32)
        with jax.named_scope("output_head"):
            logits_BxSxV = output_logits(x_BxSxD, head_DxV.astype(dtype))
        return logits_BxSxV, jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats)


def _constrain(x_BxSxD: jax.Array) -> jax.Array:
    """The residual stream is split over the batch axes (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x_BxSxD, ("batch", "seq", "act_embed"))


def _no_routing(pool_size: int) -> RouterStats:
    """A dense layer's router statistics: no loss, no load, no experts available."""
    zero, zeros_P = jnp.zeros((), jnp.float32), jnp.zeros((pool_size,), jnp.float32)
    return RouterStats(load_balance=zero, z_loss=zero, expert_load_P=zeros_P, dropped=zero, available_P=zeros_P)


def _flatten_layers(stats: RouterStats, pool_size: int) -> RouterStats:
    """(groups, layers, ...) -> (L_block, ...); loads of a smaller last group are zero-padded
    to the full pool so that all layers stack into one (L, r*N) array."""
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), stats)
    pad = ((0, 0), (0, pool_size - flat.expert_load_P.shape[-1]))
    return flat._replace(expert_load_P=jnp.pad(flat.expert_load_P, pad), available_P=jnp.pad(flat.available_P, pad))


def per_layer_norms(tree, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """L2 norms of a parameter-shaped tree (e.g. gradients) per layer, (L,), over each layer's
    own weights, and per group, (groups,), over each group's expert pool."""
    layer_sq, pool_sq = [], []
    for name in ("groups", "last_group"):
        if name not in tree:
            continue
        layers = jax.tree.leaves(tree[name]["layers"])
        layer_sq.append(sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(2, x.ndim)))
                            for x in layers).reshape(-1))
        pool = [tree[name][k] for k in ("experts_gate", "experts_up", "experts_down")
                if k in tree[name]]  # none in a dense model (model.ffn=dense)
        groups = jax.tree.leaves(tree[name]["layers"])[0].shape[0]
        pool_sq.append(sum((jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2, 3)) for x in pool),
                           jnp.zeros((groups,), jnp.float32)))
    return jnp.sqrt(jnp.concatenate(layer_sq)), jnp.sqrt(jnp.concatenate(pool_sq))


def param_counts(params, config: ModelConfig) -> dict[str, int]:
    """Parameter counts the way the paper names its models: total including embeddings, active
    (used per token) excluding embeddings."""
    def leaf_sizes(predicate):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        return sum(int(np.prod(leaf.shape)) for path, leaf in flat
                   if predicate(jax.tree_util.keystr(path)))

    total = leaf_sizes(lambda path: True)
    embedding = leaf_sizes(lambda path: "token_embed" in path or "lm_head" in path)
    routed = leaf_sizes(lambda path: "experts_" in path)
    router = leaf_sizes(lambda path: "router" in path)
    # Each layer evaluates K of its pool's experts per token; the pools hold L*N experts in all.
    active_routed = routed * config.top_k // config.num_experts
    return {"params_total": total, "params_active": total - embedding - routed + active_routed,
            "params_router": router, "params_embedding": embedding, "params_routed_experts": routed}
