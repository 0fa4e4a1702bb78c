"""The run's pictures and the run log it reads."""

import json

import numpy as np
import pytest
from files import hashes, one_error_line

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


def _write_run(folder):
    """A run's logs: metrics of 20 steps and one routing record of 3 layers x pool 8."""
    records = [{"step": s, "loss": 5 - s / 10, "psr_pool_size": 8 + s // 5, "lr": 1e-3} for s in range(1, 21)]
    records.append({"step": 20, "eval_loss": 3.2, "eval_ppl": 24.5})
    records[5]["loss"] = None  # a non-finite loss, as metrics.jsonl writes it
    (folder / runlog.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    load = np.full((3, 8), 1 / 8)
    load[2, 4:] = 0.0  # a smaller last group of pool 4
    load[2, :4] = 0.25
    (folder / runlog.ROUTING_FILE).write_text(json.dumps(
        {"step": 20, "pool_sizes": [8, 8, 4], "expert_load": load.tolist()}) + "\n")


def test_plot_writes_three_pngs(tmp_path, capsys):
    _write_run(tmp_path)
    assert plot.main(["--workdir", str(tmp_path)]) == 0
    for name in ("loss.png", "psr.png", "expert_load.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "expert_load.png" in capsys.readouterr().out


def test_the_pictures_draw_the_logged_values(tmp_path, monkeypatch):
    """What each picture draws, read back from its figure: the losses and N_t by step (the
    non-finite loss of step 6 a gap), the learning rate, and LBV = load x pool - 1 by hand, blank
    past the last group's pool of 4."""
    _write_run(tmp_path)
    load = np.full((3, 8), 1 / 8)
    load[0] = [0.25, 0.25, 0, 0, 0.125, 0.125, 0.125, 0.125]
    load[2] = [0.5, 0.25, 0.25, 0, 0, 0, 0, 0]
    (tmp_path / runlog.ROUTING_FILE).write_text(json.dumps(
        {"step": 20, "pool_sizes": [8, 8, 4], "expert_load": load.tolist()}) + "\n")
    figures = {}
    monkeypatch.setattr(plot, "_save", lambda fig, path: figures.setdefault(path.name, fig))
    assert plot.main(["--workdir", str(tmp_path)]) == 0
    steps = np.arange(1, 21)
    train, held_out = figures["loss.png"].axes[0].lines
    losses = np.where(steps == 6, np.nan, 5 - steps / 10)
    np.testing.assert_array_equal(train.get_xdata(), steps)
    np.testing.assert_allclose(np.asarray(train.get_ydata(), np.float64), losses)
    assert list(held_out.get_xdata()) == [20] and list(held_out.get_ydata()) == [3.2]
    pool_ax, lr_ax = figures["psr.png"].axes[:2]
    np.testing.assert_array_equal(pool_ax.lines[0].get_ydata(), 8 + steps // 5)
    np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), 1e-3)
    lbv = np.ma.filled(figures["expert_load.png"].axes[0].images[0].get_array(), np.nan)
    want = [[1, 1, -1, -1, 0, 0, 0, 0], [0] * 8, [1, 0, 0, -1] + [np.nan] * 4]
    np.testing.assert_allclose(lbv, want)


def test_plot_without_records(tmp_path, capsys):
    assert plot.main(["--workdir", str(tmp_path)]) == 2
    assert "has no records with a step, and there is no eval.json with routing to draw" in one_error_line(
        capsys.readouterr().err)


def test_an_evaluated_run_not_trained_here_gets_its_activation_pictures(tmp_path, capsys):
    """An imported run has only evaluate's report: its activation ratios are drawn, nothing else."""
    ratios = [[0.5, 0.25, 0.25, 0.0], [0.0, 0.5, 0.5, 0.0]]
    report = {"routing": {"psalms 1-41": {"activation_ratio": ratios}}}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    assert plot.main(["--workdir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["activation_psalms_1_41.png"]
    captured = capsys.readouterr()
    assert "has no training records yet" in captured.err
    assert "wrote activation_psalms_1_41.png to" in captured.out


def _no_expert_load(run):
    record = json.loads((run / runlog.ROUTING_FILE).read_text())
    del record["expert_load"]
    (run / runlog.ROUTING_FILE).write_text(json.dumps(record) + "\n")


@pytest.mark.parametrize("damage,args,message", [
    (lambda run: (run.parent / "out.png").write_text("mine"), ["--output", "{parent}/out.png"],
     "out.png' is a file; give a folder"),
    (_no_expert_load, [], "routing.jsonl: its last record has no 'expert_load'"),
    (lambda run: (run / "loss.png").write_bytes(b"\x89PNG my own picture"), [],
     "loss.png' exists and was not written by this command"),
    (lambda run: None, ["--output", "{run}/checkpoints"], "is one of the files of the training run"),
])
def test_plot_checks_everything_before_drawing(tmp_path, capsys, damage, args, message):
    """One line, exit 2, and not one picture drawn: the folder is as it was."""
    run = tmp_path / "run"
    run.mkdir()
    _write_run(run)
    damage(run)
    before = hashes(tmp_path)
    args = [a.format(parent=tmp_path, run=run) for a in args]
    assert plot.main(["--workdir", str(run), *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert hashes(tmp_path) == before


def test_plot_replaces_its_own_pictures_and_warns_once_per_file(tmp_path, capsys):
    _write_run(tmp_path)
    with open(tmp_path / runlog.METRICS_FILE, "a") as f:
        f.write("garbage\n" * 40)
    for _ in range(2):  # the second time over its own pictures
        assert plot.main(["--workdir", str(tmp_path)]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err == [f"warning: {tmp_path / runlog.METRICS_FILE}: 40 lines are not complete JSON records "
                       "(lines 22, 23, 24, 25, 26 and 35 more); dropped them"]


def test_tensorboard_events_when_installed(tmp_path):
    """tensorboardX is in the test extras, so this always runs in the suite."""
    from tensorboard_reader import scalars

    log = runlog.RunLog(tmp_path, resumed_step=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step, "finite": True, "layer_grad_norm": [1.0]})
    log.close()
    assert scalars(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
