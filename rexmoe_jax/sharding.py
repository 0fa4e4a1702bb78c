"""The sharding story on one screen: the mesh, the one table of logical-axis rules, and the
shardings of the train state and the batch.

Mesh axes:
    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with parameters (and optimizer state) split along "embed"
    expert  expert parallelism: each group's pool split over devices; the batch is split too,
            and tokens travel to their experts' devices and back (model/expert_parallel.py)
    tensor  tensor parallelism: attention heads, FFN widths and the vocabulary split

Parameters carry logical axis names where they are created (model/decoder.py lists them); RULES maps
each to a mesh axis (or None: replicated). Activations are constrained with the same names.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils, topologies
from jax.sharding import NamedSharding, PartitionSpec

from rexmoe_jax.config import Config, ConfigError, MeshConfig, ModelConfig
from rexmoe_jax.targets import Target

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


def target_devices(target: Target) -> list:
    """The devices of a TPU slice (or slices) described to the TPU compiler, from any machine
    with libtpu installed: enough to lower and compile for them, never to run. Before libtpu
    first loads it is told not to ask a TPU VM's metadata server (there is none), and not to
    take its one-process-per-machine lock (/tmp/libtpu_lockfile), which guards chips that are
    not here and would fail every compile but the first of several processes (test workers).
    Told the accelerator type, it does not warn that it cannot find this host's bounds (the
    plan is the same either way; one process's first target names it)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.split("x", 1)[-1] if target.num_slices > 1
                          else target.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
            chips_per_host_bounds=target.chips_per_host, num_slices=target.num_slices)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--target {target.name}: the TPU compiler cannot describe {target.topology} "
                          f"({str(err).splitlines()[0]}); is libtpu installed (pip install -e '.[tpu]')?"
                          ) from None
    return list(topology.devices)


def _device_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """TPU devices in the physical order mesh_utils gives (neighbours on the torus next to each
    other along each mesh axis), a physical axis split where a mesh axis needs part of it; with
    several slices the data axis spans them (the data-centre network carries only its gradient
    all-reduce)."""
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    if shape[0] % slices:
        raise ConfigError(f"mesh.data={shape[0]} must be a multiple of the {slices} slices, which it spans")
    within = (shape[0] // slices, *shape[1:])
    return mesh_utils.create_hybrid_device_mesh(within, (slices,) + (1,) * (len(shape) - 1), devices,
                                                allow_split_physical_axes=True)


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if config.num_devices > len(devices):
        raise ConfigError(f"mesh.num_devices={config.num_devices} but only {len(devices)} devices exist")
    part = 0 < config.num_devices < len(devices)  # the first devices, in jax's order
    devices = devices[:config.num_devices] if part else devices
    shape = mesh_shape(config, len(devices))
    # Auto axes: the compiler places the work the rules table does not pin down.
    types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices[0].platform == "tpu" and not part:
        return jax.sharding.Mesh(_device_grid(shape, devices), MESH_AXES, axis_types=types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)


def batch_devices(mesh: jax.sharding.Mesh) -> int:
    """How many devices see their own rows of a batch: the product of the batch axes."""
    return math.prod(dict(mesh.shape)[a] for a in BATCH_AXES)


def tile_rows(rows: np.ndarray, mesh: jax.sharding.Mesh | None) -> np.ndarray:
    """`rows` repeated whole as often as it takes for their number to divide over the mesh's
    batch axes: a mean over the rows stays the same, and the first len(rows) are the originals."""
    devices = 1 if mesh is None else batch_devices(mesh)
    copies = devices // math.gcd(len(rows), devices)
    return np.concatenate([rows] * copies) if copies > 1 else rows


def pad_rows(rows: np.ndarray, mesh: jax.sharding.Mesh | None) -> np.ndarray:
    """`rows` followed by copies of its last row up to a multiple of the mesh's batch devices,
    for work whose rows are independent (generation): each device holds ceil(len(rows) /
    devices) rows, where tile_rows would give it len(rows) / gcd(len(rows), devices); the first
    len(rows) are the originals."""
    devices = 1 if mesh is None else batch_devices(mesh)
    extra = -len(rows) % devices
    return np.concatenate([rows, np.repeat(rows[-1:], extra, axis=0)]) if extra else rows


def validate(config: Config, mesh: jax.sharding.Mesh) -> None:
    """Divisibility the mesh needs from the model and the batch, with the field to change."""
    micro_batch = config.micro_batch_rows
    if micro_batch % batch_devices(mesh):
        raise ConfigError(f"data.batch_size / optim.grad_accum = {micro_batch} is not divisible by the "
                          f"{batch_devices(mesh)} devices of mesh.data x mesh.fsdp x mesh.expert")
    validate_model(config.model, mesh)


def validate_model(m: ModelConfig, mesh: jax.sharding.Mesh) -> None:
    """Divisibility the mesh needs from the model's shapes, with the field to change."""
    shape = dict(mesh.shape)
    pools = sorted({size * m.num_experts for size in m.group_sizes})
    if any(pool % shape["expert"] for pool in pools):
        raise ConfigError(f"every group's pool ({pools} experts) must divide over mesh.expert={shape['expert']}")
    if m.expert_ffn % shape["tensor"] or m.num_kv_heads % shape["tensor"] or m.vocab_size % shape["tensor"]:
        raise ConfigError(f"model.expert_ffn={m.expert_ffn}, model.num_kv_heads={m.num_kv_heads} and "
                          f"model.vocab_size={m.vocab_size} must divide over mesh.tensor={shape['tensor']}")
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


def put_rows(rows: np.ndarray, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Rows that every process holds whole, split over the mesh's batch axes (on the default
    device without a mesh): how inference places its inputs."""
    if mesh is None:
        return jnp.asarray(rows)
    placed = NamedSharding(mesh, PartitionSpec(BATCH_AXES, *(None,) * (rows.ndim - 1)))
    return jax.make_array_from_callback(rows.shape, placed, lambda index: rows[index])


def host_rows(array: jax.Array) -> np.ndarray:
    """A batch-split result whole on every process's host (the other processes' rows gathered)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def mesh_of(tree) -> jax.sharding.Mesh | None:
    """The mesh of more than one device that a tree's arrays are placed on, or None (one
    device, host arrays): where inference on restored parameters runs when not told."""
    leaves = jax.tree.leaves(tree)
    placed = getattr(leaves[0], "sharding", None) if leaves else None
    return placed.mesh if isinstance(placed, NamedSharding) and placed.mesh.size > 1 else None


def using(mesh: jax.sharding.Mesh | None):
    """`activate(mesh)`, or nothing without a mesh."""
    return contextlib.nullcontext() if mesh is None else activate(mesh)


def process_rows(mesh: jax.sharding.Mesh, global_rows: int) -> tuple[tuple[int, ...], int]:
    """(blocks, count): the batch sharding cuts a global batch of `global_rows` into `count`
    equal blocks of rows, one per distinct shard, and this process's devices hold the blocks
    numbered `blocks` (ascending). They need not be adjacent: on a TPU slice the mesh follows
    the torus, which interleaves the hosts along the data axis. The process reads those rows in
    that order, and put_batch places them (jax maps its shards onto its rows in order)."""
    index_map = batch_sharding(mesh).devices_indices_map((global_rows, 1))
    starts = {d: index_map[d][0].indices(global_rows)[0] for d in mesh.devices.flat}
    count = len(set(starts.values()))
    size, me = global_rows // count, jax.process_index()
    own = {start // size for d, start in starts.items() if d.process_index == me}
    return tuple(sorted(own)), count


_DEVICE = contextvars.ContextVar("device", default=None)


def activate(mesh: jax.sharding.Mesh):
    """A context that makes `mesh` and the rules current (for logical constraints and the MoE
    layer's shard_map), and its first device the one `device()` and `platform()` answer."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(RULES))
    device = mesh.devices.flat[0]
    token = _DEVICE.set(device)
    stack.callback(_DEVICE.reset, token)
    if device.platform != jax.default_backend():  # compiling for a target (a TPU slice from a CPU):
        stack.enter_context(jax.default_device(device))  # libraries that ask (tokamax) see its chip
    return stack


def device():
    """A device of the mesh `activate` made current (the first), or JAX's first device outside
    one: for the choices a chip's generation decides (kernels a TPU v4 or an A100 cannot run)."""
    return _DEVICE.get() or jax.devices()[0]


def platform() -> str:
    """The platform ("cpu", "gpu", "tpu") of the devices of the mesh `activate` made current, or
    JAX's default backend outside one. Every per-platform choice (kernels, exchange) reads this,
    so a step compiled for TPU devices from a CPU machine compiles what a TPU would run."""
    return device().platform


def current_mesh() -> jax.sharding.AbstractMesh | jax.sharding.Mesh:
    """The mesh set by `activate`, or a one-device mesh with the same axes when none is, so that
    a model applied outside a mesh runs the same sharded code as one on a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    return jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
