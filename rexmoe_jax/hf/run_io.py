"""A run folder's parameters read one leaf at a time, and a new run folder written from
parameters (import, widen): config.json, the tokenizer, and a step-0 checkpoint with a fresh
optimizer state that train.py resumes and evaluate, generate and lm_eval restore."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from rexmoe_jax import trainer
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.data import BatchIterator
from rexmoe_jax.hf.regroup import flatten, unflatten
from rexmoe_jax.inference import restore
from rexmoe_jax.optimizer import make_optimizer
from rexmoe_jax.tokenizer import load_tokenizer


def param_shapes(config: Config) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The run's parameter leaves by path, from shapes alone."""
    shapes = jax.eval_shape(lambda: trainer.init_params(config, trainer.build_model(config)))
    return flatten(shapes)


class UnreadableLeaf(Exception):
    """A checkpoint's leaf that opened but cannot be read (a damaged array file)."""


@dataclasses.dataclass
class Leaves:
    """Parameter leaves by path; `read` returns one as a NumPy array."""

    shapes: dict[tuple[str, ...], tuple[int, ...]]
    read: Callable[[tuple[str, ...]], np.ndarray]
    step: int

    def tree(self) -> dict:
        return unflatten({path: self.read(path) for path in self.shapes})


def in_memory(params: dict, step: int = 0) -> Leaves:
    flat = {path: np.asarray(leaf) for path, leaf in flatten(params).items()}
    return Leaves({path: leaf.shape for path, leaf in flat.items()}, flat.__getitem__, step)


def checkpoint_leaves(workdir: pathlib.Path, config: Config) -> Leaves:
    """The parameters of the newest checkpoint, each leaf read only when asked for (the optimizer
    state is never read): orbax stores each leaf as a zarr array in an OCDBT database. When they
    cannot be opened so (another layout, a damaged checkpoint), restore.restore reads the newest
    readable checkpoint whole instead."""
    expected = {path: tuple(s.shape) for path, s in param_shapes(config).items()}
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
    try:
        steps = checkpointer.steps()
    finally:
        checkpointer.close()
    if not steps:
        raise ConfigError(f"{str(workdir)!r} has no checkpoint yet; train first")
    step = steps[-1]
    state = (workdir / "checkpoints" / str(step) / "state").resolve()
    try:
        stores = {path: _open_leaf(state, path) for path in expected}
    except Exception as err:  # noqa: BLE001 - TensorStore reports a missing or other layout in several types
        print(
            f"note: checkpoint {step}'s leaves cannot be read one by one ({str(err).splitlines()[0][:120]}); "
            "restoring the newest readable checkpoint whole",
            file=sys.stderr,
        )
        return newest_readable(workdir)
    for path, store in stores.items():
        if tuple(store.shape) != expected[path]:
            raise ConfigError(
                f"checkpoint {step} holds params/{'/'.join(path)} of shape {list(store.shape)}, "
                f"but config.json implies {list(expected[path])}"
            )

    def read(path):
        try:
            return np.asarray(stores[path].read().result())
        except Exception as err:  # noqa: BLE001 - TensorStore reports a damaged file in several types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            leaf = "/".join(path)
            raise UnreadableLeaf(f"checkpoint {step}'s params/{leaf} cannot be read ({reason})") from None

    return Leaves(expected, read, step)


def newest_readable(workdir: pathlib.Path) -> Leaves:
    """The parameters of the newest checkpoint that restores whole (restore.restore skips a
    damaged one with a warning), in memory."""
    run = restore.restore(workdir)
    return dataclasses.replace(in_memory(jax.device_get(run.params)), step=run.step)


def _open_leaf(state: pathlib.Path, path: tuple[str, ...]):
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{state}/", "path": "params." + ".".join(path)},
    }
    return ts.open(spec, open=True, read=True).result()


PRESET = "preset.py"
_PRESET_TEMPLATE = '''"""The config this run was written with (python -m rexmoe_jax.hf), as a preset:

    python train.py --config <this file> --workdir <its folder> [section.field=value ...]
"""

import json

from rexmoe_jax.config import from_dict

CONFIG = json.loads(r"""
{config}
""")


def get_config():
    return from_dict(CONFIG)
'''


def check_new_folder(folder: pathlib.Path, flag: str) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{flag} {str(folder)!r} exists and is not empty; choose a new folder")


def write_run(workdir: pathlib.Path, config: Config, params: dict, tokenizer: pathlib.Path) -> Config:
    """Writes a new run: a copy of `tokenizer` (data.tokenizer names it), config.json, the same
    config as preset.py (train.py --config), and the parameters as a step-0 checkpoint with a
    fresh optimizer state. Returns the config written.
    On any failure nothing is left behind."""
    check_new_folder(workdir, "--workdir")
    expected = param_shapes(config)
    flat = flatten(params)
    for path, shape in expected.items():
        if path not in flat or tuple(np.shape(flat[path])) != tuple(shape.shape):
            got = list(np.shape(flat[path])) if path in flat else "nothing"
            raise ConfigError(f"params/{'/'.join(path)}: {got} where the config implies {list(shape.shape)}")
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        copy = workdir / ("tokenizer" + tokenizer.suffix)
        shutil.copyfile(tokenizer, copy)
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, tokenizer=str(copy.resolve()))
        )
        vocab = load_tokenizer(copy).vocab_size
        if vocab > config.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {vocab} tokens but the model's vocabulary only {config.model.vocab_size}"
            )
        (workdir / "config.json").write_text(config.to_json() + "\n")
        (workdir / PRESET).write_text(_PRESET_TEMPLATE.format(config=config.to_json()))
        state_params = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float32), unflatten({path: flat[path] for path in expected})
        )
        tx = make_optimizer(config.optim, config.train.steps)
        state = trainer.TrainState(
            step=jnp.zeros((), jnp.int32), params=state_params, opt_state=tx.init(state_params)
        )
        checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
        try:
            checkpointer.save(
                0, state, {"step": 0, "config": config.to_dict(), "data": BatchIterator.state_at(0)}
            )
        finally:
            checkpointer.close()
    except BaseException:
        for path in [workdir] if created else list(workdir.iterdir()):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        raise
    return config
