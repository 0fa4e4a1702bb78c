"""Held-out evaluation (shared with training), multiple-choice scoring, routing analysis, and the
evaluate / generate commands."""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from files import hashes, one_error_line

from rexmoe_jax import loop, plot
from rexmoe_jax.config import Config, ConfigError, apply_overrides
from rexmoe_jax.data import EMBEDDED_TOKENIZER
from rexmoe_jax.inference import evaluate, evaluation, generate, scoring, tasks
from rexmoe_jax.model.decoder import Decoder
from rexmoe_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = apply_overrides(Config(), ["model.vocab_size=4096", "model.d_model=32", "model.num_layers=2",
                                 "model.num_heads=2", "model.num_kv_heads=1", "model.expert_ffn=16",
                                 "model.num_experts=4", "model.top_k=2", "model.reuse=2", "data.seq_len=16"])


def params_for(cfg=CFG, seed=0):
    return nn.meta.unbox(jax.jit(Decoder(cfg.model).init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])


def test_uniform_model_perplexity_is_the_vocabulary_size():
    params = params_for()
    params = dict(params, lm_head=jnp.zeros_like(params["lm_head"]))  # every logit 0: uniform
    batch = np.random.default_rng(0).integers(0, 4096, (2, 17)).astype(np.int32)
    result, _ = evaluation.held_out(evaluation.eval_step_for(CFG), params, [batch], CFG.model)
    assert result["eval_ppl"] == pytest.approx(4096, rel=1e-4)


def test_held_out_in_micro_batches_is_the_whole_batch_at_once():
    """Two batches of 6 rows evaluated 4 rows at a time (pieces of 4 and 2): no call gets more
    than 4 rows, and the loss, perplexity and loads are those of the whole batches at once."""
    params, step = params_for(), evaluation.eval_step_for(CFG)
    shapes = []

    def recording(params, rows):
        shapes.append(rows.shape)
        return step(params, rows)

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 4096, (6, 17)).astype(np.int32) for _ in range(2)]
    whole, whole_load = evaluation.held_out(step, params, batches, CFG.model)
    pieces, pieces_load = evaluation.held_out(recording, params, batches, CFG.model, rows_per_call=4)
    assert shapes == [(4, 17), (2, 17)] * 2
    assert pieces == pytest.approx(whole, rel=1e-6)
    np.testing.assert_allclose(pieces_load, whole_load, rtol=1e-6)


def planted_model(token: int):
    """Every position's hidden state is the same vector v (identical embeddings, attention and
    experts silenced), so every position predicts logits l = rms_norm(v) @ W, with W planted
    to favour `token`. Returns the params and l, computed here by hand."""
    params = params_for()
    rng = np.random.default_rng(1)
    v = rng.standard_normal(32).astype(np.float32)
    w = rng.standard_normal((32, 4096)).astype(np.float32) * 0.1
    normed = v / np.sqrt(np.mean(v * v) + CFG.model.norm_eps)
    w[:, token] += 3.0 * normed / np.dot(normed, normed)  # adds 3 to the planted logit
    layers = dict(params["groups"]["layers"])
    layers["attention"] = dict(layers["attention"], out=jnp.zeros_like(layers["attention"]["out"]))
    groups = dict(params["groups"], layers=layers, experts_down=jnp.zeros_like(params["groups"]["experts_down"]))
    params = dict(params, groups=groups, token_embed=jnp.tile(v, (4096, 1)), lm_head=jnp.asarray(w))
    return params, normed @ w


def test_scorer_matches_hand_computed_log_likelihood_and_picks_the_planted_answer():
    tok = load_tokenizer(EMBEDDED_TOKENIZER)
    planted = tok.encode(" the")[0]
    params, logits = planted_model(planted)
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    context, continuation = tok.encode("In the beginning"), tok.encode(" God created the heaven")
    got = scoring.score(CFG, params, [(context, continuation)]).logprob[0]
    assert got == pytest.approx(float(np.sum(log_probs[continuation])), rel=1e-4)

    question = {"context": "And God said", "choices": [" and there was light", " the the the", " unto Moses"],
                "label": 1}
    assert tok.encode(" the the the") == [planted] * 3
    result = tasks.score_task(CFG, params, tok, [question, dict(question, label=0)])
    # Right on the planted one, wrong on the other.
    got = {k: result[k] for k in ("n", "acc", "acc_norm", "acc_bytes")}
    assert got == {"n": 2, "acc": 0.5, "acc_norm": 0.5, "acc_bytes": 0.5}


@pytest.mark.parametrize("line,message", [
    ('{"context": "a", "choices": ["b"], "label": 0}', "'choices' must be a list of 2 or more strings"),
    ('{"context": "a", "choices": ["b", ""], "label": 0}', "'choices'[1] must be a non-empty string, got ''"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "'label' must be the index of the right choice, 0 to 1, got 2"),
    ('{"context": "a", "choices": ["b", "c"], "label": true}', "'label' must be the index of the right choice, 0 to 1, got True"),
    ('{"context": "a", "choices": ["b", "c"], "label": 0, "delimiter": 1}', "'delimiter' must be a string, got 1"),
    ('{"choices": ["b", "c"], "label": 0}', "'context' must be a string and is missing"),
    ('[1, 2]', "expected a JSON object, got list"),
])
def test_task_file_errors_name_the_field(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "x", "choices": ["y", "z"], "label": 1}\n' + line + "\n")
    with pytest.raises(ConfigError) as err:
        tasks.read_task(path)
    assert str(err.value) == f"{path}:2: {message}"


@pytest.mark.e2e
def test_activation_ratios_sum_to_k_and_foreign_share():
    """Against the NumPy reference's choices: layer l's ratio of pool id p is the count of its
    picks of p over the 64 tokens; its foreign share, the share of its picks outside its own
    experts (one group of 2 layers, pool 8: layer 0 owns ids 0-3, layer 1 ids 4-7)."""
    params = params_for()
    batches = [np.random.default_rng(2).integers(0, 4096, (4, 17)).astype(np.int32)]
    routing = evaluation.routing_of(CFG, params, batches)
    ratios = np.asarray(routing["activation_ratio"])
    np.testing.assert_allclose(ratios.sum(axis=1), CFG.model.top_k, rtol=1e-6)
    assert routing["tokens"] == 4 * 16
    host = jax.tree.map(np.asarray, params)
    _, chosen_LxBxSxK = numpy_reference.forward(host, CFG.model, batches[0][:, :-1])
    picks = chosen_LxBxSxK.reshape(2, -1)
    counts = np.stack([np.bincount(layer, minlength=8) for layer in picks])
    np.testing.assert_allclose(ratios, counts / 64, atol=1e-6)
    foreign = [np.mean(picks[0] >= 4), np.mean(picks[1] < 4)]
    np.testing.assert_allclose(routing["foreign_share"], foreign, atol=1e-6)
    assert 0 < min(foreign)  # both layers do pick experts of the other
    # At r = 1 no expert belongs to another layer.
    cfg1 = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, reuse=1))
    assert evaluation.routing_of(cfg1, params_for(cfg1), batches)["foreign_share"] == [0.0, 0.0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A few steps of training, with checkpoints at steps 3 and 6, and three more eval sets (one
    file twice, under two names)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    sets = ",".join(f"{name}={ROOT / 'examples/input_sets' / file}" for name, file in (
        ("psalms", "psalms.txt"), ("again", "psalms.txt"), ("code", "code.txt")))
    cfg = apply_overrides(CFG, ["data.batch_size=4", "train.steps=6", "train.eval_every=6", "train.eval_batches=1",
                                "train.sample_tokens=0", "mesh.num_devices=1", "train.log_every=2",
                                "train.checkpoint_every=3", f"data.eval_sets={sets}"])
    loop.run(cfg, workdir)
    return workdir


@pytest.mark.e2e
def test_commands_on_a_trained_run(trained_run, tmp_path, capsys):
    """The README's evaluate, generate and plot commands."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    assert evaluate.main(["--workdir", str(workdir), "--tasks", "examples/tasks/kjv_cloze.jsonl",
                          "--batches", "1",
                          "--input-set", f"psalms={ROOT / 'examples/input_sets/psalms.txt'}",
                          "--input-set", f"code={ROOT / 'examples/input_sets/code.txt'}"]) == 0
    report = json.loads((workdir / "eval.json").read_text())
    assert report["step"] == 6 and report["tasks"]["kjv_cloze"]["n"] == 20
    # One evaluation function: the command's numbers are training's last eval line's.
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in logged if "eval_loss" in r][-1]
    compared = ("eval_loss", "lbv_max", "underused_share", "foreign_share", "eval_loss/psalms",
                "eval_ppl/code")
    for name in compared:
        assert report[name] == pytest.approx(last_eval[name], rel=1e-5, abs=1e-6), name
    # data.eval_sets: the same file under two names gives one loss, another file another.
    assert last_eval["eval_loss/psalms"] == last_eval["eval_loss/again"] != last_eval["eval_loss/code"]
    assert last_eval["eval_ppl/code"] == pytest.approx(math.exp(last_eval["eval_loss/code"]))
    assert set(report["routing"]) == {"held-out", "psalms", "code"}
    assert generate.main(["--workdir", str(workdir), "--prompt", "And God said", "--max-new-tokens", "4"]) == 0
    assert plot.main(["--workdir", str(workdir)]) == 0
    assert (workdir / "activation_psalms.png").is_file() and (workdir / "activation_code.png").is_file()
    out = capsys.readouterr().out
    assert "task kjv_cloze: 20 questions" in out and "And God said" in out


@pytest.mark.e2e
def test_simulated_devices_run_the_readme_mesh_and_agree_with_the_default_placement(trained_run, tmp_path,
                                                                                     capsys):
    """--simulate-devices 8 with mesh.fsdp=4 mesh.expert=2 (the README's example, which a CPU
    alone cannot run), in a fresh process: generate prints the text and evaluate the held-out
    loss that this process gives on its default placement (the suite's 8 devices on the data
    axis), a different mesh."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    prompt = ["--prompt", "And God said", "--max-new-tokens", "6"]
    assert generate.main(["--workdir", str(run), *prompt]) == 0
    alone = capsys.readouterr().out
    alone_json = tmp_path / "alone.json"
    assert evaluate.main(["--workdir", str(run), "--batches", "1", "--output", str(alone_json)]) == 0
    capsys.readouterr()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    placement = ["--simulate-devices", "8", "mesh.fsdp=4", "mesh.expert=2"]
    evaluate_args = ["--batches", "1", "--output", str(tmp_path / "mesh.json")]
    for command in (["generate", *prompt], ["evaluate", *evaluate_args]):
        done = subprocess.run([sys.executable, "-m", f"rexmoe_jax.{command[0]}", "--workdir", str(run),
                               *command[1:], *placement], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        if command[0] == "generate":
            assert done.stdout == alone
    meshed, single = (json.loads((tmp_path / name).read_text()) for name in ("mesh.json", "alone.json"))
    assert meshed["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)


def _not_utf8(path):
    path.write_bytes(b'{"context": "caf\xe9", "choices": ["a", "b"], "label": 0}\n')


def _label_true(path):
    path.write_text('{"context": "a", "choices": [" b", " c"], "label": true}\n')


@pytest.mark.e2e
@pytest.mark.parametrize("make_args,message", [
    (lambda t: ["--tasks", str(t / "missing.jsonl")], "missing.jsonl' does not exist"),
    (lambda t: (_not_utf8(t / "t.jsonl"), ["--tasks", str(t / "t.jsonl")])[1], "t.jsonl:1: not UTF-8 text"),
    (lambda t: (_label_true(t / "t.jsonl"), ["--tasks", str(t / "t.jsonl")])[1], "t.jsonl:1: 'label' must be"),
    (lambda t: ["--input-set", f"psalms={t / 'missing.txt'}"], "--input-set psalms="),
    (lambda t: ((t / "s.txt").write_bytes(b"\xff\xfe"), ["--input-set", f"s={t / 's.txt'}"])[1], "not UTF-8"),
    (lambda t: ["--batches", "0"], "--batches must be >= 1, got 0"),
    (lambda t: ((t / "a.txt").write_text("In the beginning. " * 50),
                ["--input-set", f"s={t / 'a.txt'}", "--input-set", f"s={t / 'a.txt'}"])[1],
     "--input-set s is given twice"),
    (lambda t: ["--tasks", "examples/tasks/kjv_cloze.jsonl", "examples/tasks/kjv_cloze.jsonl"],
     "two task files are named 'kjv_cloze'"),
    (lambda t: ["--output", str(t / "no" / "such" / "eval.json")], "eval.json' cannot be written"),
])
def test_evaluate_checks_its_inputs_and_output_before_evaluating(trained_run, tmp_path, capsys, monkeypatch,
                                                                 make_args, message):
    def evaluation_ran(*args, **kwargs):
        raise AssertionError("the held-out evaluation ran before the inputs were checked")

    monkeypatch.setattr(evaluate, "held_out", evaluation_ran)
    args = make_args(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert evaluate.main(["--workdir", str(trained_run), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no output, no folder
    assert not (trained_run / "eval.json").exists()


def test_a_workdir_that_is_not_a_run_is_named_before_the_output(tmp_path, capsys):
    """A --workdir that does not exist is the line, not the default --output inside it."""
    assert evaluate.main(["--workdir", str(tmp_path / "nosuch")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {str(tmp_path / 'nosuch')!r} has no config.json; "
                     "is it a training run's --workdir?"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
@pytest.mark.parametrize("output,message", [
    (lambda run, t: run / "metrics.jsonl", "is one of the files of the training run"),
    (lambda run, t: run / "config.json", "is one of the files of the training run"),
    (lambda run, t: run / "checkpoints" / "e.json", "is one of the files of the training run"),
    (lambda run, t: t / "notes.txt", "exists and was not written by this command"),
    (lambda run, t: t, "is a folder"),
])
def test_evaluate_writes_over_nothing_it_did_not_write(trained_run, tmp_path, capsys, monkeypatch, output, message):
    """Checked before anything is restored or evaluated: the run and the user's files stay byte
    for byte as they were."""
    def evaluation_ran(*args, **kwargs):
        raise AssertionError("the run was restored before the output was checked")

    monkeypatch.setattr(evaluate.restore_lib, "restore", evaluation_ran)
    (tmp_path / "notes.txt").write_text("mine\n")
    before = (hashes(trained_run), hashes(tmp_path))
    assert evaluate.main(["--workdir", str(trained_run), "--output", str(output(trained_run, tmp_path))]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert (hashes(trained_run), hashes(tmp_path)) == before


def test_an_earlier_report_may_be_replaced(tmp_path):
    """What evaluate wrote (an eval.json-shaped object) is its own; a JSON file of other keys is not."""
    (tmp_path / "old.json").write_text(json.dumps({"step": 3, "eval_loss": 5.0, "routing": {}, "tasks": {}}))
    (tmp_path / "other.json").write_text(json.dumps({"step": 3, "loss": 5.0}))
    evaluate._check_output(tmp_path / "old.json")
    evaluate._check_output(tmp_path / "new.json")
    with pytest.raises(ConfigError, match="was not written by this command"):
        evaluate._check_output(tmp_path / "other.json")


@pytest.mark.e2e
def test_read_only_tools_change_nothing_in_the_run(trained_run, tmp_path, capsys):
    """An unreadable newest checkpoint is skipped, not renamed; a run with no checkpoint gets
    no checkpoints/ folder."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    (workdir / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert evaluate.main(["--workdir", str(workdir), "--batches", "1", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["step"] == 3
    assert generate.main(["--workdir", str(workdir), "--prompt", "And", "--max-new-tokens", "2"]) == 0
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert "checkpoint 6 in" in capsys.readouterr().err

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(workdir / "config.json", fresh / "config.json")
    assert generate.main(["--workdir", str(fresh), "--prompt", "And"]) == 2
    assert "has no checkpoint yet" in capsys.readouterr().err
    assert sorted(p.name for p in fresh.iterdir()) == ["config.json"]


@pytest.mark.e2e
def test_routing_of_texts_counts_every_token(trained_run):
    """LoadedModel.routing: rows of data.seq_len, then a shorter row with the rest, so every
    position of the packed texts but the last is routed once."""
    import rexmoe_jax

    model = rexmoe_jax.load(trained_run)
    texts = ["In the beginning God created the heaven and the earth."] * 5
    positions = sum(len(model.tokenizer.encode(t)) + 1 for t in texts) - 1  # each text then EOD
    seq_len = model.config.data.seq_len
    assert positions > seq_len and positions % seq_len, "the texts must need a shorter last row"
    report = model.routing(texts)
    assert report["tokens"] == positions
    np.testing.assert_allclose(np.sum(report["activation_ratio"], axis=1), model.config.model.top_k, rtol=1e-5)


@pytest.mark.e2e
def test_more_batches_than_the_held_out_split_holds_says_so(trained_run, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(trained_run), "--batches", "100000",
                          "--output", str(tmp_path / "eval.json")]) == 0
    err = capsys.readouterr().err
    assert "note: the held-out split holds" in err and "(--batches 100000 asked for more)" in err
