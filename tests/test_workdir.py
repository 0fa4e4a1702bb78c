"""The workdir lock (one writer per run folder, stale locks taken over) and the one-line reasons
given for failed writes."""

import errno
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from rexmoe_jax.config import ConfigError
from rexmoe_jax.runtime import workdir

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with workdir.locked(tmp_path):
        record = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(workdir.WorkdirInUse) as err:
            with workdir.locked(tmp_path):
                pass
    message = str(err.value)
    assert f"process {os.getpid()} on host {socket.gethostname()}" in message and "\n" not in message
    assert not (tmp_path / workdir.LOCK_FILE).exists()  # removed on release
    with workdir.locked(tmp_path):  # and free again
        pass


def test_a_lock_held_by_another_process_stops_train_py_at_once(tmp_path):
    """A real second process: train.py exits 2 with one line naming the holder, and writes
    nothing into the folder."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rexmoe_jax.runtime import workdir\n"
         "with workdir.locked(__import__('pathlib').Path(sys.argv[1])):\n"
         "    print('held', flush=True); time.sleep(120)", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.iterdir())
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path),
                                 "mesh.num_devices=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"process {holder.pid} on host" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before == [workdir.LOCK_FILE]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                                          "since": "earlier"}))
    with workdir.locked(tmp_path):
        assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"took over the lock {tmp_path / workdir.LOCK_FILE} of process {pid}" in capsys.readouterr().out


def test_a_lock_naming_another_host_is_not_taken_over(tmp_path):
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 12345, "since": "t"}))
    with pytest.raises(workdir.WorkdirInUse, match="process 12345 on host elsewhere .*delete"):
        with workdir.locked(tmp_path):
            pass
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["host"] == "elsewhere"  # untouched


def test_processes_that_do_not_write_take_no_lock(tmp_path):
    with workdir.locked(tmp_path, writer=False):
        assert not (tmp_path / workdir.LOCK_FILE).exists()
        with workdir.locked(tmp_path):  # the writer still can
            pass


def test_unwritable_workdir_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="is not writable \\(not a directory\\)"):
        with workdir.locked(tmp_path / "file" / "run"):
            pass


@pytest.mark.parametrize("err,reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    # TensorStore, under orbax, wraps the errno into the text of a ValueError.
    (ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\": Failed to write 300850 bytes to file 6: "
                "No space left on device [os_error_code='28'] [source locations='x']"), "no space left on device"),
    (RuntimeError("something else\nsecond line"), "RuntimeError: something else"),
])
def test_failure_reasons(err, reason):
    assert workdir.failure_reason(err) == reason


def test_failure_reason_follows_the_cause():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert workdir.failure_reason(outer) == "no space left on device"


def test_a_refused_start_removes_the_empty_folders_it_made_and_keeps_written_files(tmp_path):
    """The processes of a run refused after the checkpoints folder was made (they disagreed on
    the config) leave no folder behind; a file written before the refusal keeps its folders."""
    run = tmp_path / "new-run"
    with pytest.raises(ConfigError), workdir.locked(run):
        (run / "checkpoints" / "tmp").mkdir(parents=True)
        raise ConfigError("the processes disagree")
    assert not run.exists()
    with pytest.raises(ConfigError), workdir.locked(run):
        (run / "checkpoints" / "empty").mkdir(parents=True)
        (run / "metrics.jsonl").write_text("{}\n")
        raise ConfigError("refused after writing")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
