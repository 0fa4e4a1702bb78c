"""A model's parameters between model/decoder.py's grouped layout and one entry per layer.

In the grouped layout a block (`groups`, or the smaller `last_group`) stacks its layers'
weights as (groups, layers of a group, ...), its pools of experts as (groups, r*N, ...), and
each router as (groups, layers, D, r*N). Per layer (`Layers`), every layer's own weights are
one (L, ...) array, its own N experts one (L, N, ...) array (pool index j*N + e of a group is
expert e of the group's j-th layer, reuse.py), and its router a (D, P) array of its own pool's
width. Import, widen and their tests convert through this form.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rexmoe_jax import reuse
from rexmoe_jax.config import ModelConfig

BLOCKS = ("groups", "last_group")
EXPERTS = ("experts_gate", "experts_up", "experts_down")
ROUTER, ROUTER_BIAS = ("moe", "router"), ("moe", "router_bias")


@dataclasses.dataclass
class Layers:
    top: dict[tuple[str, ...], np.ndarray]  # token_embed, final_norm, lm_head
    layers: dict[tuple[str, ...], np.ndarray]  # path under groups/layers -> (L, ...)
    experts: dict[str, np.ndarray]  # experts_gate|up|down -> (L, N, ...): each layer's own
    routers: list[np.ndarray]  # per layer, (D, P)
    router_biases: list[np.ndarray] | None = None  # per layer, (P,), with model.router_bias


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """{path tuple: leaf} of a nested dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def ungroup(params: dict, config: ModelConfig) -> Layers:
    """The grouped parameters of `config` per layer."""
    n = config.num_experts
    top = {path: np.asarray(leaf) for path, leaf in flatten(params).items() if path[0] not in BLOCKS}
    layers: dict[tuple[str, ...], list] = {}
    experts: dict[str, list] = {}
    routers, biases = [], []
    for block in (b for b in BLOCKS if b in params):
        for path, leaf in flatten(params[block]["layers"]).items():
            leaf = np.asarray(leaf)
            per_layer = leaf.reshape(-1, *leaf.shape[2:])
            if path == ROUTER:
                routers.extend(per_layer)
            elif path == ROUTER_BIAS:
                biases.extend(per_layer)
            else:
                layers.setdefault(path, []).append(per_layer)
        for name in (e for e in EXPERTS if e in params[block]):
            pools = np.asarray(params[block][name])
            experts.setdefault(name, []).append(pools.reshape(-1, n, *pools.shape[2:]))
    return Layers(
        top,
        {p: np.concatenate(a) for p, a in layers.items()},
        {name: np.concatenate(a) for name, a in experts.items()},
        routers,
        biases or None,
    )


def group(layers: Layers, config: ModelConfig) -> dict:
    """The per-layer parameters in `config`'s grouped layout (its r, its smaller last group)."""
    flat = dict(layers.top)
    first = 0
    for block, ids_GxR in zip(BLOCKS, reuse.group_layer_ids(config)):
        g, r = ids_GxR.shape
        span = slice(first, first + g * r)
        for path, per_layer in layers.layers.items():
            flat[(block, "layers") + path] = per_layer[span].reshape(g, r, *per_layer.shape[1:])
        flat[(block, "layers") + ROUTER] = np.stack(layers.routers[span]).reshape(g, r, config.d_model, -1)
        if layers.router_biases is not None:
            flat[(block, "layers") + ROUTER_BIAS] = np.stack(layers.router_biases[span]).reshape(g, r, -1)
        for name, own in layers.experts.items():
            flat[(block, name)] = own[span].reshape(g, r * config.num_experts, *own.shape[2:])
        first += g * r
    return unflatten(flat)
