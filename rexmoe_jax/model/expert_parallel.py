"""The MoE dispatch on a device mesh: inside `jax.shard_map`, each device sorts only its own
tokens, and with an expert axis the tokens travel to the devices holding their experts and back.

A group's pool of P = r*N experts is split over the E devices of the expert axis (P_l = P/E
each: expert p lives on device p // P_l). Per device, with T local tokens and K choices each,
the T*K assignments are sorted by expert, hence by destination device. Then one of two
exchanges (`compute.expert_exchange`, chosen by dispatch.choose_path):

"ragged" (dropless; the default on GPU and TPU). The per-expert row counts of every device are
all-gathered (E x P int32), from which every device knows where each of its slices lands. One
ragged_all_to_all sends each destination exactly its rows, placed by local expert and then by
sender, so the local experts run on contiguous rows (one grouped matmul per projection) with
no second sort; a second ragged_all_to_all sends the results back into the sender's sorted
order, and the combine weights them by the gates. Each device sends T*K rows each way; its
receive buffer holds E*T*K rows, the worst case (every token routed to one device).

"fixed". Assignments are packed into an (E, C, D) buffer, C slots per destination, filled in
token order (past C they are dropped); all_to_all there, the local experts (sorted again by
local expert; empty slots give zeros), all_to_all back. C is T*K (compute.capacity_factor = 0:
nothing can be dropped, E times the ragged traffic) or ceil(capacity_factor * T*K / E); the
share of dropped assignments is returned as a metric.

Expert widths split over the tensor axis give partial sums of the down projection, added with
a psum over "tensor" before the combine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import token_permute
from pallas_kernels.token_permute import inverse_permutation
from rexmoe_jax import sharding
from rexmoe_jax.model import collectives
from rexmoe_jax.model.dispatch import (
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


def _exclusive_cumsum(counts, axis=-1):
    return jnp.cumsum(counts, axis=axis) - counts


def _ragged_experts(x_TxD, gates_TxK, experts_TxK, weights: ExpertWeights, reduce_rows, *, num_shards: int,
                    implementation: str, permute: str):
    top_k = experts_TxK.shape[1]
    pool_local = weights.gate_PxDxF.shape[0]
    experts_A = experts_TxK.reshape(-1)
    order_A = jnp.argsort(experts_A, stable=True).astype(jnp.int32)
    inverse_A = inverse_permutation(order_A)
    x_AxD = token_permute.permute(x_TxD, order_A, inverse_A, top_k, implementation=permute,
                                  platform=sharding.platform())

    # c[s, r, p]: rows device s sends to local expert p of device r. Slice g = r*P_l + p of a
    # sender is its rows for expert g; receiver r keeps them by expert p, then by sender s.
    counts_P = jnp.bincount(experts_A, length=num_shards * pool_local).astype(jnp.int32)
    counts_ExP = jax.lax.all_gather(counts_P, "expert")
    c_ExExPl = counts_ExP.reshape(num_shards, num_shards, pool_local)
    block_start_ExPl = _exclusive_cumsum(jnp.sum(c_ExExPl, axis=0))  # [r, p]: expert p's rows on r
    landing_ExExPl = block_start_ExPl[None] + _exclusive_cumsum(c_ExExPl, axis=0)  # [s, r, p]
    sorted_start_ExP = _exclusive_cumsum(counts_ExP)  # [s, g]: expert g's rows in s's sorted order
    me = jax.lax.axis_index("expert")

    def exchange(operand, rows_out, *offsets_and_sizes):
        output = jnp.zeros_like(operand, shape=(rows_out, operand.shape[1]))  # typed per device, as the rows
        return collectives.ragged_all_to_all(operand, output, *offsets_and_sizes, axis_name="expert")

    mine_to_ExPl = c_ExExPl[me]  # [r, p]: what I send
    to_me_ExPl = c_ExExPl[:, me]  # [s, p]: what I receive
    received_YxD = exchange(x_AxD, num_shards * experts_A.shape[0], sorted_start_ExP[me], counts_P,
                            landing_ExExPl[me].reshape(-1), to_me_ExPl.reshape(-1))
    y_YxD = grouped_swiglu(received_YxD, jnp.sum(to_me_ExPl, axis=0), weights, implementation)
    back_start_ExPl = sorted_start_ExP.reshape(num_shards, num_shards, pool_local)[:, me]  # [s, p]
    y_AxD = exchange(y_YxD, experts_A.shape[0], landing_ExExPl[:, me].reshape(-1), to_me_ExPl.reshape(-1),
                     back_start_ExPl.reshape(-1), mine_to_ExPl.reshape(-1))
    return token_permute.combine(reduce_rows(y_AxD), order_A, inverse_A, gates_TxK, implementation=permute,
                                 platform=sharding.platform())


def sharded_experts(x_TxD: jax.Array, routing: Routing, weights: ExpertWeights, local: Path, *,
                    exchange: str, implementation: str, capacity_factor: float, permute: str = "xla",
                    live_share: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The MoE dispatch over the current mesh (a one-device mesh when none is set, so one device
    runs the same code as many): (outputs, share of dropped assignments). `local` is the path
    each device runs on its own tokens when the expert axis has one device; with more, tokens
    travel to their experts' devices by the `exchange` ("ragged" or "fixed", see the module doc)."""
    mesh = sharding.current_mesh()
    num_shards = mesh.shape["expert"]

    # Each tensor shard holds a slice of F, so its down projections are partial sums: psum them
    # (with one shard the psum is free, and it tells shard_map the result is the same on every
    # shard). Paths that combine with token_permute sum their rows before the combine, whose
    # custom gradient expects complete rows.
    def tensor_sum(y):
        return jax.lax.psum(y, "tensor")

    def body(x, gates, experts, gate_w, up_w, down_w):
        w = ExpertWeights(gate_w, up_w, down_w)
        if num_shards > 1 and exchange == "ragged":
            y = _ragged_experts(x, gates, experts, w, tensor_sum, num_shards=num_shards,
                                implementation=implementation, permute=permute)
            dropped = jnp.zeros((), jnp.float32)
        elif num_shards > 1:
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
