"""metrics.jsonl and routing.jsonl: records written per step, and a resumed run's view of them."""

import json

import numpy as np

from rexmoe_jax import runlog


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    """Lines after the resumed step were written by a run stopped before its next checkpoint:
    the resumed run writes them again, so they are dropped first."""
    log = runlog.RunLog(tmp_path, resumed_step=0)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": step / 10})
    log.write_routing(20, np.full((2, 4), 0.25), np.array([4, 4]))
    log.write_routing(30, np.full((2, 4), 0.25), np.array([4, 4]))
    log.close()
    runlog.RunLog(tmp_path, resumed_step=20).close()
    assert [r["step"] for r in runlog.read_records(tmp_path / "metrics.jsonl")] == [10, 20]
    routing = runlog.read_records(tmp_path / "routing.jsonl")
    assert [r["step"] for r in routing] == [20] and routing[0]["pool_sizes"] == [4, 4]


def test_to_host_gives_json_numbers_and_lists():
    record = runlog.to_host({"loss": np.float32(1.5), "layer": np.array([0.123456789, 2.0])})
    assert json.loads(json.dumps(record)) == {"loss": 1.5, "layer": [0.12346, 2.0]}
