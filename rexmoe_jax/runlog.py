"""What a run writes besides checkpoints: metrics.jsonl (one JSON object per log or eval step),
routing.jsonl (the per-layer expert loads over the pool at each evaluation), and TensorBoard
event files when tensorboardX is installed. Only process 0 writes."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
ROUTING_FILE = "routing.jsonl"


def read_records(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate(path: pathlib.Path, step: int) -> None:
    """Drops records after `step` (written by a run that was stopped before its next checkpoint;
    the resumed run writes them again), replacing the file atomically."""
    records = read_records(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) == len(records):
        return
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    os.replace(partial, path)


def to_host(metrics: dict) -> dict:
    """JSON-ready host values: scalars as numbers, per-layer arrays as lists."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        out[name] = value.item() if value.ndim == 0 else np.round(value.astype(np.float64), 5).tolist()
    return out


class RunLog:
    def __init__(self, workdir: pathlib.Path, resumed_step: int):
        self.enabled = jax.process_index() == 0
        self.metrics_path = workdir / METRICS_FILE
        self.routing_path = workdir / ROUTING_FILE
        self._tb = None
        if not self.enabled:
            return
        for path in (self.metrics_path, self.routing_path):
            _truncate(path, resumed_step)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resumed_step + 1)

    def _append(self, path: pathlib.Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def write(self, record: dict) -> None:
        """One metrics.jsonl line (and its scalars to TensorBoard)."""
        if not self.enabled:
            return
        self._append(self.metrics_path, record)
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(name, value, record["step"])

    def write_routing(self, step: int, expert_load_LxP: np.ndarray, pool_sizes: np.ndarray) -> None:
        if self.enabled:
            self._append(self.routing_path, {
                "step": step, "pool_sizes": np.asarray(pool_sizes).tolist(),
                "expert_load": np.round(np.asarray(expert_load_LxP, np.float64), 6).tolist()})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
