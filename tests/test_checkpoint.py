"""The checkpointer on its own: which config changes a checkpoint resumes under, falling back
from an unreadable checkpoint to the previous one, read-only use, and failed saves."""

import contextlib
import gc
import logging
import pathlib
import resource
import shutil
import signal
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from files import hashes

from rexmoe_jax.checkpoint import Checkpointer, config_changes
from rexmoe_jax.config import Config, ConfigError, apply_overrides
from rexmoe_jax.runtime.workdir import WriteError


def test_config_changes_follow_the_sections():
    saved = Config().to_dict()
    changed = apply_overrides(Config(), ["compute.dtype=bfloat16", "compute.dispatch=capacity",
                                         "train.steps=500", "optim.clip_norm=0.5", "psr.schedule=linear"])
    incompatible, other = config_changes(saved, changed)
    assert incompatible == []
    assert {c.split(":")[0] for c in other} == {"compute.dtype", "compute.dispatch", "train.steps",
                                                "optim.clip_norm", "psr.schedule"}
    incompatible, _ = config_changes(saved, apply_overrides(Config(), ["model.d_model=64", "optim.clip_norm=0"]))
    assert [c.split(":")[0] for c in incompatible] == ["model.d_model", "optim.clip_norm"]
    # A config.json from before the compute section: its model.dtype is a compute change.
    legacy = Config().to_dict()
    legacy["model"]["dtype"] = "bfloat16"
    del legacy["compute"]
    assert config_changes(legacy, Config()) == ([], ["compute.dtype: 'bfloat16' -> 'float32'"])


def two_checkpoints(workdir, arrays=2, size=6):
    """Checkpoints 1 and 2 of a small state (step s holds s * the base arrays)."""
    state = {f"a{i}": jnp.arange(size, dtype=jnp.float32) + i for i in range(arrays)}
    checkpointer = Checkpointer(workdir, keep=3)
    for step in (1, 2):
        checkpointer.save(step, jax.tree.map(lambda x, s=step: x * s, state), {"step": step, "config": Config().to_dict()})
    checkpointer.close()
    return state


def test_checkpoints_at_multiples_of_keep_every_outlive_the_newest_kept(tmp_path):
    """Saved every 2 steps to step 10, the newest one kept: 10, and 4 and 8 (multiples of 4);
    without keep_every only 10."""
    state = {"a": jnp.arange(4, dtype=jnp.float32)}
    for keep_every, expected in ((4, [4, 8, 10]), (0, [10])):
        checkpointer = Checkpointer(tmp_path / str(keep_every), keep=1, keep_every=keep_every)
        for step in range(2, 11, 2):
            checkpointer.save(step, state, {"step": step, "config": Config().to_dict()})
            checkpointer.settle()
        checkpointer.close()
        assert Checkpointer(tmp_path / str(keep_every), keep=1, read_only=True).steps() == expected


def _halve(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _files(folder, name):
    return [p for p in folder.rglob(name) if p.is_file()]


CORRUPTIONS = {
    "missing state/_METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "garbage state/_METADATA": lambda d: (d / "state" / "_METADATA").write_bytes(b"garbage"),
    "missing meta": lambda d: shutil.rmtree(d / "meta"),
    "garbage meta": lambda d: [p.write_bytes(b"\x00garbage") for p in _files(d / "meta", "metadata")],
    "meta without a config": lambda d: [p.write_text("[]") for p in _files(d / "meta", "metadata")],
    "truncated array files": lambda d: [_halve(p) for p in _files(d / "state", "*") if p.parent.name == "d"],
    "garbage array files": lambda d: [p.write_bytes(b"garbage") for p in _files(d / "state", "*")
                                      if p.parent.name == "d"],
    "missing array files": lambda d: [shutil.rmtree(p) for p in (d / "state").rglob("d") if p.is_dir()],
    "garbage manifest": lambda d: [p.write_bytes(b"garbage") for p in _files(d / "state", "manifest.ocdbt")],
    "empty folder": lambda d: (shutil.rmtree(d), d.mkdir()),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_any_unreadable_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, capfd, corruption):
    state = two_checkpoints(tmp_path, arrays=24, size=20_000)
    folder = tmp_path / "checkpoints"
    CORRUPTIONS[corruption](folder / "2")
    checkpointer = Checkpointer(tmp_path, keep=3)
    restored, meta = checkpointer.restore(jax.eval_shape(lambda: state), Config())
    checkpointer.close()
    assert meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(restored["a3"]), np.arange(20_000, dtype=np.float32) + 3)
    assert (folder / "2.corrupt").is_dir() and not (folder / "2").exists()
    err = capfd.readouterr().err
    # One warning line; no "Event loop is closed" or orbax tracebacks around it.
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith(f"warning: checkpoint 2 in {folder} is unreadable (")
        and line.endswith(f"moved it to {folder / '2.corrupt'} and restored checkpoint 1")]
    assert err.count("warning:") == 1


def test_a_step_set_aside_twice_keeps_both_copies(tmp_path):
    state = two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints"
    (folder / "2.corrupt").mkdir()
    (folder / "2.corrupt" / "earlier").write_text("kept")
    (folder / "2" / "state" / "_METADATA").unlink()
    checkpointer = Checkpointer(tmp_path, keep=3)
    assert checkpointer.restore(jax.eval_shape(lambda: state), Config())[1]["step"] == 1
    checkpointer.close()
    assert (folder / "2.corrupt" / "earlier").read_text() == "kept" and (folder / "2.corrupt.2").is_dir()


def test_incompatible_only_when_the_saved_config_differs(tmp_path):
    """A different model is refused naming the field, touching nothing; the same config with
    arrays that do not fit is a damaged checkpoint, set aside."""
    state = two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints"
    other = apply_overrides(Config(), ["model.d_model=64"])
    checkpointer = Checkpointer(tmp_path, keep=3)
    with pytest.raises(ConfigError, match=r"incompatible config \(model.d_model: 128 -> 64\)"):
        checkpointer.restore(jax.eval_shape(lambda: state), other)
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]
    wrong_shapes = {name: jax.ShapeDtypeStruct((7,), jnp.float32) for name in state}
    with pytest.raises(ConfigError, match="checkpoints 2 and 1 are unreadable"):
        checkpointer.restore(wrong_shapes, Config())
    checkpointer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["1.corrupt", "2.corrupt"]


def test_check_config_reads_the_newest_readable_meta_and_no_array(tmp_path):
    """check_config refuses another model as restore would, from the meta records alone: it
    passes with every array file gone, and judges by checkpoint 1 when 2's meta is garbage."""
    two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints"
    for step in ("1", "2"):
        for arrays in [p for p in (folder / step / "state").rglob("d") if p.is_dir()]:
            shutil.rmtree(arrays)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    checkpointer = Checkpointer(tmp_path, keep=3, read_only=True)
    checkpointer.check_config(Config())  # no array is read, so none is missed
    with pytest.raises(ConfigError, match=r"checkpoint .*/2 was written by an incompatible config "
                                          r"\(model.d_model: 128 -> 64\)"):
        checkpointer.check_config(apply_overrides(Config(), ["model.d_model=64"]))
    checkpointer.close()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    for record in _files(folder / "2" / "meta", "metadata"):
        record.write_bytes(b"\x00garbage")
    checkpointer = Checkpointer(tmp_path, keep=3, read_only=True)
    with pytest.raises(ConfigError, match=r"checkpoint .*/1 was written by an incompatible config"):
        checkpointer.check_config(apply_overrides(Config(), ["model.d_model=64"]))
    checkpointer.close()


def test_read_only_skips_an_unreadable_checkpoint_and_changes_nothing(tmp_path, capsys, caplog):
    state = two_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    checkpointer = Checkpointer(tmp_path, keep=3, read_only=True)
    assert checkpointer.restore(jax.eval_shape(lambda: state), Config())[1]["step"] == 1
    checkpointer.close()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert "checkpoint 2 in" in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # no orbax noise


def test_read_only_creates_no_folder(tmp_path):
    checkpointer = Checkpointer(tmp_path / "run", keep=3, read_only=True)
    assert checkpointer.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, Config()) is None
    checkpointer.close()
    assert not (tmp_path / "run").exists()


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail with EFBIG, as a full disk fails them with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not the end of the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_background_save_surfaces_at_the_next_check(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, keep=3)
    meta = {"step": 1, "config": {}}
    checkpointer.save(1, {"w": jnp.zeros((4,))}, meta)
    assert checkpointer.settle() == [1]
    big = {"w": jax.random.normal(jax.random.key(0), (300_000,))}  # 1.2 MB, past the limit
    with file_size_limit(64 * 1024):
        checkpointer.save(2, big, dict(meta, step=2))  # returns: the write fails in the background
        deadline = time.time() + 120
        with pytest.raises(WriteError) as err:
            while time.time() < deadline:
                checkpointer.check()
                time.sleep(0.05)
    assert str(err.value) == f"file too large while saving step 2 in {checkpointer.directory}"
    assert not [r for r in caplog.records if r.exc_info]  # orbax's logged tracebacks are dropped
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == ["1"]  # no temporary folder
    checkpointer.close()  # the failure is not raised a second time
    checkpointer = Checkpointer(tmp_path, keep=3)
    assert checkpointer.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, Config())[1]["step"] == 1
    checkpointer.close()


def test_a_failed_save_still_lists_the_checkpoint_it_would_have_replaced(tmp_path):
    """With keep=1, orbax drops step 1 from its list as the save of step 2 begins; the save fails,
    step 1 stays on disk, and the steps named as intact must include it."""
    checkpointer = Checkpointer(tmp_path, keep=1)
    checkpointer.save(1, {"w": jnp.zeros((4,))}, {"step": 1, "config": {}})
    assert checkpointer.settle() == [1]
    with file_size_limit(64 * 1024):
        big = {"w": jax.random.normal(jax.random.key(0), (300_000,))}  # 1.2 MB, past the limit
        checkpointer.save(2, big, {"step": 2, "config": {}})
        with pytest.raises(WriteError):
            checkpointer.close()
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == ["1"]
    assert checkpointer.steps() == [1]


def test_no_checkpoint_restores_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=3)
    assert checkpointer.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, Config()) is None
    checkpointer.close()



def test_closed_event_loop_reports_are_dropped_and_others_kept(monkeypatch):
    """The reports a failed restore leaves behind ("Event loop is closed", from TensorStore
    completing reads after orbax closed its loop) are dropped; any other unraisable error
    still reaches the previous hook."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    Checkpointer(pathlib.Path("unused"), keep=1, read_only=True).close()
    report = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                   exc_traceback=None, err_msg=None, object=None)
    other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("real"), exc_traceback=None,
                                  err_msg=None, object=None)
    # "Exception ignored in: <coroutine object _read_array_index_and_device_put>": a read of orbax's
    # that failed beside the one reported; the same from a coroutine of anyone else is kept.
    orbax_read = types.SimpleNamespace(cr_code=types.SimpleNamespace(
        co_filename="/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py"))
    failed_read = types.SimpleNamespace(exc_type=Exception, exc_value=Exception("reading array index"),
                                        exc_traceback=None, err_msg=None, object=orbax_read)
    mine = types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename="/work/mine.py"))
    failed_mine = types.SimpleNamespace(**{**vars(failed_read), "object": mine})
    for args in (report, other, failed_read, failed_mine):
        sys.unraisablehook(args)
    assert seen == [other, failed_mine]


def _unreadable_pair(workdir):
    """Checkpoints 1 and 2 of a state large enough for orbax to read it in many concurrent
    pieces, each with its array files truncated: nothing can be restored."""
    state = two_checkpoints(workdir, arrays=24, size=20_000)
    for step in ("1", "2"):
        CORRUPTIONS["truncated array files"](workdir / "checkpoints" / step)
    return jax.eval_shape(lambda: state)


def _stderr_lines(capfd) -> list[str]:
    gc.collect()  # orbax's failed read coroutines are reported when they are collected
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def test_every_checkpoint_unreadable_is_one_line_and_needs_start_over(tmp_path, capfd):
    abstract = _unreadable_pair(tmp_path)
    folder = tmp_path / "checkpoints"
    checkpointer = Checkpointer(tmp_path, keep=3)
    with pytest.raises(ConfigError) as err:
        checkpointer.restore(abstract, Config())
    message = str(err.value)
    assert message.startswith(f"no checkpoint in {folder} can be read: checkpoints 2 and 1 are unreadable (")
    assert message.endswith("; set aside as 2.corrupt and 1.corrupt; to train again from step 0 in this "
                            "--workdir, run with --start-over")
    assert _stderr_lines(capfd) == []  # nothing but the error the caller prints
    assert sorted(p.name for p in folder.iterdir()) == ["1.corrupt", "2.corrupt"]
    # Run again: the set-aside checkpoints still stop it, until --start-over.
    with pytest.raises(ConfigError, match=r"only checkpoints set aside earlier as unreadable \(1.corrupt and "
                                          r"2.corrupt\); to train again from step 0"):
        checkpointer.restore(abstract, Config())
    assert checkpointer.restore(abstract, Config(), start_over=True) is None
    checkpointer.close()
    [warning] = _stderr_lines(capfd)
    assert warning.startswith("warning: no checkpoint in") and warning.endswith("training from step 0 (--start-over)")


def test_every_checkpoint_unreadable_to_a_reader_changes_nothing(tmp_path, capfd):
    abstract = _unreadable_pair(tmp_path)
    before = hashes(tmp_path)
    checkpointer = Checkpointer(tmp_path, keep=3, read_only=True)
    with pytest.raises(ConfigError, match=r"checkpoints 2 and 1 are unreadable \(.*\); nothing was changed"):
        checkpointer.restore(abstract, Config(), start_over=True)  # a reader never starts over
    checkpointer.close()
    assert _stderr_lines(capfd) == []
    assert hashes(tmp_path) == before


def test_changed_settings_come_with_the_meta_record_and_are_not_printed(tmp_path, capsys):
    """The compatible changes from the saved config (train.steps 300, the default, to 500) come
    back in words for the trainer to note after its own checks; restore prints nothing."""
    state = two_checkpoints(tmp_path)
    longer = apply_overrides(Config(), ["train.steps=500"])
    for read_only in (True, False):
        checkpointer = Checkpointer(tmp_path, keep=3, read_only=read_only)
        _, meta = checkpointer.restore(jax.eval_shape(lambda: state), longer)
        checkpointer.close()
        assert meta["step"] == 2 and meta["changed_settings"] == ["train.steps: 300 -> 500"]
        assert capsys.readouterr().out == ""


def _traceback_through(filename: str):
    """A real traceback whose frame runs code compiled as `filename`."""
    try:
        exec(compile("raise ValueError('read failed')", filename, "exec"))
    except ValueError as err:
        return err


def test_orbax_read_failures_from_tasks_and_threads_are_dropped_and_others_kept(monkeypatch):
    """asyncio's "Task exception was never retrieved" and a thread's exception are dropped when
    the traceback passes through orbax; the same from anyone else's code still shows."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(("unraisable", args.exc_value)))
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(("thread", args.exc_value)))
    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_logger, "filters", [])
    Checkpointer(pathlib.Path("unused"), keep=1, read_only=True).close()
    orbax = _traceback_through("/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py")
    mine = _traceback_through("/work/mine.py")
    for err in (orbax, mine):
        sys.unraisablehook(types.SimpleNamespace(exc_type=ValueError, exc_value=err, exc_traceback=err.__traceback__,
                                                 err_msg=None, object=None))
        threading.excepthook(types.SimpleNamespace(exc_type=ValueError, exc_value=err,
                                                   exc_traceback=err.__traceback__, thread=None))
    assert seen == [("unraisable", mine), ("thread", mine)]
    records = [logging.LogRecord("asyncio", logging.ERROR, "tasks.py", 1, "Task exception was never retrieved",
                                 None, (ValueError, err, err.__traceback__)) for err in (orbax, mine)]
    # bool(): from Python 3.12 a filter that keeps a record returns it, not True.
    assert [bool(asyncio_logger.filter(record)) for record in records] == [False, True]
