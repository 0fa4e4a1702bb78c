"""The sharding story on one screen: the mesh, the one table of logical-axis rules, and the
shardings of the train state and the batch.

Mesh axes:
    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with parameters (and optimizer state) split along "embed"
    expert  expert parallelism: each group's pool split over devices; the batch is split too,
            and tokens travel to their experts' devices and back (expert_parallel.py)
    tensor  tensor parallelism: attention heads, FFN widths and the vocabulary split

Parameters carry logical axis names where they are created (model.py lists them); RULES maps
each to a mesh axis (or None: replicated). Activations are constrained with the same names.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rexmoe_jax.config import Config, ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # every device but the tensor axis sees its own tokens

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("pool", None),
    ("norm", None),
    ("groups", None),
    ("layers", None),
    # activations
    ("batch", BATCH_AXES),
    ("seq", None),
    ("act_embed", None),
)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes with -1 resolved to the devices left over; they must multiply to the count."""
    sizes = config.axis_sizes
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices")
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh axis sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
                          f"but there are {num_devices} devices; set one axis to -1 to take the rest")
    return sizes


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if config.num_devices:
        if config.num_devices > len(devices):
            raise ConfigError(f"mesh.num_devices={config.num_devices} but only {len(devices)} devices exist")
        devices = devices[:config.num_devices]
    shape = mesh_shape(config, len(devices))
    # Auto axes: the compiler places the work the rules table does not pin down.
    types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)


def validate(config: Config, mesh: jax.sharding.Mesh) -> None:
    """Divisibility the mesh needs from the model and the batch, with the field to change."""
    shape = dict(mesh.shape)
    batch_devices = math.prod(shape[a] for a in BATCH_AXES)
    m = config.model
    micro_batch = config.data.batch_size // config.optim.grad_accum
    if micro_batch % batch_devices:
        raise ConfigError(f"data.batch_size / optim.grad_accum = {micro_batch} is not divisible by the "
                          f"{batch_devices} devices of mesh.data x mesh.fsdp x mesh.expert")
    pools = sorted({size * m.num_experts for size in m.group_sizes})
    if any(pool % shape["expert"] for pool in pools):
        raise ConfigError(f"every group's pool ({pools} experts) must divide over mesh.expert={shape['expert']}")
    if m.expert_ffn % shape["tensor"] or m.num_kv_heads % shape["tensor"]:
        raise ConfigError(f"model.expert_ffn={m.expert_ffn} and model.num_kv_heads={m.num_kv_heads} must "
                          f"divide over mesh.tensor={shape['tensor']}")
    if m.d_model % shape["fsdp"]:
        raise ConfigError(f"model.d_model={m.d_model} must divide over mesh.fsdp={shape['fsdp']}")


def logical_shardings(boxed_tree, mesh: jax.sharding.Mesh):
    """NamedShardings for a tree whose leaves carry logical names (nn.Partitioned), unboxed."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(host_rows: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """A global batch from this process's rows (each host holds only its own shard)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), host_rows)


def process_rows(mesh: jax.sharding.Mesh, global_rows: int) -> tuple[int, int]:
    """(block, blocks): under the batch sharding, this process's devices hold rows block * n to
    (block + 1) * n - 1 of a global batch, n = global_rows / blocks. The data pipeline reads
    exactly those rows; a layout that gives a process scattered rows is an error."""
    index_map = batch_sharding(mesh).devices_indices_map((global_rows, 1))
    spans = {index_map[d][0].indices(global_rows)[:2] for d in mesh.devices.flat
             if d.process_index == jax.process_index()}
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    size = stop - start
    if sum(e - s for s, e in spans) != size or global_rows % size or start % size:
        raise ConfigError(f"the devices of process {jax.process_index()} hold rows {sorted(spans)} of each "
                          "batch, not one block; put the mesh's data axes first over the processes")
    return start // size, global_rows // size


def sync_hosts(name: str) -> None:
    """Waits until every process reaches this point (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def activate(mesh: jax.sharding.Mesh):
    """A context that makes `mesh` and the rules current (for logical constraints and the MoE
    layer's shard_map)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(RULES))
    return stack


def current_mesh() -> jax.sharding.AbstractMesh | jax.sharding.Mesh:
    """The mesh set by `activate`, or a one-device mesh with the same axes when none is, so that
    a model applied outside a mesh runs the same sharded code as one on a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    return jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
