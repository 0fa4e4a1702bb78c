"""Checkpoints with orbax: asynchronous, atomic saves of the train state and a JSON record (the
config, the data position), the last `keep` kept, and resume from the newest readable one.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a crash
during a save never leaves a half-written checkpoint as the latest. A checkpoint that cannot be
read is moved aside (to <step>.corrupt, never deleted) and the previous one is used. A
checkpoint written by an incompatible config stops the run with the differing fields named,
and nothing is touched.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import sys

import jax
import orbax.checkpoint as ocp

from rexmoe_jax import sharding
from rexmoe_jax.config import Config, ConfigError, from_dict


def config_changes(saved: dict, config: Config) -> tuple[list[str], list[str]]:
    """(incompatible, other) differences between a saved config dict and `config`: a change is
    incompatible when its section's `state_layout()` (what the train state depends on) differs."""
    if not saved:  # Nothing recorded: nothing to compare.
        return [], []
    saved_config = from_dict(saved)
    incompatible, other = [], []
    for section in dataclasses.fields(Config):
        old, new = getattr(saved_config, section.name), getattr(config, section.name)
        changes = [f"{section.name}.{field.name}: {getattr(old, field.name)!r} -> {getattr(new, field.name)!r}"
                   for field in dataclasses.fields(new) if getattr(old, field.name) != getattr(new, field.name)]
        (incompatible if old.state_layout() != new.state_layout() else other).extend(changes)
    return incompatible, other


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


class Checkpointer:
    def __init__(self, workdir: pathlib.Path, keep: int):
        self.directory = (workdir / "checkpoints").resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        # Handlers named up front, so metadata and single items can be read before any save.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an asynchronous save; the write completes in the background."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _set_aside(self, step: int, err: Exception) -> None:
        target = self.directory / f"{step}.corrupt"
        if jax.process_index() == 0:  # One host renames; the others wait for it.
            (self.directory / str(step)).rename(target)
        sharding.sync_hosts(f"set aside checkpoint {step}")
        print(f"warning: checkpoint {step} is unreadable ({_short(err)}); moved it to {target} and "
              "fell back to the previous checkpoint", file=sys.stderr, flush=True)
        self._manager.reload()

    def restore(self, abstract_state, config: Config) -> tuple[object, dict] | None:
        """The newest readable checkpoint as (state, meta), or None when there is none.

        Raises ConfigError, touching nothing, when the newest readable checkpoint was written by
        an incompatible config.
        """
        for step in reversed(self.steps()):
            try:
                meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                shapes = self._manager.item_metadata(step)["state"]
            except Exception as err:  # noqa: BLE001 - any failure to read means unusable.
                self._set_aside(step, err)
                continue
            incompatible, other = config_changes(meta.get("config", {}), config)
            if incompatible or _leaf_shapes(shapes) != _leaf_shapes(abstract_state):
                raise ConfigError(
                    f"checkpoint {self.directory / str(step)} was written by an incompatible config "
                    f"({'; '.join(incompatible) or 'array shapes differ'}); resume with its settings "
                    "or use a new --workdir")
            if other:
                print(f"note: resuming step {step} with changed settings: {'; '.join(other)}", flush=True)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except Exception as err:  # noqa: BLE001 - truncated or corrupted arrays.
                self._set_aside(step, err)
                continue
            return restored["state"], meta
        return None


def _leaf_shapes(tree) -> collections.Counter:
    """The multiset of (shape, dtype) of a state's arrays, from arrays or orbax metadata."""
    if hasattr(tree, "tree"):
        tree = tree.tree
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return collections.Counter((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)
