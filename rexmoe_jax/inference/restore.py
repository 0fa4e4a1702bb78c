"""Restoring a training run for inference: its config, the weights of its newest readable
checkpoint and its tokenizer. The one place that does this: the evaluate, generate and lm_eval
commands and the Python API (inference.load) all come here.

The checkpoint may have been saved on any mesh: orbax reshards it onto the default device.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from rexmoe_jax import trainer
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.config import Config, ConfigError, from_dict
from rexmoe_jax.data import resolve_tokenizer
from rexmoe_jax.optimizer import make_optimizer
from rexmoe_jax.runtime.workdir import CHECKPOINTS, CONFIG_FILE
from rexmoe_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Run:
    config: Config
    params: object
    tokenizer: Tokenizer
    step: int


def read_config(workdir: pathlib.Path) -> Config:
    config_file = workdir / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{str(workdir)!r} has no config.json; is it a training run's --workdir?")
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(config_file)!r} is not readable JSON ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{str(config_file)!r} holds no config")
    return from_dict(saved)


def check_run(workdir: pathlib.Path) -> Config:
    """The config of a run that has a checkpoint, read cheaply: for a command that checks its
    inputs before a slow start."""
    config = read_config(workdir)
    folder = workdir / CHECKPOINTS
    if not folder.is_dir() or not any(p.name.isdigit() for p in folder.iterdir()):
        raise ConfigError(f"{str(workdir)!r} has no checkpoint yet; train first")
    return config


def restore(workdir: str | pathlib.Path) -> Run:
    """The newest readable checkpoint of a --workdir, on the default device."""
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    tokenizer = resolve_tokenizer(config.data)
    if tokenizer.vocab_size > config.model.vocab_size:  # Checked before the slow part.
        which = f"data.tokenizer={config.data.tokenizer!r}" if config.data.tokenizer else "the run's tokenizer"
        raise ConfigError(f"{which} has {tokenizer.vocab_size} tokens but {str(workdir)!r} has "
                          f"model.vocab_size={config.model.vocab_size}: its ids would fall outside the model; "
                          "it is not the tokenizer the run was trained with")
    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, config.train.steps)  # the optimizer state is in the checkpoint
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Read-only: loading a model never creates, renames or deletes anything in the run.
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
    try:
        restored = checkpointer.restore(trainer.abstract_state(config, model, tx, device), config)
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(f"{str(workdir)!r} has no checkpoint yet; train first")
    state, _ = restored
    return Run(config, state.params, tokenizer, int(state.step))
