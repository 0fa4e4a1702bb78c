"""The MoE FFN of one layer: its router over the pool, the dispatch path, the router statistics.

Shape letters: the glossary in rexmoe_jax/model/__init__.py.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rexmoe_jax.config import ComputeConfig, ModelConfig
from rexmoe_jax.model import expert_parallel, losses
from rexmoe_jax.model.dispatch import ExpertWeights, choose_path, route
from rexmoe_jax.model.layers import SwiGLU, param_init


class RouterStats(NamedTuple):
    """Per-layer routing statistics, stacked over layers by the scan."""

    load_balance: jax.Array  # Switch loss over the available experts; 1.0 for uniform routing
    z_loss: jax.Array
    expert_load_P: jax.Array  # share of the T*K assignments that went to each pool expert
    dropped: jax.Array  # share of assignments dropped for capacity (capacity dispatch, expert parallelism)
    available_P: jax.Array  # share of tokens that could choose each pool expert (PSR masks the rest)


class MoEFFN(nn.Module):
    """One layer's MoE FFN: its own router over a pool of experts it may share with its group.
    With r = 1 the pool is the layer's own N experts: a plain top-K MoE layer."""

    config: ModelConfig
    compute: ComputeConfig
    pool_size: int
    live_experts: int  # the fewest experts PSR leaves available; capacity is spread over them
    balance_over: str = "available"  # psr.balance_over

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, weights: ExpertWeights,
                 available_TxP: jax.Array | None) -> tuple[jax.Array, RouterStats]:
        cfg = self.config
        b, s, d = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(b * s, d)
        # Router in float32: top-K and the aux losses are sensitive to bf16 rounding of logits.
        router_DxP = self.param("router", param_init(cfg.init_std, ("embed", "pool")),
                                (d, self.pool_size), jnp.float32)
        with jax.named_scope("router"):  # Named scopes label the parts in a profile.
            logits_TxP = x_TxD.astype(jnp.float32) @ router_DxP
        bias_P = None
        if cfg.router_bias:
            # Auxiliary-loss-free balancing: the trainer moves this after each step
            # (balancing.bias_step); it gets no gradient and the optimizer skips it.
            bias_P = self.param("router_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("pool",)),
                                (self.pool_size,), jnp.float32)
        routing = route(logits_TxP, available_TxP, cfg.top_k, cfg.renormalize_gates, bias_P)
        # Kept only when applied with mutable=["intermediates"] (routing analysis and tests).
        self.sow("intermediates", "experts", routing.experts_TxK)
        self.sow("intermediates", "gates", routing.gates_TxK)

        live_share = self.live_experts / self.pool_size
        choice = choose_path(self.compute, live_share)
        if choice.sharded:
            y_TxD, dropped = expert_parallel.sharded_experts(
                x_TxD, routing, weights, choice.path, exchange=choice.exchange,
                implementation=self.compute.grouped_matmul, capacity_factor=self.compute.capacity_factor,
                permute=choice.permute, live_share=live_share)
        else:
            y_TxD, dropped = choice.path(x_TxD, routing, weights, lambda y: y)
        # `weights` arrive in the compute dtype: LayerGroup casts the pool once.
        y_BxSxD = y_TxD.reshape(b, s, d).astype(x_BxSxD.dtype)
        if cfg.num_shared_experts:
            # Decision: shared experts stay per layer; only routed experts are pooled.
            y_BxSxD = y_BxSxD + SwiGLU(cfg, self.compute, cfg.num_shared_experts * cfg.expert_ffn,
                                       name="shared_experts")(x_BxSxD)

        with jax.named_scope("aux_losses"):
            expert_load_P = jnp.bincount(routing.experts_TxK.reshape(-1), length=self.pool_size) / (
                b * s * cfg.top_k)
            stats = RouterStats(
                load_balance=losses.load_balancing_loss(expert_load_P, logits_TxP, available_TxP,
                                                        self.balance_over),
                z_loss=losses.router_z_loss(logits_TxP),
                expert_load_P=expert_load_P, dropped=dropped,
                available_P=(jnp.ones((self.pool_size,), jnp.float32) if available_TxP is None
                             else jnp.mean(available_TxP.astype(jnp.float32), axis=0)))
        return y_BxSxD, stats
