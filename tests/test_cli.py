"""train.py: overrides, errors, --dry-run, and the paper presets' sizes; and the contract every
command keeps (rexmoe_jax/cli.py): one line and exit 2 for bad input, 4 for a failed write,
130 quietly on Ctrl-C, no traceback unless REXMOE_DEBUG asks."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from files import one_error_line

from rexmoe_jax import cli, data, plot
from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.inference import evaluate, generate
from rexmoe_jax.inference.restore import read_config
from rexmoe_jax.runtime import launch
from rexmoe_jax.study import __main__ as study
from rexmoe_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False,
                          capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_dry_run_summary_by_hand(capsys):
    """The tiny preset's counts, computed by hand from its dimensions."""
    assert train.main(["--dry-run", "model.reuse=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    d, f, L, n, k, v, heads, kv = 128, 256, 4, 8, 2, 4096, 4, 2
    hd = d // heads
    attention = d * heads * hd * 2 + d * kv * hd * 2
    router = d * 2 * n
    expert = 3 * d * f
    norms = 2 * d
    embedding = 2 * v * d
    total = embedding + L * (attention + router + norms + n * expert) + d
    assert summary["params_total"] == total
    assert summary["params_embedding"] == embedding
    assert summary["params_router"] == L * router
    assert summary["params_active"] == L * (attention + router + norms + k * expert) + d
    assert summary["pool_size"] == 16 and summary["num_groups"] == 2
    assert summary["tokens_per_step"] == 16 * 128


@pytest.mark.parametrize("preset,total,active", [
    ("moe_0p5b_a0p07b", 0.5e9, 0.07e9), ("moe_0p5b_a0p07b_se", 0.5e9, 0.07e9),
    ("moe_2p3b_a0p3b", 2.3e9, 0.3e9), ("moe_2p3b_a0p3b_se_r4", 2.3e9, 0.3e9),
    ("moe_0p5b_a0p13b", 0.5e9, 0.13e9), ("moe_0p5b_a0p07b_r4", 0.5e9, 0.07e9),
])
def test_paper_presets_match_their_names(preset, total, active, capsys):
    """Total including embeddings and active excluding embeddings, within 15% of the name."""
    assert train.main(["--config", str(ROOT / "configs" / f"{preset}.py"), "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(summary["params_total"] / total - 1) < 0.15
    assert abs(summary["params_active"] / active - 1) < 0.15


def test_every_preset_loads():
    from rexmoe_jax.config import load_preset

    presets = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "recipe"))
    assert len(presets) == 19
    for path in presets:
        cfg = load_preset(path)
        if path.stem.endswith(("_r2", "_r3", "_r4")):
            assert cfg.model.reuse == int(path.stem[-1]) and cfg.psr.schedule == "linear"
            base = load_preset(path.with_name(path.stem[:-3] + ".py"))
            assert base.model.reuse == 1 and base.psr.schedule == "none"
            assert base.optim == cfg.optim and base.data == cfg.data


@pytest.mark.parametrize("args,message", [
    (["model.top_k=99"], "model.top_k"),
    (["model.nonsense=1"], "unknown config key 'model.nonsense'"),
    (["train.steps=ten"], "expected an integer"),
    (["--config", "configs/nope.py"], "does not exist"),
    (["--simulate-devices", "-2"], "--simulate-devices -2: give a number of devices >= 1"),
])
def test_errors_are_one_line_and_nonzero(args, message):
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_simulate_devices_after_jax_started_is_one_line_not_ignored(tmp_path, capsys, monkeypatch):
    """In a process whose JAX runs already (a notebook, this test) the flag could change nothing:
    generate says so instead of running on the devices it has."""
    jax.devices()  # started
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored after the test
    assert generate.main(["--workdir", str(tmp_path), "--prompt", "Hi", "--simulate-devices", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--simulate-devices 2: JAX has started on its devices already" in line


@pytest.mark.parametrize("given, scheduler", [
    ("--xla_force_host_platform_device_count=8", "false"),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", "true"),
], ids=["added", "user's-kept"])
def test_simulate_devices_sets_the_count_and_the_cpu_scheduler(given, scheduler):
    """--simulate-devices 3 in a new process: JAX has 3 devices whatever count XLA_FLAGS held,
    and XLA:CPU's concurrency-optimised scheduler is off (its deadlock) unless the user set it."""
    probe = ("import os; from rexmoe_jax.runtime import distributed; distributed.simulate_devices(3); "
             "import jax; print(jax.device_count()); print(os.environ['XLA_FLAGS'])")
    env = {**os.environ, "XLA_FLAGS": given, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    count, flags = done.stdout.strip().splitlines()
    assert count == "3"
    named = [f for f in flags.split() if f.startswith("--xla_cpu_enable_concurrency_optimized_scheduler")]
    assert named == [f"--xla_cpu_enable_concurrency_optimized_scheduler={scheduler}"]


def one_line_error(capsys, argv) -> str:
    assert train.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.mark.parametrize("source", ["def get_config(:\n", "def get_config():\n    raise ValueError('boom')\n",
                                    "def get_config():\n    return 3\n"], ids=["syntax", "raises", "wrong-type"])
def test_a_broken_preset_exits_2_naming_it(tmp_path, capsys, source):
    (tmp_path / "preset.py").write_text(source)
    assert str(tmp_path / "preset.py") in one_line_error(capsys, ["--config", str(tmp_path / "preset.py"), "--dry-run"])


def test_a_runs_config_json_is_a_config(tmp_path, capsys):
    """A run's config.json (train.steps=7, model.reuse=4, and no field added since: an older
    run's) as --config, with an override on top: the config printed holds all three."""
    from rexmoe_jax.config import Config, apply_overrides

    saved = apply_overrides(Config(), ["train.steps=7", "model.reuse=4", "psr.schedule=linear"]).to_dict()
    del saved["train"]["keep_every"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert train.main(["--config", str(tmp_path / "config.json"), "--dry-run", "train.seed=5"]) == 0
    train_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  train:"))
    assert "steps=7 seed=5" in train_line and "keep_every=0" in train_line
    (tmp_path / "other.json").write_text('{"architectures": ["MixtralForCausalLM"]}')
    line = one_line_error(capsys, ["--config", str(tmp_path / "other.json"), "--dry-run"])
    assert f"config file {str(tmp_path / 'other.json')!r} is not a training run's config.json" in line


def test_without_config_a_run_takes_its_own_then_its_sources_config(tmp_path, monkeypatch, capsys):
    """No --config: a --workdir with a config.json resumes under it; a new --workdir started
    --from another run takes that run's; otherwise configs/tiny.py. An override applies on top."""
    from rexmoe_jax import loop
    from rexmoe_jax.config import Config, apply_overrides

    seen = []
    monkeypatch.setattr(loop, "run", lambda config, workdir, stop, start_over, source:
                        seen.append((config.train.steps, config.model.reuse)) or {})
    for name, steps in (("own", 7), ("other", 9)):
        (tmp_path / name / "checkpoints" / "3").mkdir(parents=True)
        saved = apply_overrides(Config(), [f"train.steps={steps}", "model.reuse=4", "psr.schedule=linear"])
        (tmp_path / name / "config.json").write_text(saved.to_json())
    assert train.main(["--workdir", str(tmp_path / "own"), "mesh.num_devices=1"]) == 0
    assert train.main(["--workdir", str(tmp_path / "new"), "--from", str(tmp_path / "other"),
                       "mesh.num_devices=1", "model.reuse=2"]) == 0
    assert train.main(["--workdir", str(tmp_path / "plain"), "mesh.num_devices=1"]) == 0
    assert seen == [(7, 4), (9, 2), (300, 2)]  # tiny.py: 300 steps at r = 2
    out = capsys.readouterr().out
    for name in ("own", "other"):
        assert f"config {tmp_path / name / 'config.json'}:" in out


def test_a_wrong_from_is_one_line_before_training(tmp_path, capsys):
    """--from a folder that is not a run, or with --dry-run: exit 2, one line, nothing written."""
    workdir = tmp_path / "new"
    line = one_line_error(capsys, ["--workdir", str(workdir), "--from", str(tmp_path)])
    assert f"--from {str(tmp_path)!r} is neither a training run's folder" in line
    assert "--from starts a training run" in one_line_error(capsys, ["--dry-run", "--from", str(tmp_path)])
    assert not workdir.exists()


def test_messages_name_what_is_wrong(tmp_path, capsys):
    """A README as --config, a folder as data.tokenizer, a run's config.json with a field of the
    wrong type: each one line saying so (not an AttributeError, not "does not exist")."""
    assert "is neither a Python preset (.py) nor a run's config.json" in one_line_error(
        capsys, ["--config", "README.md", "--dry-run"])
    with pytest.raises(ConfigError, match="is a folder; give its tokenizer.json or .model file"):
        load_tokenizer(tmp_path)
    (tmp_path / "run").mkdir()
    saved = json.loads(Config().to_json())
    saved["model"]["d_model"] = "x"
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"run/config.json': .*model.d_model"):
        read_config(tmp_path / "run")


def test_an_empty_sample_prompt_exits_2_before_training(capsys):
    assert "train.sample_prompt" in one_line_error(capsys, ["--dry-run", "train.sample_prompt="])


@pytest.mark.parametrize("name,content,message", [
    ("c.jsonl", b'{"text": "caf\xe9"}\n', "c.jsonl:1: not UTF-8 text"),
    ("c.npy", None, "c.npy' holds negative token ids"),
])
def test_a_bad_corpus_exits_2_naming_the_file(tmp_path, capsys, name, content, message):
    """Through train.py and the loop: the corpus is read before anything is compiled."""
    import numpy as np

    if content is None:
        np.save(tmp_path / name, np.asarray([3, -1, 0], np.int32))
    else:
        (tmp_path / name).write_bytes(content)
    tokenizer = ["data.tokenizer=" + str(ROOT / "rexmoe_jax" / "assets" / "tokenizer.json")] * (name == "c.npy")
    line = one_line_error(capsys, ["--workdir", str(tmp_path / "run"), f"data.corpus={tmp_path / name}",
                                   "mesh.num_devices=1", *tokenizer])
    assert message in line
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder; lock released


def test_a_failed_write_exits_4_with_one_line(tmp_path, capsys, monkeypatch):
    from rexmoe_jax import loop
    from rexmoe_jax.runtime.workdir import WriteError

    def full_disk(*args, **kwargs):
        raise WriteError("no space left on device while saving step 30 in DIR; checkpoints 10 and 20 are intact")

    monkeypatch.setattr(loop, "run", full_disk)
    assert train.main(["--workdir", str(tmp_path), "mesh.num_devices=1"]) == 4
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: no space left on device while saving step 30 in DIR; checkpoints 10 and 20 are intact"]


def test_a_failed_mesh_check_leaves_no_workdir(tmp_path, capsys):
    """8 devices do not split 3 ways: one line, and the folder it made is gone again."""
    line = one_line_error(capsys, ["--workdir", str(tmp_path / "new" / "run"), "mesh.expert=3"])
    assert "mesh" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"] and not (tmp_path / "new" / "run").exists()


def test_start_over_and_from_reach_the_loop(tmp_path, monkeypatch):
    from rexmoe_jax import loop

    seen = []
    monkeypatch.setattr(loop, "run", lambda config, workdir, stop, start_over, source:
                        seen.append((start_over, source)) or {})
    (tmp_path / "other" / "checkpoints" / "7").mkdir(parents=True)
    source = str(tmp_path / "other" / "checkpoints" / "7")
    assert train.main(["--workdir", str(tmp_path), "mesh.num_devices=1", "--start-over"]) == 0
    assert train.main(["--workdir", str(tmp_path), "mesh.num_devices=1"]) == 0
    assert train.main(["--workdir", str(tmp_path / "new"), "mesh.num_devices=1", "--from", source]) == 0
    assert seen == [(True, None), (False, None), (False, source)]


# The contract (rexmoe_jax/cli.py) ------------------------------------------------------------


def _failing(exception):
    @cli.command
    def main():
        raise exception

    return main


@pytest.mark.parametrize("exception,status,line", [
    (cli.BadInput("--x 'y' is not a thing"), 2, "error: --x 'y' is not a thing"),
    (cli.WriteFailed("no space left on device while writing F"), 4, "error: no space left on device while writing F"),
    (RuntimeError("surprise\nsecond line"), 1,
     "error: RuntimeError: surprise (unexpected; run again with REXMOE_DEBUG=1 for the traceback)"),
])
def test_the_contract_is_one_line_and_a_status(capsys, monkeypatch, exception, status, line):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    assert _failing(exception)() == status
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line] and captured.out == ""


def test_ctrl_c_is_quiet_and_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    cleaned = []

    @cli.command
    def main():
        try:
            raise KeyboardInterrupt
        finally:
            cleaned.append(True)  # what the command started is cleaned up on the way out

    assert main() == cli.INTERRUPTED == 130 and cleaned == [True]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(RuntimeError, match="surprise"):
        _failing(RuntimeError("surprise"))()
    assert _failing(cli.BadInput("bad"))() == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: bad"


@pytest.mark.parametrize("main", [train.main, evaluate.main, generate.main, plot.main, data.main, study.main,
                                  launch.main], ids=lambda m: m.__module__)
def test_every_command_turns_a_usage_error_into_one_line(capsys, main):
    assert main(["--no-such-option"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--no-such-option" in line or "required" in line, line
