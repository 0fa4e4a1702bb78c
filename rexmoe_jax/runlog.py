"""What a run writes besides checkpoints: metrics.jsonl (one JSON object per log or eval step),
routing.jsonl (the per-layer expert loads over the pool at each evaluation), and the same to
the trackers `train.tracker` names (trackers.py: TensorBoard, W&B). Only process 0 writes.

Non-finite values (a diverged loss) are written as null, so strict JSON parsers read every line.
A write that fails (a full disk, no permission) raises `WriteError` naming the file and step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys

import jax
import numpy as np

from rexmoe_jax import trackers
from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.model.metrics import load_balance_violation
from rexmoe_jax.runtime.workdir import CONFIG_FILE, METRICS_FILE, ROUTING_FILE, WriteError, failure_reason


def read_records(path: pathlib.Path, *, warn: bool = True) -> list[dict]:
    """The JSON objects of a .jsonl file, line by line. A line that is not one (the torn last
    line of a process killed mid-write) is dropped, with one warning per file naming the lines."""
    if not path.is_file():
        return []
    records, dropped = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # Also a UnicodeDecodeError: torn inside a multi-byte character.
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                dropped.append(number)
    if warn and len(dropped) == 1:
        print(f"warning: {path}:{dropped[0]} is not a complete JSON record (a write cut short?); dropped it",
              file=sys.stderr, flush=True)
    elif warn and dropped:
        shown = ", ".join(map(str, dropped[:5])) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        print(f"warning: {path}: {len(dropped)} lines are not complete JSON records (lines {shown}); dropped them",
              file=sys.stderr, flush=True)
    return records


def _truncate(path: pathlib.Path, step: int) -> None:
    """Keeps the records up to `step` (the ones after it were written by a run stopped before
    its next checkpoint; the resumed run writes them again) and drops broken lines, replacing
    the file atomically."""
    if not path.is_file():
        return
    records = read_records(path)
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    text = "".join(_line(r) for r in kept)
    if text.encode() == path.read_bytes():
        return
    partial = path.with_suffix(path.suffix + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise WriteError(f"{failure_reason(err)} while rewriting {path} to resume at step {step}") from None


def json_safe(value):
    """NaN and infinities, which strict JSON has no spelling for, as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _line(record: dict) -> str:
    return json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n"


def to_host(metrics: dict) -> dict:
    """JSON-ready host values: scalars as numbers, per-layer arrays as lists."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        out[name] = value.item() if value.ndim == 0 else np.round(value.astype(np.float64), 5).tolist()
    return out


def tracker_name(record: dict, name: str) -> str:
    """An eval line's values go to trackers as eval_NAME, so that they do not overwrite the
    training line's values of the same name at the same step (lbv_max, underused_share)."""
    return f"eval_{name}" if "eval_loss" in record and not name.startswith("eval_") else name


def _numbers(record: dict) -> dict[str, float]:
    """A record's numbers for a tracker: scalars as they are, per-layer lists as name/i."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        name = tracker_name(record, key)
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": v for i, v in enumerate(value)})
    return out


def proof_step(checkpoint_every: int, steps: int, start: int = 0) -> int:
    """The step whose records prove that a checkpoint was saved by a run that began at `start`:
    a save is waited for before the next one starts, so records at the second save's step (or
    the end) follow a finished first save. checkpoint_every 0 saves only at the end."""
    every = checkpoint_every or steps
    return min((start // every + 2) * every, steps)


def check_fresh_start(workdir: pathlib.Path, config_json: str, proven: int, start_over: bool,
                      start: str = "from step 0") -> None:
    """Before a run with no checkpoint trains from step 0 in `workdir`, which rewrites its
    config.json and records: raises ConfigError where that would lose work. A config.json that
    is valid JSON but not a training run's (an export's) is never replaced, even with
    --start-over. Without --start-over, also refused: a config.json that cannot be read (torn?),
    and records up to step `proven` or later (a checkpoint must have been saved by then: its
    checkpoints were deleted, or their saves failed) or records under another config. A run
    stopped before that, with no records or under the same config, starts again. `start` says
    where the run would start (train.py --from: its checkpoint)."""
    saved = workdir / CONFIG_FILE
    again = (f"to train {start} there, replacing its config.json and records, run with --start-over; "
             "or choose another --workdir")
    ours = None
    if saved.is_file():
        try:
            ours = json.loads(saved.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            if not start_over:
                raise ConfigError(f"--workdir {str(workdir)!r} holds a config.json that cannot be read (torn "
                                  "by a crash?) and no checkpoint; " + again) from None
        else:
            if not (isinstance(ours, dict) and {"model", "train", "data"} <= set(ours)):
                raise ConfigError(f"--workdir {str(workdir)!r} holds a config.json that is not a training "
                                  "run's (an export?); choose another --workdir")
    if start_over:
        return
    try:  # a metrics file that cannot be read is left to RunLog, which rewrites it, to report
        records = read_records(workdir / METRICS_FILE, warn=False)
    except OSError:
        records = []
    last = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
    if last is not None and last >= proven:
        raise ConfigError(f"--workdir {str(workdir)!r} holds records up to step {last} but no checkpoint "
                          "(deleted, or their saves failed? a run started with --from needs it again); "
                          + again)
    if last is not None and ours is not None and ours != json.loads(config_json):
        raise ConfigError(f"--workdir {str(workdir)!r} holds another run's config.json and records but no "
                          "checkpoint; " + again)


class RunLog:
    def __init__(self, workdir: pathlib.Path, resumed_step: int, config: Config | None = None):
        self.enabled = jax.process_index() == 0
        self.metrics_path = workdir / METRICS_FILE
        self.routing_path = workdir / ROUTING_FILE
        self._trackers = []
        if not self.enabled:
            return
        for path in (self.metrics_path, self.routing_path):
            _truncate(path, resumed_step)
        self._trackers = trackers.open_trackers(config or Config(), workdir, resumed_step)

    def _append(self, path: pathlib.Path, record: dict) -> None:
        try:
            with open(path, "a") as f:
                f.write(_line(record))
        except OSError as err:
            raise WriteError(f"{failure_reason(err)} while writing {path} at step {record['step']}") from None

    def sync(self) -> None:
        """Flushes both files to the disk: called at checkpoints, so a machine that crashes after
        a checkpoint does not lose the lines it holds."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.routing_path):
            if path.is_file():
                try:
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
                except OSError as err:
                    raise WriteError(f"{failure_reason(err)} while syncing {path}") from None

    def write(self, record: dict) -> None:
        """One metrics.jsonl line (and its numbers to the trackers)."""
        if not self.enabled:
            return
        self._append(self.metrics_path, record)
        numbers = _numbers(json_safe(record))
        for tracker in self._trackers:
            tracker.scalars(record["step"], {k: v for k, v in numbers.items() if v is not None})

    def write_routing(self, step: int, expert_load_LxP: np.ndarray, pool_sizes: np.ndarray,
                      router_bias_LxP: np.ndarray | None = None) -> None:
        """One evaluation's (L, pool) expert loads, and the router biases (model.router_bias)."""
        if self.enabled:
            record = {"step": step, "pool_sizes": np.asarray(pool_sizes).tolist(),
                      "expert_load": np.round(np.asarray(expert_load_LxP, np.float64), 6).tolist()}
            if router_bias_LxP is not None:
                record["router_bias"] = np.round(np.asarray(router_bias_LxP, np.float64), 6).tolist()
            self._append(self.routing_path, record)
            if self._trackers:
                load = np.asarray(expert_load_LxP, np.float32)
                lbv = np.asarray(load_balance_violation(load, np.asarray(pool_sizes)))
                valid = np.arange(load.shape[1])[None, :] < np.asarray(pool_sizes)[:, None]
                for tracker in self._trackers:
                    tracker.routing(step, lbv, valid)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
