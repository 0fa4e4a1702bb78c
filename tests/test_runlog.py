"""metrics.jsonl and routing.jsonl: records written per step, and a resumed run's view of them."""

import errno
import json
import os

import numpy as np
import pytest

from rexmoe_jax import runlog
from rexmoe_jax.config import ConfigError
from rexmoe_jax.runtime.workdir import WriteError


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    """Lines after the resumed step were written by a run stopped before its next checkpoint:
    the resumed run writes them again, so they are dropped first."""
    log = runlog.RunLog(tmp_path, resumed_step=0)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": step / 10})
    log.write_routing(20, np.full((2, 4), 0.25), np.array([4, 4]))
    log.write_routing(30, np.full((2, 4), 0.25), np.array([4, 4]))
    log.close()
    runlog.RunLog(tmp_path, resumed_step=20).close()
    assert [r["step"] for r in runlog.read_records(tmp_path / "metrics.jsonl")] == [10, 20]
    routing = runlog.read_records(tmp_path / "routing.jsonl")
    assert [r["step"] for r in routing] == [20] and routing[0]["pool_sizes"] == [4, 4]


def test_to_host_gives_json_numbers_and_lists():
    record = runlog.to_host({"loss": np.float32(1.5), "layer": np.array([0.123456789, 2.0])})
    assert json.loads(json.dumps(record)) == {"loss": 1.5, "layer": [0.12346, 2.0]}


def test_a_torn_last_line_is_dropped_with_a_warning_and_the_log_resumes(tmp_path, capsys):
    """A process killed mid-write leaves half a line; resuming drops it instead of crashing."""
    path = tmp_path / "metrics.jsonl"
    whole = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"step": 3, "lo')
    log = runlog.RunLog(tmp_path, resumed_step=2)
    assert f"{path}:3 is not a complete JSON record" in capsys.readouterr().err
    log.write({"step": 3, "loss": 1.0})
    log.close()
    assert runlog.read_records(path) == whole + [{"step": 3, "loss": 1.0}]
    assert path.read_text().count("\n") == 3  # the torn piece is gone from the file


def test_non_finite_values_are_written_as_null(tmp_path):
    log = runlog.RunLog(tmp_path, resumed_step=0)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "layer_lbv_max": [0.5, float("-inf")]})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    assert json.loads(line, parse_constant=reject) == {"step": 1, "loss": None, "grad_norm": None,
                                                        "layer_lbv_max": [0.5, None]}


def test_a_failed_write_names_the_file_and_step(tmp_path, monkeypatch):
    log = runlog.RunLog(tmp_path, resumed_step=0)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(WriteError) as err:
        log.write({"step": 7, "loss": 1.0})
    assert str(err.value) == f"no space left on device while writing {tmp_path / 'metrics.jsonl'} at step 7"


def test_sync_flushes_to_disk(tmp_path, monkeypatch):
    log = runlog.RunLog(tmp_path, resumed_step=0)
    log.write({"step": 1, "loss": 1.0})
    log.write_routing(1, np.full((1, 2), 0.5), np.array([2]))
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    log.sync()
    assert synced == [str(tmp_path / "metrics.jsonl"), str(tmp_path / "routing.jsonl")]


def test_a_new_run_refuses_a_folder_whose_work_it_would_replace(tmp_path):
    """check_fresh_start, for a folder with no checkpoint: what it lets start and what not."""
    ours = json.dumps({"model": {"d_model": 32}, "train": {"steps": 10}, "data": {}})
    other = json.dumps({"model": {"d_model": 64}, "train": {"steps": 10}, "data": {}})
    config, metrics = tmp_path / "config.json", tmp_path / "metrics.jsonl"
    runlog.check_fresh_start(tmp_path, ours, 4, start_over=False)  # empty
    config.write_text(json.dumps({"model_type": "qwen2_moe", "hidden_size": 32}))  # an export's
    for start_over in (False, True):
        with pytest.raises(ConfigError, match="holds a config.json that is not a training run's"):
            runlog.check_fresh_start(tmp_path, ours, 4, start_over=start_over)
    config.write_text('{"model": {"d_mod')  # torn
    with pytest.raises(ConfigError, match="cannot be read \\(torn by a crash\\?\\).*--start-over"):
        runlog.check_fresh_start(tmp_path, ours, 4, start_over=False)
    runlog.check_fresh_start(tmp_path, ours, 4, start_over=True)
    # Another config with no records (it stopped while compiling, say): it starts again.
    config.write_text(other)
    runlog.check_fresh_start(tmp_path, ours, 4, start_over=False)
    lines = [json.dumps({"step": s, "loss": 5.0}) for s in (1, 2, 3)]
    metrics.write_text("\n".join(lines) + '\n{"step": 9, "lo')  # and a torn last line
    with pytest.raises(ConfigError, match="another run's config.json and records but no checkpoint; "):
        runlog.check_fresh_start(tmp_path, ours, 4, start_over=False)
    runlog.check_fresh_start(tmp_path, ours, 4, start_over=True)
    # The same config, stopped before step 4, by which a checkpoint must have been saved.
    config.write_text(ours)
    runlog.check_fresh_start(tmp_path, ours, 4, start_over=False)
    metrics.write_text("\n".join(lines + [json.dumps({"step": 4, "eval_loss": 5.0})]))
    with pytest.raises(ConfigError, match=r"records up to step 4 but no checkpoint \(deleted, or their"):
        runlog.check_fresh_start(tmp_path, ours, 4, start_over=False)


def test_the_step_that_proves_a_save():
    """By hand: saves every 4 of 12 steps: the first (4) is waited for before the second (8)
    starts; every 10 of 12: only the end proves it; 0 (only at the end) of 300: step 300. A run
    started from step 5 (train.py --from) saves at 8 and 12 first, so 12 proves it; from step 8,
    at 12 and 16."""
    assert runlog.proof_step(4, 12) == 8
    assert runlog.proof_step(10, 12) == 12
    assert runlog.proof_step(0, 300) == 300
    assert runlog.proof_step(4, 20, start=5) == 12
    assert runlog.proof_step(4, 20, start=8) == 16
    assert runlog.proof_step(0, 300, start=200) == 300
