"""What a command may write: nothing a user owns is deleted or overwritten unless they said so
for that exact thing.

A command that writes a file or a folder (evaluate --output, plot --output, data prepare, the
study's records and report) checks its target before the slow part, with these rules:
  - a run's own files (config.json, metrics.jsonl, checkpoints/, ...) are never written by
    anything but training;
  - an existing file or folder is replaced only when the command can tell it made it (`ours`:
    an earlier eval.json, a PNG drawn by matplotlib, a prepared corpus and nothing else);
  - folders are written beside the target under a temporary name and renamed into place when
    complete, files are written to a temporary file and renamed, so a failure or a Ctrl-C
    leaves the target as it was and no temporary behind.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

from rexmoe_jax.config import ConfigError
from rexmoe_jax.runtime.workdir import RUN_FILES, WriteError, failure_reason, is_run

Ours = Callable[[pathlib.Path], bool]


def run_file(path: pathlib.Path) -> pathlib.Path | None:
    """The run folder whose own file (or a file inside its own folder) `path` is, else None."""
    path = path.resolve()
    for folder in path.parents:
        if is_run(folder):
            return folder if path.relative_to(folder).parts[0] in RUN_FILES else None
    return None


def check_file(path: pathlib.Path, option: str, ours: Ours, *, replace_flag: str | None = None) -> None:
    """Raises ConfigError unless `path` may be written: not a run's own file, not a folder, and
    new or made by this command (`ours`). `replace_flag`: the option that lets the command
    replace any file there, which the message then names instead."""
    run = run_file(path)
    if run is not None:
        raise ConfigError(f"{option} {str(path)!r} is one of the files of the training run in {str(run)!r}; "
                          "choose another file")
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; give a file name")
    if path.exists() and not ours(path):
        if replace_flag:
            raise ConfigError(f"{option} {str(path)!r} exists; give a new file name, or {replace_flag} to "
                              "replace it")
        raise ConfigError(f"{option} {str(path)!r} exists and was not written by this command; "
                          "give a new file name, or move that file away first")


def drawn_by_matplotlib(path: pathlib.Path) -> bool:
    """Whether a PNG was drawn by matplotlib (its header names it): plot and the study report
    may replace such a figure, never another picture."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00Matplotlib" in head


@contextlib.contextmanager
def staged_file(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary file name beside `path`, renamed to `path` when the block completes and
    removed when it does not."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is private; the result should not be
        os.close(fd)
    except OSError as err:
        raise WriteError(f"{failure_reason(err)} while creating a file beside {path}") from None
    staging = pathlib.Path(name)
    try:
        yield staging
        os.replace(staging, path)
    except OSError as err:
        raise WriteError(f"{failure_reason(err)} while writing {path}") from None
    finally:
        staging.unlink(missing_ok=True)


def write_text(path: pathlib.Path, text: str) -> None:
    """Writes `path` whole or not at all."""
    with staged_file(path) as staging:
        staging.write_text(text)


def check_folder(path: pathlib.Path, option: str, *, protected: Iterable[pathlib.Path], ours: Ours,
                 looks_ours: Ours, force: bool) -> None:
    """Raises ConfigError unless the folder `path` may be (re)placed: it is no `protected` path
    (an input) nor holds one, and it is absent, empty, or `ours` (made by this command and
    holding nothing else); `force` also lets it replace one that `looks_ours` (made by this
    command, but incomplete or with other files in it)."""
    path = path.resolve()
    if not path.name:
        raise ConfigError(f"{option} {str(path)!r} names no folder that can be replaced; give a new folder")
    for source in protected:
        source = source.resolve()
        if source == path or path in source.parents:
            raise ConfigError(f"{option} {str(path)!r} {'is' if source == path else 'holds'} the input "
                              f"{str(source)!r}; give a new folder")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a file; give a new folder")
    if ours(path) or (force and looks_ours(path)):
        return
    hint = " (--force replaces it)" if looks_ours(path) else ""
    raise ConfigError(f"{option} {str(path)!r} holds files this command did not write{hint}; give a new folder")


@contextlib.contextmanager
def staged_folder(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A new temporary folder beside `path`, renamed to `path` (replacing it) when the block
    completes, and removed when it does not: a failure or a Ctrl-C changes nothing."""
    path = path.resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
        staging.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; the result should not be
    except OSError as err:
        raise WriteError(f"{failure_reason(err)} while creating a folder beside {path}") from None
    try:
        yield staging
        _replace(staging, path)
    except OSError as err:
        raise WriteError(f"{failure_reason(err)} while writing {path}; nothing was changed") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(staging: pathlib.Path, path: pathlib.Path) -> None:
    """Renames `staging` to `path`; an earlier `path` is renamed aside first and removed after."""
    if not path.exists():
        staging.rename(path)
        return
    old = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    path.rename(old / path.name)
    try:
        staging.rename(path)
    except BaseException:
        (old / path.name).rename(path)
        raise
    finally:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
