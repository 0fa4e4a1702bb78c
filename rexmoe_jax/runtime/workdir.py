"""The run folder: checked writable and locked before anything is written to it, and one-line
messages for writes that fail in it (a full disk, no permission, a read-only file system).

Two processes on one --workdir (a re-submitted job, a double click) would interleave their
metrics.jsonl lines and break each other's checkpoints, so a training run holds DIR/run.lock
for its whole life. The file names the holder (host, pid, start time); an flock on it is what
excludes: the kernel drops it when the holder dies, however it dies, so a lock file left behind
by a dead process on this host is recognised and taken over. A lock file naming another host
is never taken over, because its pid cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import re
import socket
import tempfile
import time

from rexmoe_jax.cli import WriteFailed
from rexmoe_jax.config import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ROUTING_FILE = "routing.jsonl"
LOCK_FILE = "run.lock"
CHECKPOINTS = "checkpoints"
EVAL_FILE = "eval.json"  # written by evaluate (by default), read by plot
# What training writes in a run folder: no other command writes these names there.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, ROUTING_FILE, LOCK_FILE, CHECKPOINTS, "tensorboard")

# Failures of the storage rather than of the program: the run stops with one line naming them.
_WRITE_FAILURES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                   errno.EROFS: "read-only file system", errno.EFBIG: "file too large",
                   errno.EIO: "input/output error"}
# TensorStore (orbax's array writer) reports the errno only inside its message.
_OS_ERROR_CODE = re.compile(r"os_error_code=['\"]?(\d+)")


class WorkdirInUse(ConfigError):
    """Another process holds the workdir's lock."""


class WriteError(WriteFailed):
    """Writing a checkpoint or a log failed; the message is one line naming what and where."""


def failure_reason(err: BaseException) -> str:
    """A short lower-case reason for a failed write ("no space left on device"), found in the
    exception, its causes, or the text TensorStore wraps the errno in."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return _WRITE_FAILURES.get(seen.errno, (seen.strerror or str(seen)).lower())
        match = _OS_ERROR_CODE.search(str(seen))
        if match and int(match.group(1)) in _WRITE_FAILURES:
            return _WRITE_FAILURES[int(match.group(1))]
        seen = seen.__cause__ or seen.__context__
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__


def is_run(folder: pathlib.Path) -> bool:
    """Whether `folder` is (or was begun as) a training run's --workdir."""
    return any((folder / name).exists() for name in (CONFIG_FILE, METRICS_FILE, LOCK_FILE, CHECKPOINTS))


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The steps of the checkpoint folders in a run's checkpoints/, sorted, read from their names
    alone (no orbax): not a set-aside (N.corrupt) or half-written one."""
    folder = workdir / CHECKPOINTS
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def check_writable(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as err:
        raise ConfigError(f"--workdir {str(workdir)!r} is not writable ({failure_reason(err)}); "
                          "choose another folder") from None


@contextlib.contextmanager
def locked(workdir: pathlib.Path, *, writer: bool = True):
    """Holds the workdir's lock while the block runs. `writer` is False on the processes of a
    multi-host run that write nothing: only the writing process takes the lock. A workdir this
    made is removed again when the block fails before writing anything into it (a bad input
    leaves no empty folder behind, nor the empty checkpoints folder of a start refused later)."""
    made = not workdir.exists()
    check_writable(workdir)
    try:
        with _lock(workdir) if writer else contextlib.nullcontext():
            yield
    except BaseException:
        if made:
            for folder in sorted((p for p in workdir.rglob("*") if p.is_dir()), reverse=True) + [workdir]:
                with contextlib.suppress(OSError):  # not empty: it holds what the run wrote
                    folder.rmdir()
        raise


@contextlib.contextmanager
def _lock(workdir: pathlib.Path):
    try:
        fd = _acquire(workdir / LOCK_FILE)
    except OSError as err:
        raise ConfigError(f"--workdir {str(workdir)!r} cannot be locked ({failure_reason(err)})") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # The lock is released by close() whatever happens.
            os.unlink(workdir / LOCK_FILE)
        os.close(fd)


def _acquire(path: pathlib.Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirInUse(f"--workdir {str(path.parent)!r} is in use by {_describe(_holder(path))}; "
                               "wait for it to end or choose another --workdir") from None
        except OSError:
            pass  # A file system without flock: the holder's record below is all there is.
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # The previous holder removed the file between our open and flock: again.
    try:
        _check_previous(path, _holder(path))
        _write_holder(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(path: pathlib.Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "another process that is starting"
    return f"process {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"


def _check_previous(path: pathlib.Path, holder: dict) -> None:
    """A record left in a lock file we could flock: its holder ended without removing it."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return
    if holder.get("host") != socket.gethostname():
        raise WorkdirInUse(f"--workdir {str(path.parent)!r} is locked by {_describe(holder)}; if that run "
                           f"has ended, delete {path}")
    if _alive(pid):  # Alive but not holding the flock: a file system without flock.
        raise WorkdirInUse(f"--workdir {str(path.parent)!r} is in use by {_describe(holder)}; "
                           "wait for it to end or choose another --workdir")
    print(f"note: took over the lock {path} of process {pid}, which is no longer running", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's process.
        return True
    return True


def _write_holder(fd: int) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)


def has_checkpoints(workdir: pathlib.Path) -> bool:
    """Whether a run folder holds anything in its checkpoints folder (a run to resume)."""
    folder = workdir / CHECKPOINTS
    return folder.is_dir() and any(folder.iterdir())


def checkpoint_source(path: pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """(run folder, step) of train.py's --from: a run folder (its newest readable checkpoint,
    step None) or one of its checkpoints, RUN/checkpoints/STEP; a ConfigError otherwise."""
    # A STEP that is not there is left to Checkpointer.restore, which names the steps there are.
    if path.name.isdigit() and path.parent.name == CHECKPOINTS and path.parent.is_dir():
        return path.parent.parent, int(path.name)
    if (path / CHECKPOINTS).is_dir():
        return path, None
    raise ConfigError(f"--from {str(path)!r} is neither a training run's folder (with {CHECKPOINTS}/) "
                      f"nor one of its checkpoints ({CHECKPOINTS}/STEP); give one of those")
