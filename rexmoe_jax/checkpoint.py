"""Checkpoints with orbax: asynchronous, atomic saves of the train state and a JSON record (the
config, the data position), the last `keep` kept, and resume from the newest readable one.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a crash
during a save never leaves a half-written checkpoint as the latest. A checkpoint that cannot be
restored, whatever is missing or garbled in it, is moved aside (to <step>.corrupt, never
deleted) and the previous one is used; a read-only user (evaluate, generate) skips it instead
and changes nothing. When none can be read, that is one error naming them: training starts over
from step 0 only when asked to (train.py --start-over). Only a saved config that really differs in a section's state layout stops
the run, with the differing fields named, and nothing is touched.

A save that fails (a full disk, no permission) raises `WriteError` with one line, at the next
step when it failed in the background, and leaves no temporary folder behind; the checkpoints
written before it stay.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import time
import typing

import jax
import orbax.checkpoint as ocp

from rexmoe_jax.config import Config, ConfigError, from_dict
from rexmoe_jax.runtime import distributed
from rexmoe_jax.runtime.workdir import WriteError, failure_reason

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Where orbax writes a checkpoint before renaming it.
_SET_ASIDE = re.compile(r"\d+\.corrupt(\.\d+)?")  # An unreadable checkpoint, moved aside.


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
    return f"{type(err).__name__}: {text[0][:100]}" if text else type(err).__name__


def _names(items: list[str]) -> str:
    return f"{', '.join(items[:-1])} and {items[-1]}" if len(items) > 1 else items[0]


class _Unreadable(typing.NamedTuple):
    step: int
    reason: str
    moved_to: str | None  # its new name, None when a read-only user left it


_ORBAX = f"{os.sep}orbax{os.sep}"


def _is_orbax_coroutine(obj) -> bool:
    code = getattr(obj, "cr_code", None)
    return code is not None and _ORBAX in code.co_filename


def _through_orbax(tb) -> bool:
    """Whether a traceback passes through orbax's code."""
    while tb is not None:
        if _ORBAX in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _OrbaxTaskNoise(logging.Filter):
    """asyncio's "Task exception was never retrieved" for one of orbax's reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _through_orbax(record.exc_info[2]))


def _drop_closed_loop_reports() -> None:
    """A failed restore or save closes orbax's event loop while TensorStore still completes the
    other reads or writes; each completion then reports "RuntimeError: Event loop is closed" as
    an unraisable exception, and each of orbax's other reads that failed too is reported when it
    is collected ("Exception ignored in: <coroutine object ...>", asyncio's "Task exception was
    never retrieved", or from one of its threads): dozens to thousands of tracebacks for one
    unreadable checkpoint, more on a busy machine. Those, and only those, are dropped; the
    failure itself is reported in one line."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(args):
        closed = isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed"
        if not (closed or _is_orbax_coroutine(args.object) or _through_orbax(args.exc_traceback)):
            previous(args)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook
    previous_thread_hook = threading.excepthook

    def thread_hook(args):
        if not _through_orbax(args.exc_traceback):
            previous_thread_hook(args)

    threading.excepthook = thread_hook
    logging.getLogger("asyncio").addFilter(_OrbaxTaskNoise())


class _OrbaxNoise(logging.Filter):
    """Orbax logs the traceback of every failed save or restore from its threads (hundreds of
    lines for one full disk) and then raises the same error to the caller, which reports it in
    one line; and it warns about what this module does on purpose (reading the meta item
    alone, opening a run read-only). Those records are dropped; orbax's others pass."""

    _ON_PURPOSE = ("was found in the checkpoint, but could not be restored", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        return not (record.exc_info or any(text in str(record.msg) for text in self._ON_PURPOSE))


def _quiet_orbax() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxNoise())


class Checkpointer:
    """Keeps the newest `keep` checkpoints, and those at multiples of `keep_every` (when > 0).
    `read_only` opens the checkpoints of a run without creating, renaming or deleting anything;
    `fix` is what its errors about an incompatible config tell a reader to do."""

    def __init__(self, workdir: pathlib.Path, keep: int, *, keep_every: int = 0, read_only: bool = False,
                 fix: str | None = None):
        _quiet_orbax()
        _drop_closed_loop_reports()
        self.directory = (workdir / "checkpoints").resolve()
        self.read_only = read_only
        self._fix = fix or ("the run's config.json has been changed: put back the one it was trained with"
                            if read_only else "resume with its settings or use a new --workdir")
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:  # Temporary folders left by a killed save are removed first: a save would trip on them.
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                                   enable_async_checkpointing=True, create=True,
                                                   cleanup_tmp_directories=True)
        # Handlers named up front, so metadata and single items can be read before any save. A
        # reader opens the state with the general PyTree handler, which can read one part alone.
        state_handler = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
        handlers = {"state": state_handler, "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._saving: int | None = None  # The step whose save may still run in the background.
        self._failed: int | None = None  # The step whose save failed.
        self._closed = False

    def steps(self) -> list[int]:
        """The steps with a checkpoint on disk (not one still being written)."""
        return sorted(s for s in self._manager.all_steps() if (self.directory / str(s)).is_dir())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an asynchronous save; the write completes in the background."""
        self._finish()  # Orbax would wait for the previous save too, and blame its failure on this one.
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as err:  # noqa: BLE001 - orbax and TensorStore raise many types.
            self._fail(step, err)
        self._saving = step

    def check(self) -> None:
        """Raises WriteError if the background save has failed; returns at once while it runs."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self._finish()

    def settle(self) -> list[int]:
        """Waits for a save in progress, whatever its outcome, and returns the steps on disk."""
        with contextlib.suppress(WriteError):
            self._finish()
        return self.steps()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._finish()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001
                if self._failed is None:  # Orbax raises a reported failure again: once is enough.
                    raise
            if self._failed is not None:  # The save's last writers have stopped now.
                self._remove_partial(self._failed)

    def _finish(self) -> None:
        step, self._saving = self._saving, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            self._fail(step, err)

    def _fail(self, step: int, err: Exception) -> None:
        self._failed = step
        self._remove_partial(step)
        # Orbax dropped the steps this save would push past `keep` from its list when the save
        # began; they are still on disk and intact, so steps() must list them again.
        with contextlib.suppress(Exception):
            self._manager.reload()
        raise WriteError(f"{failure_reason(err)} while saving step {step} in {self.directory}") from None

    def _remove_partial(self, step: int) -> None:
        """Removes a failed save's temporary folder. When one write of a save fails, orbax reports
        it while the save's other writes may still be running, and those create the folder again:
        so it is removed until it has stayed gone for a moment (at most a few seconds), and again
        when the checkpointer closes."""
        path, deadline = self.directory / f"{step}{_TMP_SUFFIX}", time.monotonic() + 5
        while time.monotonic() < deadline:
            shutil.rmtree(path, ignore_errors=True)
            time.sleep(0.25)
            if not path.exists():
                return

    def _unusable(self, step: int, err: Exception) -> _Unreadable:
        """Sets an unreadable checkpoint aside (a read-only user leaves it where it is)."""
        if self.read_only:
            return _Unreadable(step, _short(err), None)
        target = self.directory / f"{step}.corrupt"
        for copy in itertools.count(2):  # Never overwrite an earlier set-aside checkpoint.
            if not target.exists():
                break
            target = self.directory / f"{step}.corrupt.{copy}"
        if jax.process_index() == 0:  # One host renames; the others wait for it.
            (self.directory / str(step)).rename(target)
        distributed.barrier(f"set aside checkpoint {step}")
        self._manager.reload()
        return _Unreadable(step, _short(err), target.name)

    def set_aside(self) -> list[str]:
        """The checkpoints moved aside as unreadable, by this run or an earlier one."""
        if not self.directory.is_dir():
            return []
        return sorted((p.name for p in self.directory.iterdir() if _SET_ASIDE.fullmatch(p.name)),
                      key=lambda name: [int(part) for part in name.split(".") if part.isdigit()])

    def _none_readable(self, failures: list[_Unreadable], start_over: bool) -> None:
        """No checkpoint could be restored although some exist or were set aside: one line that
        names them. A writer trains from step 0 only when asked to (`start_over`)."""
        set_aside = self.set_aside()
        if not failures and not set_aside:
            return  # a new run
        if failures:
            found = (f"checkpoint{'s' * (len(failures) > 1)} {_names([str(f.step) for f in failures])} "
                     f"{'are' if len(failures) > 1 else 'is'} unreadable ({failures[0].reason})")
        else:
            found = f"it holds only checkpoints set aside earlier as unreadable ({_names(set_aside)})"
        if self.read_only:
            raise ConfigError(f"no checkpoint in {self.directory} can be read: {found}; nothing was changed")
        moved = [f.moved_to for f in failures]
        found += f"; set aside as {_names(moved)}" if moved else ""
        if not start_over:
            raise ConfigError(f"no checkpoint in {self.directory} can be read: {found}; to train again from "
                              "step 0 in this --workdir, run with --start-over")
        print(f"warning: no checkpoint in {self.directory} can be read: {found}; training from step 0 "
              "(--start-over)", file=sys.stderr, flush=True)

    def _meta(self, step: int) -> dict:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError("its meta record holds no config")
        return meta

    def _compatible_changes(self, step: int, meta: dict, config: Config) -> list[str]:
        """The compatible differences of `config` from checkpoint `step`'s saved config; raises
        ConfigError when any difference is incompatible."""
        incompatible, other = config_changes(meta["config"], config)
        if incompatible:
            # A reader's config is the run's config.json, so that file no longer describes the run.
            raise ConfigError(f"checkpoint {self.directory / str(step)} was written by an incompatible "
                              f"config ({'; '.join(incompatible)}); {self._fix}")
        return other

    def check_config(self, config: Config) -> None:
        """What `restore` would raise about `config` for the newest checkpoint whose meta record
        reads, without reading any array: for a command that checks its inputs before a slow
        start. Unreadable checkpoints are passed over here and left to `restore`."""
        for step in reversed(self.steps()):
            try:
                meta = self._meta(step)
            except Exception:  # noqa: BLE001 - restore names and handles unreadable checkpoints.
                continue
            self._compatible_changes(step, meta, config)
            return

    def restore(self, abstract_state, config: Config, *, start_over: bool = False,
                part: str | None = None, step: int | None = None) -> tuple[object, dict] | None:
        """The newest readable checkpoint as (state, meta), or None when there is none. Arrays
        come with the shardings and dtypes of `abstract_state` (cast while reading). `step`
        (read-only): that checkpoint alone, a ConfigError naming the steps there when it is not.

        `part` (read-only): the name of one top-level field of the saved state, "params", which
        `abstract_state` then describes alone; nothing else of the checkpoint (the optimizer
        state) is read.

        Raises ConfigError, touching nothing, when the newest readable checkpoint's saved config
        is incompatible with `config`; and when no checkpoint is readable (`_none_readable`).
        The meta record comes with "changed_settings": the compatible changes from the saved
        config, in words, for a trainer to note once its own checks have passed.
        """
        if (part is not None or step is not None) and not self.read_only:
            raise ValueError("restoring one part or one step of a checkpoint is for read-only users")
        steps = self.steps()
        if step is not None and step not in steps:
            there = "it holds none"
            if steps:
                there = f"give one of its checkpoints, {_names([str(s) for s in steps])}"
            raise ConfigError(f"{self.directory} has no checkpoint {step}; {there}")
        failures = []
        for step in reversed(steps if step is None else [step]):
            try:
                meta = self._meta(step)
            except Exception as err:  # noqa: BLE001 - any failure to read means unusable.
                failures.append(self._unusable(step, err))
                continue
            other = self._compatible_changes(step, meta, config)
            try:  # The configs agree, so arrays that do not fit mean missing or garbled files.
                saved = self._manager.item_metadata(step)["state"]
                saved = saved.tree if hasattr(saved, "tree") else saved
                cast = part is not None  # a reader may ask for another dtype
                if _leaf_shapes(saved[part] if part else saved, cast=cast) != _leaf_shapes(abstract_state, cast=cast):
                    raise ValueError("its array metadata is missing or does not fit the config's shapes")
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=self._restore_args(abstract_state, part)))["state"]
                restored = restored[part] if part else restored
            except Exception as err:  # noqa: BLE001 - missing, truncated or garbled array files.
                failures.append(self._unusable(step, err))
                continue
            for failure in failures:
                where = f"moved it to {self.directory / failure.moved_to}" if failure.moved_to else "left it as it is"
                print(f"warning: checkpoint {failure.step} in {self.directory} is unreadable ({failure.reason}); "
                      f"{where} and restored checkpoint {step}", file=sys.stderr, flush=True)
            return restored, {**meta, "changed_settings": other}
        self._none_readable(failures, start_over)
        return None

    def _restore_args(self, abstract_state, part: str | None):
        if not self.read_only:
            return ocp.args.StandardRestore(abstract_state)
        item = {part: abstract_state} if part else abstract_state
        return ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=part is not None)


def _leaf_shapes(tree, *, cast: bool = False) -> collections.Counter:
    """The multiset of (shape, dtype) of a state's arrays, from arrays or orbax metadata; of
    shapes alone (`cast`) when the target's dtypes may differ from those saved."""
    if hasattr(tree, "tree"):
        tree = tree.tree
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return collections.Counter((tuple(leaf.shape), "" if cast else str(leaf.dtype)) for leaf in leaves)
