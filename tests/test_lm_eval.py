"""lm-evaluation-harness itself against the project: the registered model, the command line, and
the project's scorer agree per choice with lm_eval's requests scored one by one, on edge cases."""

import glob
import json
import pathlib
import shutil

import numpy as np
import pytest
from optional import importorskip

importorskip("lm_eval")

from files import hashes, one_error_line
from lm_eval import evaluator
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from test_evaluate import CFG
from test_scoring import by_hand

from rexmoe_jax import loop
from rexmoe_jax.config import apply_overrides
from rexmoe_jax.inference import lm_eval as rexmoe_lm_eval
from rexmoe_jax.inference import tasks

GENESIS = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
           "and darkness was upon the face of the deep.")
# Delimiter "" (choices carry their own spaces, or not): trailing spaces and newlines in the
# context, choices with and without a leading space, non-ASCII, an empty context, a context
# longer than data.seq_len = 16 tokens, and multi-token choices.
EDGE = [
    {"context": "In the beginning God created ", "choices": ["the heaven and the earth.", "a parking lot."],
     "label": 0},
    {"context": "And God said,\n", "choices": ["Let there be light", " Let there be light"], "label": 1},
    {"context": "The LORD is my shepherd;  ", "choices": [" I shall not want.", "I shall not want."],
     "label": 0},
    {"context": "Ἐν ἀρχῇ ἦν ὁ λόγος: in the beginning was the", "label": 0,
     "choices": [" Word", " λόγος", " café crème"]},
    {"context": "", "choices": ["In the beginning", " And God said", "Æsir"], "label": 0},
    {"context": GENESIS, "choices": [" And the Spirit of God moved upon the face of the waters.", " Amen"],
     "label": 0},
    {"context": "for all they that take the sword shall perish with the\n\n", "choices": ["sword.", " sword"],
     "label": 0},
]
# Delimiter " ", as lm_eval's ARC, PIQA and HellaSwag have it: acc_norm counts the choice alone.
SPACED = [
    {"context": "Question: Who made the heaven and the earth?\nAnswer:", "label": 0,
     "choices": ["God", "Moses", "a very long answer of many words"]},
    {"context": "Question: Où est-il né?\nAnswer: ", "choices": ["Bethléem", "Nazareth"], "label": 0},
    {"context": "", "choices": ["Amen", "Selah"], "label": 1},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm_eval") / "run"
    config = apply_overrides(CFG, ["data.batch_size=4", "train.steps=2", "train.eval_every=2",
                                   "train.eval_batches=1", "train.sample_tokens=0", "mesh.num_devices=1"])
    loop.run(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    for name, questions, delimiter in (("edge", EDGE, ""), ("spaced", SPACED, " ")):
        lines = [json.dumps(dict(q, delimiter=delimiter), ensure_ascii=False) for q in questions]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (folder / f"{name}.yaml").write_text(json.dumps(rexmoe_lm_eval.task_config(folder / f"{name}.jsonl")))
    return folder


class HandScored(rexmoe_lm_eval.RexMoeLM):
    """lm_eval's own token requests, each scored alone (tests/test_scoring.by_hand)."""

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        logprob, greedy = by_hand(self.run.config, self.run.params, [(c, x) for _, c, x in requests])
        return list(zip(logprob.tolist(), greedy.tolist()))


def project(workdir, path):
    """The project's scorer on a task file: per-question choice log-likelihoods and metrics."""
    run = HandScored(workdir=str(workdir)).run
    questions = tasks.read_task(path)
    loglikelihoods, _ = tasks.choice_loglikelihoods(run.config, run.params, run.tokenizer, questions)
    return loglikelihoods, tasks.accuracy(questions, loglikelihoods)


def check_against(workdir, task_files, name, results, samples):
    loglikelihoods, metrics = project(workdir, task_files / f"{name}.jsonl")
    for sample in samples:
        theirs = [float(ll) for ll, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(loglikelihoods[sample["doc_id"]], theirs, rtol=1e-5, atol=1e-4)
    for metric in tasks.METRICS:
        assert results[f"{metric},none"] == pytest.approx(metrics[metric]), metric


@pytest.mark.e2e
def test_scorer_matches_lm_evals_requests_scored_one_by_one(workdir, task_files):
    manager = TaskManager(include_path=str(task_files), include_defaults=False)
    out = evaluator.simple_evaluate(model=HandScored(workdir=str(workdir)), tasks=["edge", "spaced"],
                                   task_manager=manager, log_samples=True)
    for name in ("edge", "spaced"):
        check_against(workdir, task_files, name, out["results"][name], out["samples"][name])


@pytest.mark.e2e
def test_documented_command_runs_the_registered_model(workdir, task_files, tmp_path):
    """On a mesh of 8 devices given as model_args (2 on data x 4 on experts): every
    log-likelihood is lm_eval's own request scored by hand on one device (check_against)."""
    rexmoe_lm_eval.main(["--model", "rexmoe", "--model_args",
                         f"workdir={workdir},mesh_data=2,mesh_expert=4", "--tasks",
                         f"{task_files / 'edge.jsonl'},{task_files / 'spaced.jsonl'}",
                         "--output_path", str(tmp_path), "--log_samples"])
    [results] = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    results = json.loads(pathlib.Path(results).read_text())["results"]
    for name in ("edge", "spaced"):
        [samples] = glob.glob(str(tmp_path / "**" / f"samples_{name}_*.jsonl"), recursive=True)
        lines = pathlib.Path(samples).read_text(encoding="utf-8").splitlines()
        samples = [json.loads(line) for line in lines]
        check_against(workdir, task_files, name, results[name], samples)


@pytest.mark.e2e
def test_rolling_and_generation_requests(workdir):
    model = rexmoe_lm_eval.RexMoeLM(workdir=str(workdir))
    text = GENESIS * 2
    [rolled] = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        model.tok_encode(text), model.eot_token_id, model.max_length, 1)]
    assert len(windows) > 2
    expected = float(by_hand(model.run.config, model.run.params, windows)[0].sum())
    assert rolled == pytest.approx(expected, abs=1e-3)

    def request(until):
        return Instance("generate_until", {}, ("And God said", {"until": until, "max_gen_toks": 12}), 0)

    [free] = model.generate_until([request([])])
    stop = free[len(free) // 2:][:2] or "x"
    [cut] = model.generate_until([request([stop])])
    assert cut == free[:free.find(stop)] if stop in free else cut == free


def _config_only(t):
    (t / "run").mkdir()
    (t / "run" / "config.json").write_text(CFG.to_json())


def _truncated_config(t):
    (t / "run").mkdir()
    (t / "run" / "config.json").write_text(CFG.to_json()[:100])


def _label_out_of_range(t):
    (t / "run").mkdir()
    (t / "t.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": 5}\n')


@pytest.mark.e2e
@pytest.mark.parametrize("setup,run,message", [
    (lambda t: None, "missing", "missing' has no config.json; is it a training run's --workdir?"),
    (_config_only, "run", "run' has no checkpoint yet; train first"),
    (_truncated_config, "run", "config.json' is not readable JSON"),
    (_label_out_of_range, None, "t.jsonl:1: 'label' must be the index of the right choice, 0 to 1, got 5"),
])
def test_bad_inputs_are_one_line_before_lm_eval_starts(workdir, tmp_path, capfd, setup, run, message):
    """The command's own checks, as evaluate makes them: exit 2 and one line, nothing written
    (run None: the trained run, with a bad task file)."""
    setup(tmp_path)
    task = tmp_path / "t.jsonl" if (tmp_path / "t.jsonl").exists() else pathlib.Path("examples/tasks/kjv_cloze.jsonl")
    before = hashes(tmp_path)
    argv = ["--model", "rexmoe", "--model_args", f"workdir={tmp_path / run if run else workdir}",
            "--tasks", str(task), "--output_path", str(tmp_path / "results")]
    assert rexmoe_lm_eval.main(argv) == 2
    assert message in one_error_line(capfd.readouterr().err)
    assert hashes(tmp_path) == before


@pytest.mark.e2e
def test_a_checkpoint_of_another_model_is_one_line_before_lm_eval_starts(workdir, tmp_path, capfd):
    """config.json of one size over checkpoints of another: refused from the meta records, before
    lm_eval prints anything of its own, and nothing in the run changes."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = json.loads((run / "config.json").read_text())
    d_model = config["model"]["d_model"]
    config["model"]["d_model"] = 2 * d_model
    (run / "config.json").write_text(json.dumps(config))
    before = hashes(tmp_path)
    argv = ["--model", "rexmoe", "--model_args", f"workdir={run}",
            "--tasks", "examples/tasks/kjv_cloze.jsonl", "--output_path", str(tmp_path / "results")]
    assert rexmoe_lm_eval.main(argv) == 2
    err = capfd.readouterr().err
    line = one_error_line(err)
    assert "was written by an incompatible config" in line
    assert f"model.d_model: {d_model} -> {2 * d_model}" in line
    assert line.endswith("the run's config.json has been changed: put back the one it was trained with")
    assert "INFO" not in err
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("model_args,message", [
    ("dtyp=bfloat16", "--model_args dtyp=...: the rexmoe model takes workdir, stride, max_gen_toks, dtype"),
    ("max_gen_toks=abc", "--model_args max_gen_toks=abc: expected a positive integer"),
    ("stride=0", "--model_args stride=0: expected a positive integer"),
])
def test_a_mistyped_model_arg_is_one_line_not_ignored(tmp_path, capfd, model_args, message):
    """Before any run is read or lm_eval starts (the workdir here does not even exist)."""
    argv = ["--model", "rexmoe", "--model_args", f"workdir={tmp_path / 'run'},{model_args}", "--tasks", "x"]
    assert rexmoe_lm_eval.main(argv) == 2
    assert message in one_error_line(capfd.readouterr().err)


@pytest.mark.e2e
def test_a_task_lm_eval_does_not_know_is_one_line(workdir, tmp_path, capfd):
    argv = ["--model", "rexmoe", "--model_args", f"workdir={workdir}", "--tasks", "nonexistent_task_xyz",
            "--output_path", str(tmp_path / "results")]
    assert rexmoe_lm_eval.main(argv) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "Tasks not found" in line and "nonexistent_task_xyz" in line and "--tasks list" in line
    assert not (tmp_path / "results").exists()
