"""The study runner, its records and its report, with a fake trainer (no training, no jax).

The fake trainer is a small script that accepts train.py's command line, writes the files a run
writes (config.json, metrics.jsonl, routing.jsonl, an empty folder per checkpoint), resumes
from its newest checkpoint dropping the lines logged after it, stops cleanly on SIGTERM after
a checkpoint, and ends at a held-out loss given by a formula the tests know:
4 - 0.1 r + 0.01 seed^2 r.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import signal
import threading
import time

import numpy as np
import pytest
from files import hashes, one_error_line

from rexmoe_jax.runlog import read_records
from rexmoe_jax.study import __main__ as study_cli
from rexmoe_jax.study import record as study_record
from rexmoe_jax.study import report as study_report
from rexmoe_jax.study import runner as study_runner
from rexmoe_jax.study import spec as study
from rexmoe_jax.study.stats import lowest_upper_end, mean_interval, paired_difference, t_quantile

ROOT = pathlib.Path(__file__).resolve().parent.parent

FAKE_TRAINER = """
import json, math, os, pathlib, signal, sys, time
sys.path.insert(0, {root!r})
from rexmoe_jax.config import apply_overrides, load_preset

args = sys.argv[1:]
workdir = pathlib.Path(args[args.index("--workdir") + 1])
config = apply_overrides(load_preset(args[args.index("--config") + 1]),
                         [a for a in args if "=" in a and not a.startswith("--")])
m, t = config.model, config.train
if "--dry-run" in args:
    print("parameters: ...")
    print(json.dumps({{"params_total": 1000 * m.pool_size, "params_active": 500, "params_router": 10 * m.pool_size,
                      "params_embedding": 100, "pool_size": m.pool_size, "num_groups": m.num_groups,
                      "tokens_per_step": config.tokens_per_step}}))
    sys.exit(0)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
workdir.mkdir(parents=True, exist_ok=True)
(workdir / "config.json").write_text(config.to_json())
metrics, checkpoints = workdir / "metrics.jsonl", workdir / "checkpoints"
start = max((int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()), default=0)
for log in (metrics, workdir / "routing.jsonl"):
    if log.exists():
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= start]
        log.write_text("".join(line + "\\n" for line in kept))
with open(workdir / "calls.jsonl", "a") as f:
    f.write(json.dumps({{"from_step": start, "env": {{k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS")}},
                        "cores": sorted(os.sched_getaffinity(0))}}) + "\\n")
final = 4.0 - 0.1 * m.reuse + 0.01 * t.seed ** 2 * m.reuse
for step in range(start + 1, t.steps + 1):
    time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))
    loss = final + 0.1 * (t.steps - step)
    lines = [{{"step": step, "loss": loss, "psr_pool_size": m.num_experts, "lbv_max": 0.5, "lbv_min": -0.5,
               "underused_share": 0.1, "tokens_per_sec": 1000.0, "lr": 1e-3}}]
    if step % t.eval_every == 0 or step == t.steps:
        lines.append({{"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss), "lbv_max": 0.4,
                       "underused_share": 0.05 * m.reuse, "foreign_share": 0.0 if m.reuse == 1 else 0.3}})
        load = [[1.0 / m.pool_size] * m.pool_size for _ in range(m.num_layers)]
        with open(workdir / "routing.jsonl", "a") as f:
            f.write(json.dumps({{"step": step, "pool_sizes": [m.pool_size] * m.num_layers, "expert_load": load}}) + "\\n")
    with open(metrics, "a") as f:
        f.write("".join(json.dumps(line) + "\\n" for line in lines))
    if stop or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
        (checkpoints / str(step)).mkdir(parents=True, exist_ok=True)
    if stop:
        sys.exit(0)
"""

STUDY = """
name = "unit"
preset = "configs/tiny.py"
baseline = "base"
seeds = [0, 1, 2]
heatmaps = ["base", "reuse"]
limits = "Six steps of a fake trainer say nothing."

[budget]
steps = {steps}
eval_every = 3
log_every = 1
checkpoint_every = 2

[base]
train.sample_tokens = 0

[[arm]]
name = "base"
set = {{ "model.reuse" = 1, "psr.schedule" = "none" }}

[[arm]]
name = "reuse"
seeds = 2
group = "other"
set = {{ model = {{ reuse = 2 }} }}

[[question]]
text = "Does reuse lower the loss?"
arm = "reuse"
against = "base"

[[question]]
text = "Is the early training gap below 0.05?"
arm = "reuse"
against = "base"
metric = "train_loss@1-3"
decide_below = 0.05

[[question]]
text = "Is reuse better by a resolved margin?"
arm = "reuse"
against = "base"
interval_below = -0.2
"""


def _final_loss(reuse: int, seed: int) -> float:
    return 4.0 - 0.1 * reuse + 0.01 * seed ** 2 * reuse


@pytest.fixture
def setup(tmp_path):
    """(study, options) for the two-arm study above, trained by the fake trainer on one core."""

    def make(steps: int = 6) -> tuple[study.Study, study_runner.Options]:
        (tmp_path / "fake_train.py").write_text(FAKE_TRAINER.format(root=str(ROOT)))
        (tmp_path / "unit.toml").write_text(STUDY.format(steps=steps))
        spec = study.load_study(tmp_path / "unit.toml")
        options = study_runner.Options(corpus="", runs=tmp_path / "runs" / "unit", results=tmp_path / "results",
                                       slots=((min(os.sched_getaffinity(0)),),),
                                       train_script=tmp_path / "fake_train.py", poll_seconds=0.02)
        return spec, options

    return make


def _calls(options, arm: str, seed: int) -> list[dict]:
    return read_records(options.runs / arm / f"seed{seed}" / "calls.jsonl")


def test_queue_is_seed_major(setup):
    spec, _ = setup()
    assert [(a.name, s) for a, s in spec.queue()] == [("base", 0), ("reuse", 0), ("base", 1), ("reuse", 1),
                                                      ("base", 2)]
    assert spec.overrides(spec.arm("reuse"), 1) == [
        "train.steps=6", "train.eval_every=3", "train.log_every=1", "train.checkpoint_every=2",
        "train.sample_tokens=0", "model.reuse=2", "train.seed=1"]


def test_skips_recorded_runs_resumes_unfinished_and_pins(setup, capsys):
    spec, options = setup()
    recorded = options.results / "base" / "seed0.json"
    recorded.parent.mkdir(parents=True)
    recorded.write_text(json.dumps({"overrides": spec.overrides(spec.arm("base"), 0), "marker": 1}))
    # reuse seed 0 was interrupted at step 5 of 6, after its checkpoint of step 4: it resumes there.
    partial = options.runs / "reuse" / "seed0"
    (partial / "checkpoints" / "4").mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 6)]
    (partial / "metrics.jsonl").write_text("".join(lines))

    assert study_runner.run(spec, options) == 0
    assert json.loads(recorded.read_text())["marker"] == 1  # untouched
    assert not (options.runs / "base" / "seed0").exists()  # never started
    assert [c["from_step"] for c in _calls(options, "reuse", 0)] == [4]
    assert [c["from_step"] for c in _calls(options, "base", 1)] == [0]
    call = _calls(options, "base", 1)[0]
    assert call["cores"] == list(options.slots[0])
    assert "intra_op_parallelism_threads=1" in call["env"]["XLA_FLAGS"] and call["env"]["OMP_NUM_THREADS"] == "1"
    for arm, seed in (("base", 1), ("base", 2), ("reuse", 0), ("reuse", 1)):
        record = json.loads((options.results / arm / f"seed{seed}.json").read_text())
        reuse = 1 if arm == "base" else 2
        assert record["final"]["eval_loss"] == pytest.approx(_final_loss(reuse, seed))
        assert record["eval"]["step"][-1] == 6 and record["train"]["step"][-1] == 6
        assert record["tokens"]["trained"] == 6 * 16 * 128
        assert record["sizes"]["pool_size"] == 8 * reuse
        assert record["routing"]["foreign_share_by_layer"][-1] == pytest.approx(
            [0.0] * 4 if reuse == 1 else [0.5] * 4)  # uniform loads over a pool of 2 layers' experts
    assert "4 to go" in capsys.readouterr().out
    # A second sitting finds everything recorded and starts nothing.
    assert study_runner.run(spec, options) == 0
    assert len(_calls(options, "base", 1)) == 1


def test_arms_option_runs_only_the_named_arms(setup, capsys):
    """A gate before the rest: --arms base trains base's three seeds and leaves reuse alone;
    the next sitting without it trains the rest."""

    spec, options = setup()
    assert study_runner.run(spec, dataclasses.replace(options, arms=("base",))) == 0
    assert sorted(p.name for p in (options.results / "base").iterdir()) == ["seed0.json", "seed1.json", "seed2.json"]
    assert not (options.results / "reuse").exists()
    assert "3 to go (arms base only)" in capsys.readouterr().out
    assert study_runner.run(spec, options) == 0
    assert len(list((options.results / "reuse").iterdir())) == 2


def test_seeds_option_runs_only_the_named_seeds(setup, capsys):
    """Runs that fit a sitting: --seeds 1 trains seed 1 of every arm that has one; --arms and
    --seeds together pick one run."""
    spec, options = setup()
    assert study_runner.run(spec, dataclasses.replace(options, seeds=(1,))) == 0
    assert [p.name for p in (options.results / "base").iterdir()] == ["seed1.json"]
    assert [p.name for p in (options.results / "reuse").iterdir()] == ["seed1.json"]
    assert "2 to go (seeds 1 only)" in capsys.readouterr().out
    assert study_runner.run(spec, dataclasses.replace(options, arms=("base",), seeds=(0, 2))) == 0
    assert sorted(p.name for p in (options.results / "base").iterdir()) == ["seed0.json", "seed1.json", "seed2.json"]
    assert [p.name for p in (options.results / "reuse").iterdir()] == ["seed1.json"]
    assert "2 to go (arms base; seeds 0, 2 only)" in capsys.readouterr().out


@pytest.mark.parametrize("seeds, message", [("7", "the study has no seed 7; its seeds: 0, 1, 2"),
                                            ("1,x", "--seeds '1,x': give seeds as integers")])
def test_bad_seeds_are_one_line_errors(setup, tmp_path, capsys, seeds, message):
    setup()
    assert study_cli.main(["run", str(tmp_path / "unit.toml"), "--seeds", seeds, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_sigterm_stops_children_cleanly_and_the_next_sitting_resumes(setup, monkeypatch):
    spec, options = setup(steps=40)
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.05")
    metrics = options.runs / "base" / "seed0" / "metrics.jsonl"

    def interrupt():
        deadline = time.time() + 20
        while time.time() < deadline and len(read_records(metrics)) < 3:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        thread = threading.Thread(target=interrupt)
        thread.start()
        assert study_runner.run(spec, options) == 130  # the contract's Ctrl-C: stopped, runs left
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stopped_at = study_record.resume_step(metrics.parent)
    assert 3 <= stopped_at < 40
    assert max(r["step"] for r in read_records(metrics)) == stopped_at  # it checkpointed where it stopped
    assert not (options.results / "base" / "seed0.json").exists()
    assert not (options.runs / "reuse").exists()  # nothing new starts after a signal
    [attempt] = read_records(metrics.parent / study_record.ATTEMPTS_FILE)
    assert attempt["exit"] == 0 and attempt["to_step"] == stopped_at

    monkeypatch.setenv("FAKE_STEP_SECONDS", "0")
    assert study_runner.run(spec, options) == 0
    assert [c["from_step"] for c in _calls(options, "base", 0)] == [0, stopped_at]
    record = json.loads((options.results / "base" / "seed0.json").read_text())
    assert record["time"]["attempts"] == 2


def test_records_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "arm" / "seed0.json"
    study_record.write_atomic(path, {"b": [1, 2], "a": {"x": 1.5}})
    assert json.loads(path.read_text()) == {"a": {"x": 1.5}, "b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(study_record.os, "replace", crash)
    with pytest.raises(OSError):
        study_record.write_atomic(path, {"a": "new"})
    assert json.loads(path.read_text()) == {"a": {"x": 1.5}, "b": [1, 2]}  # the old record survives whole


def test_t_quantile_matches_the_printed_table():
    for df, table in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(df) == pytest.approx(table, abs=1e-4)


def test_interval_and_paired_difference_by_hand():
    values = np.array([1.0, 2.0, 4.0])
    half = 4.3027 * np.std(values, ddof=1) / np.sqrt(3)
    interval = mean_interval(values)
    assert (interval.mean, interval.low, interval.high, interval.n) == pytest.approx(
        (7 / 3, 7 / 3 - half, 7 / 3 + half, 3), abs=1e-4)
    assert mean_interval([5.0]).low is None
    # Seed 5 has no partner and is left out; the differences are -0.1, +0.1, -0.3.
    diff = paired_difference({0: 3.0, 1: 3.5, 2: 2.9, 5: 9.0}, {0: 3.1, 1: 3.4, 2: 3.2})
    half = 4.3027 * 0.2 / math.sqrt(3)
    assert (diff.mean, diff.low, diff.high, diff.n) == pytest.approx((-0.1, -0.1 - half, -0.1 + half, 3), abs=1e-4)


@pytest.mark.e2e
def test_report_from_fake_records(setup, tmp_path):
    spec, options = setup()
    assert study_runner.run(spec, options) == 0
    output = tmp_path / "docs" / "reproduction.md"
    assert study_report.write_report([(spec, options.results)], output) == 0
    text = output.read_text()
    # reuse minus base on seeds 0 and 1: -0.1 and -0.09.
    diffs = np.array([_final_loss(2, s) - _final_loss(1, s) for s in (0, 1)])
    half = 12.7062 * diffs.std(ddof=1) / math.sqrt(2)
    assert f"{diffs.mean():+.3f} nats (95% CI {diffs.mean() - half:+.3f} to {diffs.mean() + half:+.3f}" in text
    assert "**Lower (better)**" in text
    # The fake training loss is the final loss plus 0.1 (steps - step): over steps 1-3 the paired
    # gap is the same -0.095 as at the end, below the rule's 0.05.
    assert ("mean training loss over steps 1-3: -0.095 nats" in text
            and "must be below 0.05; it is -0.095: **passes**" in text)
    assert f"whole interval must lie below -0.2; its upper end is {diffs.mean() + half:+.3f}: **fails**" in text
    assert "5 of 5 planned runs are recorded." in text
    # The gap table: only the end (the preset's t_s = 60 lies past the 6 steps), training loss
    # over steps 1-6 and held-out loss at 6, both -0.095 on average.
    assert "| arm | training at end (6) | held-out at end (6) |" in text
    assert text.count(f"| `reuse` | {diffs.mean():+.3f} ") == 1
    assert "## What this scale cannot say\n\nSix steps of a fake trainer say nothing." in text
    for name in ("eval_loss_core.png", "eval_loss_other.png", "eval_loss_vs_baseline.png", "expert_load.png",
                 "routing.png"):
        assert (tmp_path / "docs" / "reproduction" / name).read_bytes()[:4] == b"\x89PNG"
    # A picture of the user's where the report draws one: refused with one line, left as it was.
    user_picture = tmp_path / "docs" / "reproduction" / "routing.png"
    user_picture.write_bytes(b"\x89PNG\r\n\x1a\n my own picture")
    with pytest.raises(study.StudyError, match="routing.png', in the report's figures folder, was not"):
        study_report.write_report([(spec, options.results)], output)
    assert user_picture.read_bytes() == b"\x89PNG\r\n\x1a\n my own picture"


def test_a_study_with_no_record_yet_reports_its_plan_without_empty_sections(setup, tmp_path):
    """A study file written before its runs (the next stage of a study) is reported as planned:
    status, arms and questions, and no routing table or figures heading with nothing under it."""
    spec, options = setup()
    output = tmp_path / "docs" / "reproduction.md"
    assert study_report.write_report([(spec, options.results)], output) == 0
    text = output.read_text()
    assert "0 of 5 planned runs are recorded." in text and "Not enough runs yet" in text
    assert "## Routing at the end" not in text and "## Figures" not in text


def test_the_gap_table_reads_arms_without_psr_at_t_s_and_t_e(setup):
    """A gate (no PSR on either side) is read at the study's t_s and t_e too. Records by hand:
    6 steps, t_s = 2, t_e = 4; base's training loss is 5 at every step and its held-out loss 4;
    reuse's training loss at step k is 5 + 0.1 k and its held-out loss 4 - 0.1 s on seed s. The
    training window of a 6-step study is one step (a tenth of the steps, at least one)."""
    spec, _ = setup()

    def record(train: list[float], held_out: float) -> dict:
        config = {"psr": {"schedule": "none", "start_step": 2, "end_step": 4}, "train": {"steps": 6}}
        return {"config": config,
                "train": {"step": list(range(1, 7)), "loss": train},
                "eval": {"step": [2, 4, 6], "eval_loss": [held_out] * 3}}

    found = {"base": {s: record([5.0] * 6, 4.0) for s in (0, 1)},
             "reuse": {s: record([5.0 + 0.1 * k for k in range(1, 7)], 4.0 - 0.1 * s) for s in (0, 1)}}
    text = "\n".join(study_report._gaps(spec, found))
    assert ("| arm | training at t_s (2) | training at t_e (4) | training at end (6) | held-out at t_s (2) | "
            "held-out at t_e (4) | held-out at end (6) |") in text
    # Training: +0.2 at step 2, +0.4 at 4, +0.6 at 6, on both seeds (no spread). Held-out: -0.05
    # at every point (+0.00 and -0.10), interval 12.7062 * 0.0707 / sqrt(2).
    half = 12.7062 * 0.1 / math.sqrt(2) / math.sqrt(2)
    held_out = f"-0.050 ({-0.05 - half:+.3f} to {-0.05 + half:+.3f}, n = 2)"
    training = ["+0.200 (+0.200 to +0.200, n = 2)", "+0.400 (+0.400 to +0.400, n = 2)",
                "+0.600 (+0.600 to +0.600, n = 2)"]
    assert text.splitlines()[-1] == f"| `reuse` | {' | '.join(training + [held_out] * 3)} |"


def test_a_decision_rule_waits_for_its_seeds_unless_none_can_change_it(setup):
    """With 2 of 3 planned seeds a rule says where it stands so far, unless no third value can
    change it; with all 3 it decides. The rule: the interval of reuse minus base below -0.2.
    -0.5 and -0.6: upper end -0.55 + 12.7062 * 0.0707 / sqrt(2) = +0.085, and a third value can
    still bring it below -0.2 (a grid over it finds -0.429 at best). -0.1 and -0.3: upper end
    +1.071, and no third value brings it below +0.042 (the grid's lowest), so it fails with 2
    seeds. With -0.1, -0.3, -0.2: -0.2 + 4.3027 * 0.1 / sqrt(3) = +0.048, fails."""
    spec, _ = setup()
    spec = dataclasses.replace(spec, arms=tuple(dataclasses.replace(a, seeds=(0, 1, 2)) for a in spec.arms))
    question = next(q for q in spec.questions if q.interval_below is not None)  # below -0.2
    assert question.interval_below == -0.2
    base = {s: {"final": {"eval_loss": 4.0}} for s in (0, 1, 2)}

    def lowest_by_grid(known):  # the third value on a grid of step 1e-5, t(2) = 4.302653
        x = np.linspace(-5, 5, 1_000_001)
        every = np.stack([np.full_like(x, known[0]), np.full_like(x, known[1]), x])
        return (every.mean(0) + 4.302653 * every.std(0, ddof=1) / np.sqrt(3)).min()

    reuse = {0: {"final": {"eval_loss": 3.5}}, 1: {"final": {"eval_loss": 3.4}}}
    text = study_report.verdict(spec, {"base": base, "reuse": reuse}, question)
    assert "2 paired seeds of 3 planned" in text and lowest_by_grid([-0.5, -0.6]) < -0.2
    assert "its upper end is +0.085: **fails so far**, undecided until all 3 planned seeds are in." in text
    reuse = {0: {"final": {"eval_loss": 3.9}}, 1: {"final": {"eval_loss": 3.7}}}
    text = study_report.verdict(spec, {"base": base, "reuse": reuse}, question)
    lowest = lowest_by_grid([-0.1, -0.3])
    assert f"{lowest:+.3f}" == "+0.042"
    assert text.endswith("its upper end is +1.071: **fails** with 2 of 3 planned seeds: whatever the other "
                         "seed gives, the upper end cannot come below +0.042.")
    reuse[2] = {"final": {"eval_loss": 3.8}}
    text = study_report.verdict(spec, {"base": base, "reuse": reuse}, question)
    assert text.endswith("its upper end is +0.048: **fails**.") and "planned" not in text


def test_the_lowest_upper_end_against_a_grid():
    """lowest_upper_end against a brute-force grid over the missing values (t(3) =
    3.182446 for 4 seeds): one missing of 4, and two missing of 4 on a 2-D grid. With 1 known of
    5 (t(4) = 2.776445), four equal missing values take the end as low as they go: None."""
    t3 = 3.182446
    known = np.array([0.02124, -0.00673, 0.02551])
    x = np.linspace(-1, 1, 400_001)
    every = np.stack([*(np.full_like(x, k) for k in known), x])
    grid = (every.mean(0) + t3 * every.std(0, ddof=1) / 2).min()
    assert lowest_upper_end(known, 1) == pytest.approx(grid, abs=1e-6)
    a, b = np.meshgrid(np.linspace(-1, 1, 2001), np.linspace(-1, 1, 2001))
    every = np.stack([np.full_like(a, known[0]), np.full_like(a, known[1]), a, b])
    grid = (every.mean(0) + t3 * every.std(0, ddof=1) / 2).min()
    assert lowest_upper_end(known[:2], 2) == pytest.approx(grid, abs=1e-5)
    ends = [np.mean([0.1] + [x] * 4) + 2.776445 * np.std([0.1] + [x] * 4, ddof=1) / np.sqrt(5)
            for x in (-1, -10, -100)]
    assert ends[0] > ends[1] > ends[2] < -10
    assert lowest_upper_end([0.1], 4) is None


@pytest.mark.e2e
def test_one_report_of_several_studies(setup, tmp_path, monkeypatch):
    """Two studies make one document: a section each, headings one level down, figures in a
    folder per study, and the one command that regenerates it."""
    spec, options = setup()
    assert study_runner.run(spec, options) == 0
    other = tmp_path / "other.toml"
    other.write_text(spec.path.read_text().replace('name = "unit"', 'name = "other"'))
    second = study.load_study(other)
    (tmp_path / "results_other").symlink_to(options.results)
    output = tmp_path / "docs" / "reproduction.md"
    study_report.write_report([(spec, options.results), (second, tmp_path / "results_other")], output)
    text = output.read_text()
    assert text.startswith("# Reproduction studies: unit, other")
    assert text.count("\n## Reproduction study: ") == 2 and "\n### Gap to the baseline over training" in text
    assert "report unit.toml other.toml`" in text
    for name in ("unit", "other"):
        assert (tmp_path / "docs" / "reproduction" / name / "expert_load.png").is_file()
        assert f"](reproduction/{name}/expert_load.png)" in text


def test_report_flags_missing_runs_and_arms(setup, tmp_path, monkeypatch):
    spec, options = setup()
    assert study_runner.run(spec, options) == 0
    for seed in (0, 1):  # the reuse arm has not run yet; base seed 2 is missing too
        (options.results / "reuse" / f"seed{seed}.json").unlink()
    (options.results / "base" / "seed2.json").unlink()
    monkeypatch.setattr(study_report.study_figures, "draw_all", lambda *_: [])  # drawn in the test above
    output = tmp_path / "reproduction.md"
    study_report.write_report([(spec, options.results)], output)
    text = output.read_text()
    assert "2 of 5 planned runs are recorded." in text
    assert "Missing: `base` seed 2; `reuse` seeds 0, 1." in text
    assert "Arms with no run yet: `reuse`." in text
    assert "Not enough runs yet: 0 paired seed(s) of 2 planned" in text


def test_a_record_made_with_other_settings_stops_the_runner(setup):
    spec, options = setup()
    stale = options.results / "base" / "seed0.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"overrides": ["model.reuse=1", "train.seed=0"]}))
    with pytest.raises(study.StudyError, match="was made with other settings"):
        study_runner.run(spec, options)


@pytest.mark.parametrize("edit, message", [
    (("name = \"unit\"", "name = \"unit\"\ncolour = 1"), "top level: unknown key 'colour'"),
    (("reuse = 2", "reuse = 2, bogus = 1"), "arm 'reuse': unknown config key 'model.bogus'"),
    (("checkpoint_every = 2", "checkpoint_every = 0"), "checkpoint_every must be > 0"),
    (("seeds = 2", "seeds = 4"), "arm 'reuse': seeds must be an integer from 1 to 3"),
    (("against = \"base\"", "against = \"nobody\""), "no arm named 'nobody'"),
    (("name = \"reuse\"", "name = \"base\""), "arm 'base' is defined twice"),
    (("steps = 6", "steps = 6\nsteps = 7"), "not valid TOML"),
    (("train_loss@1-3", "train_loss@3-1"), "metric 'train_loss@3-1' is not one of"),
    # Steps a run never logs or evaluates (every 3 steps and the last, 6; logged every step):
    (("train_loss@1-3", "eval_loss@4"), "number 2: eval_loss@4 asks for a step that is never evaluated"),
    (("train_loss@1-3", "eval_loss@9"), "number 2: eval_loss@9 asks for a step that is never evaluated"),
    (("train_loss@1-3", "train_loss@7-9"), "number 2: train_loss@7-9 holds no logged step"),
    (("train.sample_tokens = 0", "train.sample_tokenz = 0"), "[budget] or [base]: unknown config key"),
    (("decide_below = 0.05", "decide_below = \"low\""), "decide_below must be a number"),
    (('heatmaps = ["base", "reuse"]', "heatmaps = 3"), "heatmaps must be a list of arm names"),
    (('heatmaps = ["base", "reuse"]', 'heatmaps = "base"'), "heatmaps must be a list of arm names"),
    (("limits = ", "# caf\xe9\nlimits = "), "is not UTF-8 text"),
])
def test_bad_study_files_are_one_line_errors(tmp_path, capsys, edit, message):
    path = tmp_path / "bad.toml"
    text = STUDY.format(steps=6)
    assert edit[0] in text
    path.write_bytes(text.replace(*edit, 1).encode("latin-1"))  # latin-1: the one case of a non-UTF-8 file
    with pytest.raises(study.StudyError, match=re.escape(message)):
        study.load_study(path)
    assert study_cli.main(["report", str(path), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: study file {path}: ") and "\n" not in err


def test_an_empty_text_corpus_is_refused_before_any_training_starts(setup, tmp_path, capsys):
    spec, _ = setup()
    (tmp_path / "empty.txt").write_text("")
    assert study_cli.main(["run", str(tmp_path / "unit.toml"), "--corpus", str(tmp_path / "empty.txt"),
                           "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 2
    assert "empty.txt': its 1 file(s) are empty" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_the_runner_needs_the_corpus_the_study_names(tmp_path, capsys):
    path = tmp_path / "corpus.toml"
    path.write_text(STUDY.format(steps=6).replace("name = \"unit\"", "name = \"unit\"\ncorpus = \"build it\""))
    assert study_cli.main(["run", str(path), "--dry-run"]) == 2
    assert "pass --corpus DIR" in capsys.readouterr().err


def test_the_runner_refuses_a_folder_that_is_not_a_prepared_corpus(tmp_path, capsys):
    """A corpus build's top folder (documents.jsonl, tokenizer.json, tokens/) is not what a study
    trains on: train.py would read its raw files with another tokenizer."""
    path = tmp_path / "corpus.toml"
    path.write_text(STUDY.format(steps=6).replace("name = \"unit\"", "name = \"unit\"\ncorpus = \"build it\""))
    build = tmp_path / "build"
    (build / "tokens").mkdir(parents=True)
    (build / "documents.jsonl").write_text('{"text": "a"}\n')
    assert study_cli.main(["run", str(path), "--corpus", str(build), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a prepared corpus (it has no meta.json)" in err and "build it" in err and "\n" not in err


def test_a_record_on_a_prepared_corpus_stops_a_runner_without_one(setup):
    """Records name the corpus by its tokens' hash; a sitting on a corpus without one (here the
    embedded text) would mix other data into the study."""
    spec, options = setup()
    arm = next(a for a in spec.arms if a.name == "base")
    record = options.results / "base" / "seed0.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"overrides": spec.overrides(arm, 0),
                                  "corpus": {"name": "debian8k/tokens", "tokens_sha256": "c52a72c8d760" + "0" * 52}}))
    with pytest.raises(study.StudyError, match=r"was trained on another corpus \('debian8k/tokens' \(sha256 "
                                               r"c52a72c8d760\.\.\.\); --corpus gives 'embedded KJV' "
                                               r"\(sha256"):
        study_runner.run(spec, options)
    assert not (options.runs / "base").exists()  # Nothing trained.


def test_a_record_on_one_text_corpus_stops_a_runner_on_another(setup, tmp_path):
    """Text corpora are named by a hash of their files' names and bytes (computed here with
    hashlib): records on a.txt stop a sitting on b.txt; a record from before text corpora were
    hashed (a name only) is checked by its name."""
    spec, options = setup()
    first, second = tmp_path / "texts" / "a.txt", tmp_path / "texts" / "b.txt"
    first.parent.mkdir()
    first.write_text("In the beginning.\n")
    second.write_text("And the earth was without form.\n")
    expected = hashlib.sha256(b"a.txt\0" + first.read_bytes()).hexdigest()
    assert study_record.corpus_identity(str(first)) == {"name": "texts/a.txt", "files_sha256": expected}
    arm = next(a for a in spec.arms if a.name == "base")
    record = options.results / "base" / "seed0.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"overrides": spec.overrides(arm, 0),
                                  "corpus": {"name": "texts/a.txt", "files_sha256": expected}}))
    on_second = dataclasses.replace(options, corpus=str(second))
    with pytest.raises(study.StudyError, match=rf"another corpus \('texts/a.txt' \(sha256 "
                                               rf"{expected[:12]}\.\.\.\); --corpus gives 'texts/b.txt'"):
        study_runner.run(spec, on_second)
    assert not (options.runs / "base").exists()
    assert study_record.same_corpus({"name": "texts/a.txt"}, study_record.corpus_identity(str(first)))
    assert not study_record.same_corpus({"name": "texts/a.txt"}, study_record.corpus_identity(str(second)))


def test_the_shipped_study_files_are_valid():
    paths = sorted((ROOT / "studies").glob("*.toml"))
    assert len(paths) >= 2
    for path in paths:
        spec = study.load_study(path)
        assert spec.steps >= 2500 and "core" in {a.group for a in spec.arms}


def test_held_out_coverage_counts_documents_per_source(tmp_path):
    """Documents of 50 tokens from three sources; a window of 17 tokens at a stride of 16 spans
    one or two documents. The coverage counts, by source, the held-out documents that the rows
    evaluations read touch, counted here position by position."""
    lengths = np.full(60, 50)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    np.save(tmp_path / "offsets.npy", offsets)
    names = ["man", "perl", "python"]
    (tmp_path / "documents.jsonl").write_text("".join(json.dumps({"text": "x", "source": names[i % 3]}) + "\n"
                                                      for i in range(60)))
    (tmp_path / "meta.json").write_text(json.dumps({"source": str(tmp_path / "documents.jsonl")}))
    config = {"data": {"eval_fraction": 0.25, "seq_len": 16, "batch_size": 2}, "train": {"eval_batches": 3}}
    sources = study_record.document_sources(str(tmp_path))
    coverage = study_record.held_out_coverage(str(tmp_path), config, 4, sources)

    from rexmoe_jax.data import eval_rows, split_documents

    _, held = split_documents(60, 0.25, 4)
    doc_at = np.repeat(held, 50)
    rows = eval_rows((len(doc_at) - 1) // 16, 6, 4)
    touched = sorted({int(d) for i in rows for d in doc_at[i * 16:i * 16 + 17]})
    counts = {name: sum(names[d % 3] == name for d in touched) for name in names}
    assert coverage == {"documents": len(touched),
                        "documents_by_source": {k: v for k, v in counts.items() if v}}
    assert study_record.held_out_coverage("", config, 4, sources) is None


def test_cores_past_the_machine_are_refused_before_anything_starts(setup, tmp_path, capsys):
    """--cores 50 on a machine without core 50: one line, exit 2, no training started, nothing written."""
    spec, _ = setup()
    usable = sorted(os.sched_getaffinity(0))
    missing = max(usable) + 50
    before = hashes(tmp_path)
    assert study_cli.main(["run", str(tmp_path / "unit.toml"), "--cores", str(missing), "--runs", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "results")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"core {missing} is not one this machine lets it use ({','.join(map(str, usable))})" in line
    assert hashes(tmp_path) == before  # no run folder, no train.log, no record
    assert study_runner.parse_cores("0-2", usable=(0, 1, 2, 3)) == (0, 1, 2)
    with pytest.raises(study.StudyError, match="core 3 is not"):
        study_runner.parse_cores("2-3", usable=(0, 1, 2))
    with pytest.raises(study.StudyError, match="--cores '1-0': expected core ids like"):
        study_runner.parse_cores("1-0", usable=(0, 1, 2))


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_failing_runner_leaves_no_training_behind(setup, monkeypatch):
    """Pinning fails after the child started (cores taken away since the check): the child is
    stopped and the runner's error is a StudyError; a failure later in the loop (writing a
    record) stops every running training too."""
    spec, options = setup(steps=400)
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.05")
    started = []
    popen = study_runner.subprocess.Popen

    def recording(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    def cannot_pin(pid, cores):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(study_runner.subprocess, "Popen", recording)
    monkeypatch.setattr(study_runner, "_pin", cannot_pin)
    with pytest.raises(study.StudyError, match="cannot pin base seed 0 to core"):
        study_runner.run(spec, options)
    assert len(started) == 1 and not _alive(started[0].pid)

    monkeypatch.setattr(study_runner, "_pin", lambda pid, cores: None)

    def broken_progress(jobs, steps):
        raise RuntimeError("the runner itself fails")

    monkeypatch.setattr(study_runner, "_progress", broken_progress)
    options = dataclasses.replace(options, progress_seconds=0.0)
    with pytest.raises(RuntimeError, match="the runner itself fails"):
        study_runner.run(spec, options)
    assert len(started) == 2 and not _alive(started[1].pid)


def test_the_report_overwrites_only_a_report(setup, tmp_path, capsys):
    spec, options = setup()
    options.results.mkdir()
    notes = tmp_path / "notes.md"
    notes.write_text("my own notes\n")
    before = hashes(tmp_path)
    assert study_cli.main(["report", str(tmp_path / "unit.toml"), "--results", str(options.results),
                       "--output", str(notes)]) == 2
    assert "exists and was not written by this command" in one_error_line(capsys.readouterr().err)
    assert hashes(tmp_path) == before
    report = tmp_path / "report.md"
    for _ in range(2):  # a report it wrote is replaced
        assert study_cli.main(["report", str(tmp_path / "unit.toml"), "--results", str(options.results),
                           "--output", str(report)]) == 0
    assert report.read_text().startswith("# Reproduction study")


def test_the_held_out_gap_reads_the_last_evaluation_at_or_before_each_point(setup):
    """Evaluations at steps 3 and 6 only, t_s = 2 and t_e = 4: nothing is evaluated by step 2
    ("-"), step 3 stands for t_e (the header says so), 6 for the end. Held-out by hand: base 4.0
    then 3.0; reuse 4.2 then 3.1 on both seeds."""
    spec, _ = setup()

    def record(held_out: list[float]) -> dict:
        config = {"psr": {"schedule": "none", "start_step": 2, "end_step": 4}, "train": {"steps": 6}}
        return {"config": config, "train": {"step": list(range(1, 7)), "loss": [5.0] * 6},
                "eval": {"step": [3, 6], "eval_loss": held_out}}

    found = {"base": {s: record([4.0, 3.0]) for s in (0, 1)},
             "reuse": {s: record([4.2, 3.1]) for s in (0, 1)}}
    lines = study_report._gaps(spec, found)
    assert "| held-out at t_s | held-out at t_e (3) | held-out at end (6) |" in lines[4]
    assert lines[-2].endswith("| - | +0.200 (+0.200 to +0.200, n = 2) | +0.100 (+0.100 to +0.100, n = 2) |")


def test_a_report_is_replaced_only_by_one_of_at_least_its_studies(setup, tmp_path, capsys, monkeypatch):
    """docs/reproduction.md under a folder with spaces, reporting `unit`: another study alone is
    refused with one line naming what the report holds, and nothing changes; `unit` and the
    other together replace it (a section is added), and then `unit` alone is refused (it would
    drop one). The regenerate command quotes its paths and names --results; the report is the
    same report whether --output is spelled relative or absolute."""
    spec, options = setup()
    assert study_runner.run(spec, options) == 0
    project = tmp_path / "my project"
    (project / "studies").mkdir(parents=True)
    unit = project / "studies" / "unit.toml"
    unit.write_text((tmp_path / "unit.toml").read_text())
    other = project / "studies" / "other study.toml"
    other.write_text((tmp_path / "unit.toml").read_text().replace('"unit"', '"other"'))
    output = project / "docs" / "reproduction.md"
    records = ["--results", str(options.results)]
    assert study_cli.main(["report", str(unit), *records, "--output", str(output)]) == 0
    capsys.readouterr()
    results = os.path.relpath(options.results, project)
    assert output.read_text().splitlines()[2] == (
        f"Written by `python -m rexmoe_jax.study report studies/unit.toml --results {results}`; "
        "regenerate it rather than edit it.")
    monkeypatch.chdir(project / "docs")  # the same file, spelled relative: still unit's report
    assert study_cli.main(["report", str(unit), *records, "--output", "reproduction.md"]) == 0
    before = hashes(tmp_path)
    assert study_cli.main(["report", str(other), "--output", str(output)]) == 2
    assert one_error_line(capsys.readouterr().err).endswith(
        "is the report of studies/unit.toml; a report there must name each of them (this one leaves out "
        "studies/unit.toml), or give --output another file")
    assert hashes(tmp_path) == before
    assert study_cli.main(["report", str(unit), str(other), "--output", str(output)]) == 0
    assert "report studies/unit.toml 'studies/other study.toml'`" in output.read_text()
    assert study_cli.main(["report", str(unit), "--output", str(output)]) == 2
    assert "(this one leaves out studies/other study.toml)" in one_error_line(capsys.readouterr().err)
    before = hashes(tmp_path)
    typo = ["--results", str(tmp_path / "typo")]
    assert study_cli.main(["report", str(unit), *typo, "--output", str(output)]) == 2
    assert "--results '" in one_error_line(capsys.readouterr().err)
    assert hashes(tmp_path) == before


def test_base_settings_valid_only_with_each_arms_are_accepted(tmp_path):
    """[base] model.num_layers = 1 is invalid with the preset's reuse = 2 but every arm sets
    reuse = 1: the study loads, as each arm's whole config is valid."""
    text = STUDY.format(steps=6).replace("train.sample_tokens = 0",
                                         "train.sample_tokens = 0\nmodel.num_layers = 1")
    text = text.replace("set = { model = { reuse = 2 } }", 'set = { "model.reuse" = 1 }')
    (tmp_path / "one_layer.toml").write_text(text)
    loaded = study.load_study(tmp_path / "one_layer.toml")
    assert "model.num_layers=1" in loaded.base


def test_a_run_resumes_from_its_newest_checkpoint_not_its_last_log_line(tmp_path):
    """What the runner says and records as the resume step: the newest checkpoint folder train.py
    would restore (a set-aside or half-written one is not), whatever metrics.jsonl holds."""
    assert study_record.resume_step(tmp_path) == 0
    for name in ("2", "4", "6.corrupt", "8.orbax-checkpoint-tmp-12"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    assert study_record.resume_step(tmp_path) == 4
