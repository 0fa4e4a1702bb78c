"""Restoring a training run for inference: its config, the parameters of its newest readable
checkpoint and its tokenizer. The one place that does this: the evaluate, generate and lm_eval
commands and the Python API (inference.load) all come here.

Only the parameters are read (the optimizer state, twice their size, never is), cast to the
dtype asked for while reading, and placed directly onto a device mesh with the training's
logical rules: each device reads its own shards, and no device holds the whole model unless the
mesh replicates it. The checkpoint may have been saved on any mesh.

The mesh (`inference_mesh`): the run's own `mesh` section when it fits the devices here (its -1
axis takes what there is), otherwise every device on the data axis; or one given with the same
`mesh.*=` overrides as train.py. The inference functions tile a batch whose rows do not divide
over the mesh's batch axes (sharding.tile_rows); generation pads it with its last prompt
(sharding.pad_rows).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp

from rexmoe_jax import sharding, trainer
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.config import Config, ConfigError, MeshConfig, apply_overrides, from_dict, read_json_config
from rexmoe_jax.data import resolve_tokenizer
from rexmoe_jax.runtime import distributed
from rexmoe_jax.runtime.workdir import CONFIG_FILE, checkpoint_steps
from rexmoe_jax.tokenizer import Tokenizer

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Run:
    config: Config
    params: object
    tokenizer: Tokenizer
    step: int
    mesh: jax.sharding.Mesh | None = None  # where `params` live; None: the default device


def read_config(workdir: pathlib.Path) -> Config:
    saved = read_json_config(workdir, "a training run's --workdir", CONFIG_FILE)
    try:
        return from_dict(saved)
    except ConfigError as err:  # a field of the wrong type, say: name the file it is in
        raise ConfigError(f"{str(workdir / CONFIG_FILE)!r}: {err}") from None


def check_run(workdir: pathlib.Path) -> Config:
    """The config of a run that has a checkpoint written by a compatible config (the same model),
    read cheaply, without any array: for a command that checks its inputs before a slow start."""
    config = read_config(workdir)
    if not checkpoint_steps(workdir):
        raise ConfigError(f"{str(workdir)!r} has no checkpoint yet; train first")
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
    try:
        checkpointer.check_config(config)
    finally:
        checkpointer.close()
    return config


def inference_mesh(config: Config, overrides: list[str] | tuple[str, ...] = ()) -> jax.sharding.Mesh:
    """The mesh to serve a run on (module doc): `overrides` are `mesh.*=` settings, as train.py
    takes them; without them the run's own mesh section, or all devices on the data axis when
    that does not fit the devices here."""
    if any(not o.startswith("mesh.") for o in overrides):
        bad = next(o for o in overrides if not o.startswith("mesh."))
        raise ConfigError(f"{bad!r}: only mesh.*= settings choose where a trained model runs")
    if overrides:
        mesh_config = apply_overrides(dataclasses.replace(config, mesh=MeshConfig()), list(overrides)).mesh
    else:
        mesh_config = config.mesh
        try:
            sharding.mesh_shape(dataclasses.replace(mesh_config, num_devices=0), jax.device_count())
            mesh_config = dataclasses.replace(mesh_config, num_devices=0)
        except ConfigError:
            mesh_config = MeshConfig()
    mesh = sharding.make_mesh(mesh_config)
    sharding.validate_model(config.model, mesh)
    return mesh


def restore(workdir: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
            dtype: str | None = None) -> Run:
    """The parameters of the newest readable checkpoint of a --workdir, in `dtype` (default:
    as trained, float32), on `mesh` (default: the default device alone)."""
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tokenizer = resolve_tokenizer(config.data)
    if tokenizer.vocab_size > config.model.vocab_size:  # Checked before the slow part.
        which = f"data.tokenizer={config.data.tokenizer!r}" if config.data.tokenizer else "the run's tokenizer"
        raise ConfigError(f"{which} has {tokenizer.vocab_size} tokens but {str(workdir)!r} has "
                          f"model.vocab_size={config.model.vocab_size}: its ids would fall outside the model; "
                          "it is not the tokenizer the run was trained with")
    abstract = trainer.abstract_params(config, mesh, None if dtype is None else jnp.dtype(dtype))
    # Read-only: loading a model never creates, renames or deletes anything in the run.
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
    try:
        restored = checkpointer.restore(abstract, config, part="params")
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(f"{str(workdir)!r} has no checkpoint yet; train first")
    params, meta = restored
    return Run(config, params, tokenizer, int(meta["step"]), mesh)


def add_placement_arguments(parser) -> None:
    """--dtype, --distributed, --simulate-devices and the mesh.*= settings of the inference
    commands (evaluate, generate)."""
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run first, as train.py --distributed (JAX_COORDINATOR_ADDRESS, "
                             "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or what JAX detects): the mesh spans the devices of "
                             "every process; process 0 prints and writes")
    parser.add_argument("--simulate-devices", type=int, default=0, metavar="N",
                        help="run on N simulated CPU devices, as train.py (to try a mesh without the "
                             "hardware)")
    parser.add_argument("--dtype", choices=DTYPES, help="the parameters' dtype on the devices (default: as trained, "
                        "float32); computation runs in the run's compute.dtype either way")
    parser.add_argument("mesh", nargs="*", metavar="mesh.AXIS=SIZE",
                        help="the device mesh, as train.py's mesh.*= settings (default: the run's own when it fits "
                             "the devices here, else every device on the data axis)")


def join_if_asked(distributed_run: bool) -> None:
    """With --distributed, joins the other processes; before anything asks JAX for its devices
    (the caller ends with distributed.finish)."""
    if distributed_run:
        distributed.initialize(init_timeout=300, heartbeat_timeout=100)
