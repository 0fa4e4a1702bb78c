"""The train state and the pure jitted steps (the host loop around them is loop.py).

`train_step(state, batch) -> (state, metrics)` has no side effects. Everything random follows
from (seed, step): the batch (data.py), the PSR masks (a key folded with the step) and the
schedules (functions of `state.step`, the optimizer's update count). The host loop alone logs,
evaluates, checkpoints and prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rexmoe_jax import sharding
from rexmoe_jax.config import Config
from rexmoe_jax.model import balancing, losses
from rexmoe_jax.model import metrics as metrics_lib
from rexmoe_jax.model.decoder import Decoder, PSRInputs, param_counts, per_layer_norms
from rexmoe_jax.model.layers import documents
from rexmoe_jax.optimizer import learning_rate_schedule
from rexmoe_jax.reuse import layer_pool_sizes

# Independent random streams derived from train.seed.
_INIT_STREAM, _PSR_STREAM, SAMPLE_STREAM = 0, 1, 2


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # Optimizer updates applied so far; drives the LR and PSR schedules.
    params: Any
    opt_state: Any


def build_model(config: Config) -> Decoder:
    return Decoder(config.model, config.compute, config.psr)


def _boxed_params(config: Config, model: Decoder):
    """Float32 parameters whose leaves carry their logical axis names (nn.Partitioned)."""
    key = jax.random.fold_in(jax.random.key(config.train.seed), _INIT_STREAM)
    return model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]


def _boxed_state(config: Config, model: Decoder, tx: optax.GradientTransformation) -> TrainState:
    params = _boxed_params(config, model)  # optax keeps the boxes: moments get the same names
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_params(config: Config, model: Decoder):
    """Unboxed float32 parameters, on the default device."""
    return jax.jit(lambda: nn.meta.unbox(_boxed_params(config, model)))()


def state_shardings(config: Config, model: Decoder, tx: optax.GradientTransformation, mesh) -> TrainState:
    """Where each leaf of the train state lives on `mesh`, from the logical-axis rules."""
    return sharding.logical_shardings(jax.eval_shape(lambda: _boxed_state(config, model, tx)), mesh)


def abstract_params(config: Config, mesh: jax.sharding.Mesh | None = None, dtype=None):
    """The parameters' shapes, in `dtype` (default float32, as trained), placed on `mesh` by the
    logical rules (default: the default device): what an inference restore reads into."""
    model = build_model(config)
    if mesh is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        shardings = sharding.logical_shardings(jax.eval_shape(lambda: _boxed_params(config, model)), mesh)
    shapes = jax.eval_shape(lambda: init_params(config, model))
    if not isinstance(shardings, dict):
        shardings = jax.tree.map(lambda _: shardings, shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), shapes, shardings)


def abstract_state(config: Config, model: Decoder, tx: optax.GradientTransformation, shardings) -> TrainState:
    """The train state's shapes and dtypes with `shardings` (a tree, or one sharding for every
    leaf): what a restore reads a checkpoint into, and what compiling from shapes needs."""
    shapes = jax.eval_shape(lambda: init_state(config, model, tx))
    if not isinstance(shardings, TrainState):
        shardings = jax.tree.map(lambda _: shardings, shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def init_state(config: Config, model: Decoder, tx: optax.GradientTransformation,
               shardings: TrainState | None = None) -> TrainState:
    """The initial state, created directly with `shardings` (no full copy on one device)."""
    return jax.jit(lambda: nn.meta.unbox(_boxed_state(config, model, tx)), out_shardings=shardings)()


def psr_inputs(config: Config, step: jax.Array, micro_batch: jax.Array | int = 0) -> PSRInputs | None:
    """The PSR key for this step: fold (seed, step); each layer folds in its id."""
    if config.psr.schedule == "none":
        return None
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.train.seed), _PSR_STREAM), step)
    return PSRInputs(key=key, step=step, micro_batch=micro_batch)


def summary(config: Config) -> dict[str, int]:
    """Parameter counts and sizes of the run, from shapes alone (nothing is allocated)."""
    model = build_model(config)
    shapes = jax.eval_shape(lambda: init_params(config, model))
    counts = param_counts(shapes, config.model)
    return {**counts, "pool_size": config.model.pool_size, "num_groups": config.model.num_groups,
            "tokens_per_step": config.tokens_per_step}


def forward(config: Config, model: Decoder, params, tokens_BxS1: jax.Array, eod_id: int | None,
            psr: PSRInputs | None = None):
    """The model on the inputs of rows of S + 1 tokens: (logits, router stats). With
    data.document_masking, attention stays inside the documents that `eod_id` ends."""
    inputs_BxS = tokens_BxS1[:, :-1]
    if not config.data.document_masking:
        return model.apply({"params": params}, inputs_BxS, psr=psr)
    if eod_id is None:
        raise ValueError("data.document_masking needs the tokenizer's end-of-document id (eod_id)")
    segments, positions_BxS = documents(inputs_BxS, eod_id)
    return model.apply({"params": params}, inputs_BxS, positions_BxS, psr=psr, segments=segments)


def make_loss_fn(config: Config, model: Decoder, eod_id: int | None = None) -> Callable:
    """loss_fn(params, tokens (B, S+1), step, micro_batch) -> (total loss, metrics): cross-entropy
    plus the weighted router losses, with PSR masks for `step`."""

    def loss_fn(params, tokens_BxS1, step, micro_batch=0):
        logits, stats = forward(config, model, params, tokens_BxS1, eod_id,
                                psr_inputs(config, step, micro_batch))
        with jax.named_scope("cross_entropy"):  # Named scopes label the parts in a profile.
            ce = losses.cross_entropy(logits, tokens_BxS1[:, 1:])
        lb, z = jnp.mean(stats.load_balance), jnp.mean(stats.z_loss)
        total = ce + config.loss.load_balance * lb + config.loss.z_loss * z
        return total, {"loss": ce, "lb_loss": lb, "z_loss": z, "expert_load": stats.expert_load_P,
                       "layer_z_loss": stats.z_loss, "dropped": jnp.mean(stats.dropped),
                       "available": stats.available_P}

    return loss_fn


def make_train_step(config: Config, model: Decoder, tx: optax.GradientTransformation,
                    eod_id: int | None = None) -> Callable:
    """train_step(state, tokens (B, S+1)) -> (new state, metrics). `eod_id`: the tokenizer's
    end-of-document id, which data.document_masking needs."""
    schedule = learning_rate_schedule(config.optim, config.train.steps)
    pool_sizes = layer_pool_sizes(config.model)
    accum = config.optim.grad_accum
    grad_fn = jax.value_and_grad(make_loss_fn(config, model, eod_id), has_aux=True)

    def train_step(state: TrainState, tokens_BxS1: jax.Array):
        def micro_step(tokens, index=0):
            (_, aux), grads = grad_fn(state.params, tokens, state.step, index)
            return grads, aux

        if accum == 1:
            grads, aux = micro_step(tokens_BxS1)
        else:
            # Micro-batches share the step, hence the PSR schedule and masks, of the update.
            micro = tokens_BxS1.reshape(accum, -1, tokens_BxS1.shape[-1])
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(micro_step, micro[0]))
            (grads, aux), _ = jax.lax.scan(
                lambda carry, xs: (jax.tree.map(jnp.add, carry, micro_step(*xs)), None),
                zeros, (micro, jnp.arange(accum)))
            grads, aux = jax.tree.map(lambda x: x / accum, (grads, aux))
        with jax.named_scope("optimizer"):  # Named scopes label the parts in a profile.
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            bias_metrics = {}
            if config.model.router_bias:  # Moved here, outside the optimizer (and its weight decay).
                bias_LxP = balancing.router_bias(state.params, config.model) + balancing.bias_step(
                    aux["expert_load"], aux["available"], config.loss.router_bias_rate)
                params = balancing.with_router_bias(params, bias_LxP, config.model)
                bias_metrics = {"router_bias": bias_LxP, "router_bias_absmax": jnp.max(jnp.abs(bias_LxP)),
                                "layer_router_bias_absmax": jnp.max(jnp.abs(bias_LxP), axis=-1)}
            # A finite gradient can still overflow the weights: the new state must be finite too.
            param_norm = optax.tree.norm(params)
            finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
            if config.train.nonfinite == "skip":
                # Keep the old weights and moments; the step moves on, and with it optax's own
                # counts (its integer leaves), so that the learning rate it applies stays
                # schedule(state.step), the step PSR reads.
                def keep_old(new, old):
                    return jnp.where(finite, new, old) if jnp.issubdtype(new.dtype, jnp.inexact) else new

                params, opt_state = jax.tree.map(keep_old, (params, opt_state),
                                                 (state.params, state.opt_state))
            new_state = TrainState(state.step + 1, params, opt_state)
        with jax.named_scope("step_metrics"):
            layer_grad_norm, group_expert_grad_norm = per_layer_norms(grads, config.model)
            step_metrics = {
                "loss": aux["loss"], "lb_loss": aux["lb_loss"], "z_loss": aux["z_loss"],
                "grad_norm": grad_norm, "param_norm": param_norm, "lr": schedule(state.step),
                "finite": finite,
                "layer_grad_norm": layer_grad_norm, "group_expert_grad_norm": group_expert_grad_norm,
                # N_t as this update's masks left it (a full group's layers; see `available`).
                "psr_pool_size": jnp.round(jnp.max(jnp.sum(aux["available"], axis=-1))).astype(jnp.int32),
                "expert_load": aux["expert_load"], "layer_z_loss": aux["layer_z_loss"],
                "dropped_fraction": aux["dropped"],
                # During PSR, balance is measured over the experts each layer could choose.
                **metrics_lib.routing_metrics(aux["expert_load"], pool_sizes, aux["available"]),
                **bias_metrics,
            }
        return new_state, step_metrics

    return train_step


def make_eval_step(config: Config, model: Decoder, eod_id: int | None = None) -> Callable:
    """Held-out loss and routing on the full pool (PSR never applies at evaluation); `eod_id` as
    make_train_step's."""

    def eval_step(params, tokens_BxS1):
        logits, stats = forward(config, model, params, tokens_BxS1, eod_id)
        return {"loss": losses.cross_entropy(logits, tokens_BxS1[:, 1:]),
                "expert_load": stats.expert_load_P}

    return eval_step
