"""The run's pictures and the run log it reads."""

import json

import numpy as np

from rexmoe_jax import plot, runlog


def test_truncate_on_resume_and_host_values(tmp_path):
    path = tmp_path / runlog.METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    log = runlog.RunLog(tmp_path, resumed_step=4)
    assert [r["step"] for r in runlog.read_records(path)] == [1, 2, 3, 4]
    log.write({"step": 5, "loss": 0.5})
    log.close()
    assert runlog.read_records(path)[-1] == {"step": 5, "loss": 0.5}
    host = runlog.to_host({"a": np.float32(1.5), "b": np.array([1.0, 2.0]), "c": np.bool_(True)})
    assert host == {"a": 1.5, "b": [1.0, 2.0], "c": True}


def test_plot_writes_three_pngs(tmp_path, capsys):
    records = [{"step": s, "loss": 5 - s / 10, "psr_pool_size": 8 + s // 5, "lr": 1e-3} for s in range(1, 21)]
    records.append({"step": 20, "eval_loss": 3.2, "eval_ppl": 24.5})
    records[5]["loss"] = None  # a non-finite loss, as metrics.jsonl writes it
    (tmp_path / runlog.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    load = np.full((3, 8), 1 / 8)
    load[2, 4:] = 0.0  # a smaller last group of pool 4
    load[2, :4] = 0.25
    (tmp_path / runlog.ROUTING_FILE).write_text(json.dumps(
        {"step": 20, "pool_sizes": [8, 8, 4], "expert_load": load.tolist()}) + "\n")
    assert plot.main(["--workdir", str(tmp_path)]) == 0
    for name in ("loss.png", "psr.png", "expert_load.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "expert_load.png" in capsys.readouterr().out


def test_plot_without_records(tmp_path, capsys):
    assert plot.main(["--workdir", str(tmp_path)]) == 2
    assert "has no records" in capsys.readouterr().err


def test_tensorboard_events_when_installed(tmp_path):
    """tensorboardX is in the test extras, so this always runs in the suite."""
    from tensorboard_reader import scalars

    log = runlog.RunLog(tmp_path, resumed_step=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step, "finite": True, "layer_grad_norm": [1.0]})
    log.close()
    assert scalars(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
