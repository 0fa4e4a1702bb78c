"""The evaluation training runs and the evaluate command reports: held-out loss and perplexity,
and routing per layer (LBV, under-used experts, activation ratios, picks of other layers'
experts), from the expert loads an eval step returns over the full pool.

Training's evaluations (loop.py) and `python -m rexmoe_jax.evaluate` both call `held_out`, on
the same held-out batches, so eval.json and the eval lines of metrics.jsonl cannot disagree.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import sharding, trainer
from rexmoe_jax.config import Config, ModelConfig
from rexmoe_jax.model import metrics as metrics_lib
from rexmoe_jax.reuse import layer_pool_sizes
from rexmoe_jax.runtime import distributed


def held_out(eval_step, params, batches: list[np.ndarray], model: ModelConfig,
             put=jnp.asarray, rows_per_call: int | None = None) -> tuple[dict, np.ndarray]:
    """Mean next-token loss over `batches` (rows of S + 1 tokens), its perplexity, and routing
    on the full pool: the scalars of an eval line, and the (L, pool) expert loads.

    `eval_step` is trainer.make_eval_step jitted (training passes its sharded one, and `put`
    to place its host's rows); batches are weighted by their tokens, so evaluating each in
    pieces of `rows_per_call` rows (a training micro-batch, Config.micro_batch_rows: the logits
    of a whole batch at once need not fit a device) changes no result.
    """
    if rows_per_call is not None:
        batches = [batch[i:i + rows_per_call] for batch in batches
                   for i in range(0, len(batch), rows_per_call)]
    losses, loads, tokens = [], [], []
    for batch in batches:
        result = eval_step(params, put(batch))
        losses.append(float(result["loss"]))
        loads.append(np.asarray(result["expert_load"], np.float64))
        tokens.append(batch.shape[0] * (batch.shape[1] - 1))
    weights = np.asarray(tokens, np.float64) / sum(tokens)
    loss = float(np.dot(weights, losses))
    load = np.tensordot(weights, np.stack(loads), 1)
    routing = metrics_lib.routing_metrics(jnp.asarray(load), layer_pool_sizes(model))
    foreign = metrics_lib.foreign_share(load, model.num_experts, model.reuse)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "lbv_max": float(routing["lbv_max"]),
            "underused_share": float(routing["underused_share"]),
            "foreign_share": float(foreign.mean())}, load


def eval_set_scalars(eval_step, params, sets: dict[str, list[np.ndarray]], model: ModelConfig,
                     put=jnp.asarray, rows_per_call: int | None = None) -> dict:
    """The loss and perplexity of each named set of batches (data.eval_sets), as `held_out`
    computes the held-out split's: eval_loss/NAME and eval_ppl/NAME."""
    scalars = {}
    for name, batches in sets.items():
        found, _ = held_out(eval_step, params, batches, model, put, rows_per_call)
        scalars.update({f"eval_loss/{name}": found["eval_loss"], f"eval_ppl/{name}": found["eval_ppl"]})
    return scalars


def routing_report(load: np.ndarray, tokens: int, model: ModelConfig) -> dict:
    """Per layer: activation ratios over the pool (rows sum to K), the share of picks of experts
    owned by other layers of the group, LBV maxima and under-used shares, from `held_out`'s loads."""
    pools = layer_pool_sizes(model)
    routing = metrics_lib.routing_metrics(jnp.asarray(load), pools)
    layers = metrics_lib.layer_routing(load, pools, model.num_experts, model.reuse)
    return {
        "tokens": tokens,
        "activation_ratio": (load * model.top_k).round(6).tolist(),
        "foreign_share": layers["foreign_share"].round(6).tolist(),
        "layer_lbv_max": layers["lbv_max"].round(4).tolist(),
        "layer_underused_share": layers["underused_share"].tolist(),
        "lbv_max": float(routing["lbv_max"]),
        "underused_share": float(routing["underused_share"]),
    }


@functools.lru_cache(maxsize=4)
def eval_step_for(config: Config, eod_id: int | None = None):
    """trainer.make_eval_step, jitted for the mesh its arguments are on, and compiled on every
    process before any runs it (training compiles its own ahead); `eod_id`: the tokenizer's
    end-of-document id (data.document_masking needs it)."""
    model = trainer.build_model(config)
    return distributed.CompiledTogether(jax.jit(trainer.make_eval_step(config, model, eod_id)))


def placed(mesh: jax.sharding.Mesh | None):
    """`held_out`'s `put` for inference: a batch split over the mesh's batch axes (repeated whole
    where its rows do not divide, which leaves its means as they are)."""
    return lambda rows: sharding.put_rows(sharding.tile_rows(rows, mesh), mesh)


def routing_of(config: Config, params, batches: list[np.ndarray], mesh: jax.sharding.Mesh | None = None,
               eod_id: int | None = None) -> dict:
    """routing_report of `batches` (rows of S + 1 tokens), on the `mesh` where `params` live (by
    default the one they are placed on, if any); `eod_id` as eval_step_for's."""
    mesh = mesh if mesh is not None else sharding.mesh_of(params)
    with sharding.using(mesh):
        _, load = held_out(eval_step_for(config, eod_id), params, batches, config.model, placed(mesh),
                           config.micro_batch_rows)
    return routing_report(load, sum(b.shape[0] * (b.shape[1] - 1) for b in batches), config.model)


def sequences_to_batches(sequences, batch_size: int, limit: int | None = None) -> list[np.ndarray]:
    rows = [sequences[i] for i in range(min(len(sequences), limit or len(sequences)))]
    return [np.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
