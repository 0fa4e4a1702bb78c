"""What a command may write (rexmoe_jax/outputs.py): never a run's own files, an existing file
or folder only when the command made it, and every result whole or not at all."""

import hashlib
import pathlib

import pytest
from files import hashes

from rexmoe_jax import outputs
from rexmoe_jax.config import ConfigError
from rexmoe_jax.runtime.workdir import WriteError


@pytest.fixture
def run(tmp_path):
    """A run folder: config.json, metrics.jsonl, checkpoints/10/."""
    (tmp_path / "run" / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    return tmp_path / "run"


def test_a_runs_own_files_are_named_and_others_are_not(run):
    for own in ("config.json", "metrics.jsonl", "routing.jsonl", "run.lock", "checkpoints/10/x", "checkpoints/new"):
        assert outputs.run_file(run / own) == run.resolve(), own
    for other in ("eval.json", "loss.png", "notes/metrics.jsonl"):
        assert outputs.run_file(run / other) is None, other
    assert outputs.run_file(run.parent / "elsewhere.json") is None


def test_check_file(run):
    (run.parent / "mine.txt").write_text("mine")
    outputs.check_file(run / "eval.json", "--output", ours=lambda p: False)  # new: allowed
    outputs.check_file(run.parent / "mine.txt", "--output", ours=lambda p: True)  # made by the command
    for path, message in ((run / "metrics.jsonl", "is one of the files of the training run"),
                          (run.parent / "mine.txt", "exists and was not written by this command"),
                          (run.parent, "is a folder")):
        with pytest.raises(ConfigError, match=message):
            outputs.check_file(path, "--output", ours=lambda p: False)


def test_staged_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with outputs.staged_folder(target) as staging:
        (staging / "a").write_text("first")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a").read_text() == "first"
    with pytest.raises(KeyboardInterrupt):
        with outputs.staged_folder(target) as staging:
            (staging / "a").write_text("second")
            raise KeyboardInterrupt
    # As it was, nothing beside it.
    assert hashes(tmp_path) == {"out": "dir", "out/a": hashlib.sha256(b"first").hexdigest()}
    with outputs.staged_folder(target) as staging:
        (staging / "b").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_is_a_write_error_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text("old")

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(WriteError, match=f"no space left on device while writing {tmp_path / 'r.json'}"):
        outputs.write_text(tmp_path / "r.json", "new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and (tmp_path / "r.json").read_text() == "old"
