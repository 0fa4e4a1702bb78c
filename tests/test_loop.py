"""The host loop: runs that stop (preemption, crashes, non-finite steps) and resume exactly,
checkpoint fallback, config changes on resume, and a short run on the embedded corpus."""

import errno
import json
import math
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from files import hashes
from processes import ignores_sigterm

import train
from rexmoe_jax import loop, runlog, sharding
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.config import Config, ConfigError, apply_overrides, load_preset
from rexmoe_jax.runlog import read_records
from rexmoe_jax.runtime.preemption import StopRequest
from rexmoe_jax.runtime.workdir import WriteError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.expert_ffn=16", "model.num_experts=4", "model.top_k=2", "model.reuse=2",
         "psr.schedule=linear", "psr.start_step=3", "psr.end_step=9", "data.seq_len=16",
         "data.batch_size=4", "train.steps=12", "train.log_every=1", "train.eval_every=6",
         "train.eval_batches=1", "train.checkpoint_every=4", "train.sample_tokens=0", "mesh.num_devices=1"]
TIMING = set(loop.TIMED)


class StopAt(StopRequest):
    """A preemption at a chosen step, as SIGTERM would request it."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def requested(self, step):
        return step >= self.step


@pytest.fixture(scope="module", autouse=True)
def small_corpus(tmp_path_factory):
    """200 KJV chapters as JSON Lines: tokenized in a fraction of the whole book's time."""
    from rexmoe_jax.data import read_embedded_documents

    path = tmp_path_factory.mktemp("corpus") / "kjv200.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_embedded_documents()[:200]))
    SMALL.append(f"data.corpus={path}")
    yield
    SMALL.remove(f"data.corpus={path}")


def saved_steps(workdir):
    checkpointer = Checkpointer(workdir, 3)
    steps = checkpointer.steps()
    checkpointer.close()
    return steps


def config(*extra):
    return apply_overrides(Config(), SMALL + list(extra))


def metrics(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(workdir / "metrics.jsonl")]


def final_params(workdir, cfg):
    from rexmoe_jax import trainer
    from rexmoe_jax.optimizer import make_optimizer

    model = trainer.build_model(cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    abstract = jax.eval_shape(lambda: trainer.init_state(cfg, model, tx))
    checkpointer = Checkpointer(workdir, 3)
    state, _ = checkpointer.restore(abstract, cfg)
    checkpointer.close()
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    loop.run(config(), workdir)
    return workdir


def assert_same_run(workdir, ref_dir):
    assert metrics(workdir) == metrics(ref_dir)
    a, b = final_params(workdir, config()), final_params(ref_dir, config())
    assert int(a.step) == int(b.step) == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.e2e
@pytest.mark.parametrize("stop_at", [1, 5, 8])
def test_stop_and_resume_is_bitwise_exact(tmp_path, uninterrupted, stop_at):
    """Stopped at 1, mid-PSR-ramp (5: N_t grows from step 3 to 9) and on a checkpoint step (8),
    then resumed: the same metrics and the same final weights, bit for bit."""
    assert loop.run(config(), tmp_path, stop=StopAt(stop_at)) == {"stopped_at": stop_at}
    assert saved_steps(tmp_path)[-1] == stop_at
    assert metrics(tmp_path)[-1]["step"] == stop_at
    loop.run(config(), str(tmp_path))  # a string names the folder too, as in the README's notebook lines
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.e2e
def test_router_bias_is_saved_resumed_bitwise_and_logged(tmp_path):
    """Auxiliary-loss-free balancing: the biases are in the checkpoint, a run stopped mid-ramp
    resumes to the same biases and weights bit for bit, and routing.jsonl has them at evals.
    Every field metrics.jsonl then holds (the bias's among them) is one operations.md lists."""
    cfg = config("model.router_bias=true", "loss.router_bias_rate=0.01")
    loop.run(cfg, tmp_path / "whole")
    assert loop.run(cfg, tmp_path / "resumed", stop=StopAt(5)) == {"stopped_at": 5}
    loop.run(cfg, tmp_path / "resumed")
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "whole")
    a, b = final_params(tmp_path / "resumed", cfg), final_params(tmp_path / "whole", cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    bias = np.asarray(a.params["groups"]["layers"]["moe"]["router_bias"]).reshape(2, -1)  # (L, pool)
    assert np.abs(bias).max() > 0
    last = read_records(tmp_path / "whole" / "routing.jsonl")[-1]
    assert last["step"] == 12
    np.testing.assert_allclose(last["router_bias"], bias, atol=1e-6)
    section = (ROOT / "docs" / "operations.md").read_text().split("## What a run writes: metrics.jsonl")[1]
    documented = set(re.findall(r"`(\w+)`", section.split("\n## ")[0]))
    logged = {key for record in read_records(tmp_path / "whole" / "metrics.jsonl") for key in record}
    assert "router_bias_absmax" in logged and logged <= documented, logged - documented


@pytest.mark.e2e
def test_mfu_from_the_flops_per_token_and_a_given_peak(tmp_path):
    """Every line's TFLOP/s per device is the model FLOPs per token times its tokens/s (one
    device), and MFU that over train.peak_flops. FLOPs per token by hand for SMALL: 6 x (active
    parameters + the d x V output head) + 12 L H Z S (PaLM's count, metrics.flops_per_token)."""
    from rexmoe_jax import trainer

    cfg = config("train.peak_flops=2e9")
    loop.run(cfg, tmp_path)
    active = trainer.summary(cfg)["params_active"]
    m = cfg.model
    flops = 6 * (active + m.d_model * m.vocab_size) + 12 * m.num_layers * m.num_heads * (m.d_model // m.num_heads) * 16
    lines = [r for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r]
    # Step 1's line (log_every=1) is its compilation: no figures.
    assert lines[0]["step"] == 1 and lines[0]["tokens_per_sec"] is None and lines[0]["mfu"] is None
    for r in lines[1:]:
        assert r["tflops_per_device"] == pytest.approx(flops * r["tokens_per_sec"] / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / 2e9, rel=1e-9)


class _Clock:
    """time.perf_counter for loop._Throughput: the times it is told to give, in order."""

    def __init__(self, *times):
        self.times = list(times)

    def perf_counter(self):
        return self.times.pop(0)


def test_throughput_times_training_alone(monkeypatch):
    """1,000 tokens a step. The clock starts after step 1 (t = 10), a save and an evaluation
    inside take 3 + 4 s of t = 10..30, so steps 2-5 ran in 13 s: 4,000 / 13 tokens/s; a line
    at step 1 itself has none, and the next interval starts afresh (steps 6-7 in 2 s)."""
    cfg = config("data.batch_size=4", "data.seq_len=250")
    throughput = loop._Throughput(cfg, sharding.make_mesh(cfg.mesh))
    state = jax.numpy.zeros(2)
    monkeypatch.setattr(loop, "time", _Clock(10.0, 12.0, 15.0, 20.0, 24.0, 30.0, 32.0))
    assert throughput(1)["tokens_per_sec"] is None  # before the clock started
    throughput.start(1, state)
    assert throughput(1)["tokens_per_sec"] is None  # the first step alone
    for _ in range(2):
        with throughput.paused_for(state):
            pass
    assert throughput(5)["tokens_per_sec"] == pytest.approx(4000 / 13)
    assert throughput(7)["tokens_per_sec"] == pytest.approx(2000 / 2)


@pytest.mark.e2e
def test_a_profiler_window_leaves_a_trace_and_the_same_losses(tmp_path, uninterrupted):
    assert loop.run(config("train.profile_steps=3,4"), tmp_path)["step"] == 12
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert metrics(tmp_path) == metrics(uninterrupted)


@pytest.mark.e2e
def test_weights_and_biases_offline_run_and_resume(tmp_path, monkeypatch):
    """train.tracker=jsonl,wandb with WANDB_MODE=offline: W&B run files with the resolved
    config, every metrics line's numbers at its step, and an expert-load heatmap at each
    evaluation; the resumed sitting continues the same W&B run id."""
    from wandb_reader import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config("train.tracker=jsonl,wandb", "train.run_name=unit", "train.tags=a,b")
    assert loop.run(cfg, tmp_path, stop=StopAt(7)) == {"stopped_at": 7}
    loop.run(cfg, tmp_path)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one per sitting, one run id
    runs = [read_run(f) for f in files]
    assert runs[0][0]["model"]["reuse"] == 2 and runs[0][0]["psr"]["end_step"] == 9
    logged = {}
    for _, history in runs:
        for row in history:
            logged.setdefault(row["_step"], {}).update(row)
    for line in read_records(tmp_path / "metrics.jsonl"):
        row = logged[line["step"]]
        for name in ("loss", "eval_loss", "lr", "lbv_max", "foreign_share"):
            if name in line:  # An eval line's lbv_max is eval_lbv_max there, beside the training one.
                assert row[runlog.tracker_name(line, name)] == pytest.approx(line[name]), (line["step"], name)
        if "layer_grad_norm" in line:
            assert [row[f"layer_grad_norm/{i}"] for i in range(2)] == pytest.approx(line["layer_grad_norm"])
    heatmaps = sorted(step for step, row in logged.items() if row.get("expert_load_lbv/_type") == "image-file")
    assert heatmaps == [6, 12]
    assert len(list((tmp_path / "wandb").glob("offline-run-*/files/media/images/*.png"))) == 2


def test_a_missing_wandb_package_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'train.tracker=wandb needs the wandb package: pip install -e "\.\[wandb\]"'):
        loop.run(config("train.tracker=wandb"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.e2e
def test_crash_between_checkpoints_resumes_from_the_last_one(tmp_path, uninterrupted, capsys):
    """A crash after step 7 (no save) in the middle of writing a line: the run restarts from
    checkpoint 4, drops the torn line with a warning and the logged steps 5-7, and writes them
    again, identically."""
    loop.run(config(), tmp_path, stop=StopAt(7))
    (tmp_path / "checkpoints" / "7").rename(tmp_path / "lost")  # as if the process died before saving
    assert max(r["step"] for r in metrics(tmp_path)) == 7
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 7.1')  # killed mid-write
    loop.run(config(), tmp_path)
    assert "is not a complete JSON record" in capsys.readouterr().err
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.e2e
def test_corrupt_latest_checkpoint_falls_back(tmp_path, uninterrupted, capsys):
    """Checkpoint 6 lost its state/_METADATA: not "an incompatible config" but a damaged
    checkpoint. Loading the run skips it and renames nothing; training sets it aside and
    resumes from 4 (other kinds of damage: test_checkpoint.py)."""
    from rexmoe_jax.inference.api import load

    loop.run(config(), tmp_path, stop=StopAt(6))  # checkpoints 4 and 6
    (tmp_path / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    assert load(tmp_path).step == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "6"]
    loop.run(config(), tmp_path)
    err = capsys.readouterr().err
    assert "checkpoint 6 in" in err and "is unreadable" in err and "restored checkpoint" in err and "Event loop is closed" not in err
    assert (tmp_path / "checkpoints" / "6.corrupt").is_dir()  # set aside, not deleted
    assert_same_run(tmp_path, uninterrupted)


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.e2e
def test_incompatible_config_names_the_fields_and_touches_nothing(tmp_path):
    loop.run(config(), tmp_path, stop=StopAt(4))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="incompatible config") as err:
        loop.run(config("model.reuse=1", "model.num_experts=2", "psr.schedule=none"), tmp_path)
    assert "model.reuse: 2 -> 1" in str(err.value) and "model.num_experts: 4 -> 2" in str(err.value)
    assert "psr.schedule" not in str(err.value) and "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


@pytest.mark.e2e
def test_allowed_changes_resume_with_a_note(tmp_path, capsys):
    """Shortened from 12 steps to 6 after step 4, the warm-up (100 steps, cut to steps - 1) is
    5 steps, not 11: step 5's rate is 3e-4 * 4/5, where the checkpoint's run had 3e-4 * 4/11."""
    loop.run(config(), tmp_path, stop=StopAt(4))
    result = loop.run(config("train.steps=6", "compute.dispatch=dense"), tmp_path)
    out = capsys.readouterr().out
    assert "train.steps: 12 -> 6" in out and result["step"] == 6
    assert ("note: the learning rate for step 5 is 0.00024; the checkpoint's optim and train.steps gave "
            "0.0001091") in out
    assert [r["lr"] for r in metrics(tmp_path) if r["step"] == 5] == [pytest.approx(3e-4 * 4 / 5)]


@pytest.mark.e2e
def test_a_run_from_another_runs_checkpoint_continues_it_exactly(tmp_path, uninterrupted, capsys):
    """--from checkpoint 4 of the 12-step run, same config: the new run's records from step 5 on
    and its final state are the old run's, bit for bit, and the old run is left as it was. The
    same command again resumes the new run's own checkpoint, with the source gone by then."""
    source = tmp_path / "source"
    shutil.copytree(uninterrupted, source)
    before = hashes(source)
    workdir = tmp_path / "branch"
    capsys.readouterr()
    loop.run(config(), workdir, source=source / "checkpoints" / "4")
    assert f"started from checkpoint 4 in {source / 'checkpoints'}" in capsys.readouterr().out
    assert metrics(workdir) == [r for r in metrics(uninterrupted) if r["step"] > 4]
    assert saved_steps(workdir) == [8, 12]
    ours, theirs = final_params(workdir, config()), final_params(uninterrupted, config())
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert hashes(source) == before
    shutil.rmtree(source)
    loop.run(config(), workdir, source=source / "checkpoints" / "4")
    out = capsys.readouterr().out
    assert "has checkpoints of its own: resuming it" in out and "already complete at step 12" in out


@pytest.mark.e2e
def test_a_run_from_a_checkpoint_takes_its_own_schedule(tmp_path, uninterrupted, capsys):
    """From the newest checkpoint of a folder whose checkpoint 12 is removed (so 8) with wsd,
    warm-up 2 and decay_fraction 0.5 of 12 steps: steps 9-12 use the decay from count 6, 3e-4
    down to 3e-5 at count 12, noted beside the 12-step cosine's rate."""
    source = tmp_path / "source"
    shutil.copytree(uninterrupted, source)
    shutil.rmtree(source / "checkpoints" / "12")
    capsys.readouterr()
    wsd = ["optim.schedule=wsd", "optim.warmup_steps=2", "optim.decay_fraction=0.5"]
    loop.run(config(*wsd), tmp_path / "branch", source=source)
    out = capsys.readouterr().out
    assert (f"note: starting from step 8 of {source} with changed settings: "
            "optim.schedule: 'cosine' -> 'wsd'") in out
    # The source's warm-up is min(100, 12 - 1) = 11 steps: count 8 is 3e-4 * 8 / 11.
    assert ("the learning rate for step 9 is 0.00021; the checkpoint's optim and train.steps "
            "gave 0.0002182") in out
    rates = [r["lr"] for r in metrics(tmp_path / "branch") if "lr" in r]
    assert rates == pytest.approx([3e-4 - 2.7e-4 * (count - 6) / 6 for count in (8, 9, 10, 11)])


@pytest.mark.e2e
def test_a_wrong_checkpoint_to_start_from_is_one_line_and_writes_nothing(tmp_path, uninterrupted):
    with pytest.raises(ConfigError, match=r"has no checkpoint 5; give one of its checkpoints, 4, 8 and 12$"):
        loop.run(config(), tmp_path / "a", source=uninterrupted / "checkpoints" / "5")
    with pytest.raises(ConfigError, match=r"incompatible config \(model.reuse: 2 -> 1.*give --from a run of "
                                          r"this model, or leave --from out"):
        loop.run(config("model.reuse=1", "psr.schedule=none"), tmp_path / "b", source=uninterrupted)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.e2e
def test_the_data_stream_continues_at_its_sequence_through_a_new_batch_size(tmp_path, capsys):
    """4 steps of 4 sequences, then 2 of 8 (data.batch_size changed on resume): checkpoint 6
    holds 16 + 16 = 32 sequences read. Started (--from) on a shorter corpus, whose packing
    differs, the new data are read from their start: 2 steps of 4 later, 8."""
    loop.run(config(), tmp_path / "run", stop=StopAt(4))
    loop.run(config("data.batch_size=8", "train.steps=6"), tmp_path / "run")

    def sequences_read(workdir, step):
        checkpointer = Checkpointer(workdir, 3, read_only=True)
        try:
            return checkpointer._meta(step)["data"]
        finally:
            checkpointer.close()

    assert sequences_read(tmp_path / "run", 6) == {"sequences": 32}
    corpus = next(o.split("=", 1)[1] for o in SMALL if o.startswith("data.corpus="))
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("".join(pathlib.Path(corpus).read_text().splitlines(keepends=True)[:150]))
    capsys.readouterr()
    loop.run(config("train.steps=6", f"data.corpus={shorter}", "train.seed=1"), tmp_path / "branch",
             source=tmp_path / "run" / "checkpoints" / "4")
    out = capsys.readouterr().out
    assert "they are read from their start after step 4" in out
    assert "note: train.seed 0 -> 1 draws another held-out set" in out
    assert sequences_read(tmp_path / "branch", 6) == {"sequences": 8}


def test_unwritable_workdir(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="is not writable"):
        loop.run(config(), tmp_path / "file" / "run")


@pytest.mark.e2e
def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path):
    """An absurd learning rate without clipping: the weights blow up within a few steps."""
    bad = ["optim.learning_rate=1e30", "optim.clip_norm=0", "train.checkpoint_every=1", "psr.schedule=none"]
    with pytest.raises(loop.NonFiniteError, match=r"step \d+: non-finite values \((loss|grad_norm|param_norm)") as err:
        loop.run(config(*bad), tmp_path)
    bad_step = int(str(err.value).split()[1].rstrip(":"))
    saved = saved_steps(tmp_path)
    assert saved and max(saved) < bad_step
    assert f"(steps {saved})" in str(err.value)  # the message names what was kept, saves finished
    state = final_params(tmp_path, config(*bad))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


@pytest.mark.e2e
def test_a_nonfinite_step_between_log_lines_is_named(tmp_path):
    """Logging every 5 steps: the first step whose update is not finite is named, not the log
    step where it shows (the same run logging every step finds it)."""
    bad = ["optim.learning_rate=1e30", "optim.clip_norm=0", "psr.schedule=none", "train.checkpoint_every=0"]
    with pytest.raises(loop.NonFiniteError) as every_step:
        loop.run(config(*bad), tmp_path / "every")
    first = int(str(every_step.value).split()[1].rstrip(":"))
    assert first % 5, "the run must blow up between two log lines of the second run"
    logged = -(-first // 5) * 5  # the next multiple of 5
    with pytest.raises(loop.NonFiniteError, match=rf"^step {first}: non-finite values \(at step {logged}: "):
        loop.run(config(*bad, "train.log_every=5"), tmp_path / "fifth")


@pytest.mark.e2e
def test_nonfinite_skip_keeps_training(tmp_path):
    bad = ["optim.learning_rate=1e30", "optim.clip_norm=0", "psr.schedule=none", "train.nonfinite=skip"]
    result = loop.run(config(*bad), tmp_path)
    assert result["step"] == 12
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=reject_constant) for line in lines]  # strict JSON
    assert any(r.get("param_norm", 0) is None or r.get("loss", 0) is None for r in records)
    state = final_params(tmp_path, config(*bad))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def reject_constant(name):
    raise ValueError(f"{name} is not strict JSON")


class FullDiskAfter(StopRequest):
    """From `step` on, files cannot grow past 256 KiB (EFBIG, as a full disk gives ENOSPC): the
    next checkpoint fails in the background. Records the lock file's holder meanwhile."""

    def __init__(self, step, workdir):
        super().__init__()
        self.step, self.workdir, self.holder, self.limits = step, workdir, None, None

    def requested(self, step):
        if step == self.step:
            self.holder = json.loads((self.workdir / "run.lock").read_text())["pid"]
            self.limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, self.limits[1]))
        if step == self.step + 2:
            time.sleep(2)  # the failed write is over long before: the next step must notice it
        return False

    def restore(self):
        if self.limits is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.limits)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


@pytest.mark.e2e
def test_a_failed_background_save_stops_at_the_next_step_and_keeps_the_rest(tmp_path, uninterrupted):
    """Checkpoint 8 cannot be written: one line naming the step and the intact checkpoint,
    raised at the first step after the failure (not at the next save, 12), no temporary folder,
    the lock released; the same command then resumes from 4 to the uninterrupted run."""
    full = FullDiskAfter(7, tmp_path)
    try:
        with pytest.raises(WriteError) as err:
            loop.run(config(), tmp_path, stop=full)
    finally:
        full.restore()
    assert str(err.value) == (f"file too large while saving step 8 in {tmp_path / 'checkpoints'}; "
                              "checkpoint 4 is intact")
    assert full.holder == os.getpid() and not (tmp_path / "run.lock").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert max(r["step"] for r in metrics(tmp_path)) <= 9  # stopped within two steps of the save
    loop.run(config(), tmp_path)
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.e2e
def test_an_evaluation_that_fails_loses_no_step(tmp_path, monkeypatch):
    """The evaluation at step 8 raises: the error reaches the caller, with step 8's checkpoint,
    started before the evaluation, on disk beside step 4's."""
    evaluate, calls = loop.evaluate, []

    def failing_second(session, params):
        calls.append(int(session.state.step))
        if len(calls) == 2:
            raise RuntimeError("evaluation failed")
        return evaluate(session, params)

    monkeypatch.setattr(loop, "evaluate", failing_second)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        loop.run(config("train.eval_every=4"), tmp_path)
    assert calls == [4, 8] and saved_steps(tmp_path) == [4, 8]


@pytest.mark.e2e
def test_an_unwritable_log_loses_no_step(tmp_path, monkeypatch):
    """metrics.jsonl becomes unwritable at step 8, whose evaluation line comes after its
    checkpoint was started: the run stops with checkpoints 4 and 8 on disk."""
    from rexmoe_jax import runlog

    class RefuseLogsFrom(StopAt):
        def requested(self, step):
            if step == self.step:  # after step 8 ran, before its checkpoint and evaluation line
                monkeypatch.setattr(runlog, "open", refuse, raising=False)
            return False

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(WriteError) as err:
        loop.run(config("train.eval_every=4"), tmp_path, stop=RefuseLogsFrom(8))
    assert str(err.value) == (f"permission denied while writing {tmp_path / 'metrics.jsonl'} at step 8; "
                              "checkpoints 4 and 8 are intact")
    assert saved_steps(tmp_path) == [4, 8]


@pytest.mark.e2e
def test_a_stop_during_start_up_ends_before_compiling_with_nothing_new(tmp_path):
    """The stop request comes before the first step: no step, no save, no new file."""
    stop = StopRequest()
    stop.signal_name = "SIGTERM"  # as the handler sets it
    assert loop.run(config(), tmp_path / "fresh", stop=stop) == {"stopped_at": None}
    assert list((tmp_path / "fresh").iterdir()) == []  # the lock is gone too
    loop.run(config(), tmp_path / "resumed", stop=StopAt(4))
    before = snapshot(tmp_path / "resumed")
    assert loop.run(config(), tmp_path / "resumed", stop=stop) == {"stopped_at": None}
    assert snapshot(tmp_path / "resumed") == before


def test_sigterm_during_start_up_exits_within_seconds(tmp_path):
    """train.py gets SIGTERM as soon as it has printed its config, while it is still starting:
    it exits 0 before compiling, without a checkpoint."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path), *SMALL]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().startswith("config ")
    proc.send_signal(signal.SIGTERM)
    start = time.perf_counter()
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "during start-up, before compiling; nothing new to save" in out
    assert time.perf_counter() - start < 60  # seconds on an idle machine; generous under load
    assert not (tmp_path / "checkpoints").exists() or saved_steps(tmp_path) == []
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.e2e
def test_sigterm_after_the_run_ends_leaves_its_exit_status_zero(tmp_path):
    """Once train.py has finished (its result printed), a SIGTERM while it exits is ignored:
    Python's teardown, a second or more with jax loaded, used to give the signal its default
    action back, and the finished run then exited with 143 (-15 here)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path), *SMALL, "train.steps=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    said = []
    for line in proc.stdout:
        said.append(line)
        if "held-out perplexity" in line:
            break
    deadline = time.monotonic() + 60
    while not ignores_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(said)
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(said) + out
    assert "received SIGTERM" not in out


@pytest.mark.e2e
def test_sigterm_saves_and_exits_zero_then_resumes_exactly(tmp_path):
    """train.py in a subprocess, SIGTERM mid-run: exit status 0, a checkpoint of the last step,
    and the run completed afterwards ends with the uninterrupted run's metrics."""
    args = SMALL + ["train.steps=400", "train.checkpoint_every=100", "train.eval_every=200"]
    reference = tmp_path / "reference"
    loop.run(apply_overrides(load_preset(ROOT / "configs" / "tiny.py"), args), reference)

    workdir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_records_safe(workdir / "metrics.jsonl")) < 30:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out and "stopped by SIGTERM" in out
    stopped = saved_steps(workdir)[-1]
    assert 30 <= stopped < 400
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {stopped}" in done.stdout
    assert metrics(workdir) == metrics(reference)


def read_records_safe(path):
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.e2e
def test_short_training_run_logs_and_learns(tmp_path, capsys):
    """The main job on the embedded corpus: metrics.jsonl has the contract's keys, the loss
    falls well below its start, and the run ends with a perplexity and a sample."""
    workdir = tmp_path / "run"
    args = ["--workdir", str(workdir), "model.d_model=64", "model.num_layers=2", "model.expert_ffn=64",
            "data.seq_len=64", "data.batch_size=8", "train.steps=60", "train.log_every=10",
            "train.eval_every=30", "train.eval_batches=2", "psr.start_step=10", "psr.end_step=40",
            "train.sample_tokens=8", "mesh.num_devices=1"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity:" in out and "sample: And God said" in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in eval_records] == [30, 60]
    for key in ("step", "loss", "lr", "psr_pool_size", "lb_loss", "z_loss", "grad_norm", *loop.TIMED):
        assert all(key in r for r in train_records), key
    assert all(r["mfu"] is None for r in train_records)  # a CPU's peak is unknown without train.peak_flops
    for key in ("step", "eval_loss", "eval_ppl", "lbv_max"):
        assert all(key in r for r in eval_records), key
    assert train_records[0]["psr_pool_size"] == 8 and train_records[-1]["psr_pool_size"] == 16
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0
    assert train_records[0]["loss"] < math.log(4096) + 0.5  # starts near uniform
    assert eval_records[-1]["eval_ppl"] == pytest.approx(math.exp(eval_records[-1]["eval_loss"]))
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 64


@pytest.mark.e2e
def test_a_complete_run_run_again_says_so_and_changes_no_checkpoint(tmp_path, uninterrupted, capsys):
    """The same command after the run's 12 of 12 steps: no "training steps 13-12"; one line says
    it is complete, and it evaluates the last checkpoint, which stays as it was."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    checkpoints = hashes(workdir / "checkpoints")
    capsys.readouterr()
    result = loop.run(config(), workdir)
    out = capsys.readouterr().out
    assert "training steps" not in out
    assert "the run is already complete at step 12 (train.steps): evaluating its last checkpoint" in out
    assert result["step"] == 12 and math.isfinite(result["eval_loss"])
    assert hashes(workdir / "checkpoints") == checkpoints


@pytest.mark.e2e
def test_a_run_past_train_steps_is_refused_and_left_as_it_was(tmp_path, uninterrupted, capsys):
    """Resumed with train.steps=8 after 12 steps: no "training steps 13-8", no config.json
    rewritten to 8, no note of resuming with changed settings; one error naming both numbers.
    With train.steps=14 it resumes, noting the change."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    before = hashes(workdir)
    capsys.readouterr()
    with pytest.raises(ConfigError, match=r"checkpoint 12 in .* is past train.steps=8: nothing to train; give "
                                          r"train.steps >= 12 or another --workdir"):
        loop.run(config("train.steps=8"), workdir)
    assert hashes(workdir) == before
    assert "note:" not in capsys.readouterr().out
    loop.run(config("train.steps=14"), workdir)
    assert "note: resuming step 12 with changed settings: train.steps: 12 -> 14" in capsys.readouterr().out


@pytest.mark.e2e
def test_a_run_whose_checkpoints_were_deleted_is_not_restarted_over_its_records(tmp_path, uninterrupted):
    """Its checkpoints folder deleted: the run stops with one line and changes nothing, where it
    used to train from step 0 and rewrite metrics.jsonl; with start_over it trains from step 0."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(workdir / "checkpoints")
    before = hashes(workdir)
    with pytest.raises(ConfigError, match=r"holds records up to step 12 but no checkpoint .*--start-over"):
        loop.run(config(), workdir)
    assert hashes(workdir) == before
    loop.run(config(), workdir, start_over=True)
    assert_same_run(workdir, uninterrupted)


@pytest.mark.e2e
def test_every_checkpoint_unreadable_stops_until_start_over(tmp_path, uninterrupted):
    """Each checkpoint's largest array file truncated: the run stops (set aside, nothing
    trained); with start_over it trains from step 0 and ends as the uninterrupted run did."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    for step in saved_steps(workdir):
        largest = max((p for p in (workdir / "checkpoints" / str(step)).rglob("*") if p.is_file()),
                      key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:10])
    logged = (workdir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="checkpoints 12, 8 and 4 are unreadable .* run with --start-over"):
        loop.run(config(), workdir)
    assert (workdir / "metrics.jsonl").read_bytes() == logged
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12.corrupt", "4.corrupt", "8.corrupt"]
    loop.run(config(), workdir, start_over=True)
    assert_same_run(workdir, uninterrupted)
