"""Widen: a trained r = 1 run into a ReXMoE run at r > 1 that continues with PSR.

The experts are the source's, unchanged (a ReXMoE checkpoint differs from its baseline only in
router shapes). Each router grows from N to r*N columns: its own N columns (the slice j*N ...
j*N + N - 1 of its group's pool, j its place in the group) are the source router's, the others
are drawn as a fresh router's are (normal, model.init_std), from the run's seed.

What the widened model computes. Under PSR with psr.order=local_first at N_t = N a layer can
choose only its own experts, and it ranks them by the same logits, so it picks the source's
experts. Its gates are the softmax over the whole pool: renormalised over the K
(model.renormalize_gates=true) they are the source's gates up to float rounding, because the
pool's softmax denominator cancels; with the paper's gating (no renormalisation) every gate
shrinks by the factor (own experts' softmax mass in the pool), so the function changes until
training adapts. The router bias (model.router_bias) is copied into the own columns, zero in
the new ones. The widened run starts at step 0 with a fresh optimizer state (warm-up again).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from rexmoe_jax import reuse as reuse_lib
from rexmoe_jax.config import Config, ConfigError, apply_overrides
from rexmoe_jax.data import tokenizer_path
from rexmoe_jax.hf.regroup import Layers, group, ungroup
from rexmoe_jax.hf.run_io import Leaves, check_new_folder, write_run


def widened_config(config: Config, reuse: int) -> Config:
    """The source config at r = `reuse`, with PSR on (local_first). A source without PSR gets
    the paper's linear schedule at its proportions: t_s at 21% and t_e at 63% of train.steps."""
    if config.model.ffn != "moe":
        raise ConfigError("model.ffn=dense has no experts to reuse")
    if config.model.reuse != 1:
        raise ConfigError(f"the run is already at model.reuse={config.model.reuse}; widen starts from r = 1")
    if reuse < 2:
        raise ConfigError(f"--reuse {reuse}: widening needs r >= 2")
    psr = dataclasses.replace(config.psr, order="local_first")
    if psr.schedule == "none":
        steps = config.train.steps
        psr = dataclasses.replace(
            psr,
            schedule="linear",
            start_step=steps * 21 // 100,
            end_step=max(steps * 63 // 100, steps * 21 // 100 + 1),
        )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, reuse=reuse), psr=psr)


def widened_layers(layers: Layers, config: Config) -> Layers:
    """The source's per-layer parameters with every router grown to its layer's pool."""
    model = config.model
    n, pools = model.num_experts, reuse_lib.layer_pool_sizes(model)
    rng = np.random.default_rng(config.train.seed)
    routers, biases = [], None if layers.router_biases is None else []
    for layer, (router, pool) in enumerate(zip(layers.routers, pools)):
        own = slice(layer % model.reuse * n, (layer % model.reuse + 1) * n)
        wide = rng.normal(0.0, model.init_std, (model.d_model, pool)).astype(np.float32)
        wide[:, own] = router
        routers.append(wide)
        if biases is not None:
            bias = np.zeros((pool,), np.float32)
            bias[own] = layers.router_biases[layer]
            biases.append(bias)
    return dataclasses.replace(layers, routers=routers, router_biases=biases)


def widen(
    config: Config, leaves: Leaves, reuse: int, output: pathlib.Path, overrides: list[str] = ()
) -> Config:
    """Writes the widened run into `output`; returns its config."""
    check_new_folder(output, "--output")
    wide = apply_overrides(widened_config(config, reuse), overrides)
    if wide.model.reuse != reuse:
        raise ConfigError("model.reuse comes from --reuse")
    layers = widened_layers(ungroup(leaves.tree(), config.model), wide)
    return write_run(output, wide, group(layers, wide.model), tokenizer_path(config.data))
