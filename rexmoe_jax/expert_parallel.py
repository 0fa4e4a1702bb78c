"""The MoE dispatch on a device mesh: inside `jax.shard_map`, each device sorts only its own
tokens, and with an expert axis the tokens travel to the devices holding their experts and back.

A group's pool of P = r*N experts is split over the E devices of the expert axis (P/E each:
expert p lives on device p // (P/E)). Per device, with T local tokens and K choices each:

  1. sort the T*K assignments by expert, hence by destination device, and pack them into an
     (E, C, D) send buffer, C slots per destination (assignments beyond C are dropped);
  2. all_to_all over the expert axis: device e receives every device's slots for its experts;
  3. run the received rows through the local experts (sorted again by local expert, one
     grouped matmul per projection; empty slots give zeros);
  4. all_to_all back, and combine: each kept assignment's row, weighted by its gate, summed
     over the token's K choices.

The capacity C is T*K (compute.capacity_factor = 0: nothing can be dropped) or
ceil(capacity_factor * T*K / E), filled in token order. XLA:CPU has no ragged all-to-all, so the buffers have a fixed
size; the share of dropped assignments is returned as a metric. Expert widths split over the
tensor axis give partial sums of the down projection, added with a psum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.token_permute import inverse_permutation
from rexmoe_jax import sharding
from rexmoe_jax.dispatch import (
    ExpertWeights,
    Path,
    Routing,
    bucket_slots,
    capacity,
    gather_from_slots,
    grouped_swiglu,
)
from rexmoe_jax.sharding import BATCH_AXES


def _local_expert_rows(x_YxD, local_expert_Y, weights: ExpertWeights, implementation: str):
    """Each received row through its local expert; rows marked with the sentinel id P_l
    (empty slots) give zeros."""
    pool_local = weights.gate_PxDxF.shape[0]
    order = jnp.argsort(local_expert_Y, stable=True)
    sizes = jnp.bincount(local_expert_Y, length=pool_local).astype(jnp.int32)  # sentinel not counted
    y_sorted = grouped_swiglu(x_YxD[order], sizes, weights, implementation)
    return y_sorted[inverse_permutation(order)]


def _all_to_all_experts(x_TxD, gates_TxK, experts_TxK, weights: ExpertWeights, *, num_shards: int,
                        capacity_factor: float, live_share: float, implementation: str):
    num_tokens, top_k = experts_TxK.shape
    pool_local = weights.gate_PxDxF.shape[0]
    experts_A = experts_TxK.reshape(-1)
    # Destination device = expert // P_l; C slots per destination, in token order.
    slots = bucket_slots(experts_A // pool_local, num_shards,
                         capacity(num_tokens * top_k, num_shards, capacity_factor, live_share))
    send_x = jnp.where(slots.filled_Y[:, None], x_TxD[slots.source_Y // top_k], 0)
    send_e = jnp.where(slots.filled_Y, experts_A[slots.source_Y] % pool_local, pool_local)

    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)
    y_recv = _local_expert_rows(recv_x, recv_e, weights, implementation)
    y_S = jax.lax.all_to_all(y_recv, "expert", 0, 0, tiled=True)
    return gather_from_slots(y_S, slots, gates_TxK), jnp.mean((~slots.kept_A).astype(jnp.float32))


def sharded_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights, local: Path, *,
                    implementation: str, capacity_factor: float,
                    live_share: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The MoE dispatch over the current mesh (a one-device mesh when none is set, so one device
    runs the same code as many): (outputs, share of dropped assignments). `local` is the path
    each device runs on its own tokens when the expert axis has one device; with more, tokens
    travel to their experts' devices in fixed-size buffers."""
    mesh = sharding.current_mesh()
    num_shards = mesh.shape["expert"]

    # Each tensor shard holds a slice of F, so its down projections are partial sums: psum them
    # (with one shard the psum is free, and it tells shard_map the result is the same on every
    # shard). Local paths sum their rows before the combine, whose custom gradient expects
    # complete rows.
    def tensor_sum(y):
        return jax.lax.psum(y, "tensor")

    def body(x, gates, experts, gate_w, up_w, down_w):
        w = ExpertWeights(gate_w, up_w, down_w)
        if num_shards > 1:
            y, dropped = _all_to_all_experts(x, gates, experts, w, num_shards=num_shards,
                                             capacity_factor=capacity_factor, live_share=live_share,
                                             implementation=implementation)
            y = tensor_sum(y)
        else:
            y, dropped = local(x, Routing(gates, experts, None), w, tensor_sum)
        return y, dropped[None]

    tokens = P(BATCH_AXES, None)
    y, dropped = jax.shard_map(
        body, mesh=mesh,
        in_specs=(tokens, tokens, tokens, P("expert", None, "tensor"), P("expert", None, "tensor"),
                  P("expert", "tensor", None)),
        out_specs=(tokens, P(BATCH_AXES)))(x_TxD, routing.gates_TxK, routing.experts_TxK, *weights)
    return y, jnp.mean(dropped)
