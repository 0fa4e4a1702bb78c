"""The benchmark scripts run end to end (tiny shapes, two timed calls) and print their tables,
so they cannot rot between GPU sessions. Their timings are not checked: speed is measured by
running them, not by tests."""

import pathlib
import subprocess
import sys

import pytest

from benchmarks import (
    expert_exchange,
    expert_ffn,
    hf_export,
    inference,
    moe_block,
    output_head,
    profile_step,
    restore_memory,
    scoring,
    train_step,
)
from benchmarks import grouped_matmul as gmm_bench
from benchmarks import token_permute as permute_bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("main,args,columns", [
    (permute_bench.main, ["--small", "--iters", "1"], "| of copy BW |"),
    (gmm_bench.main, ["--small", "--iters", "1"], "| fwd of ceiling |"),
    (moe_block.main, ["--small", "--iters", "1"], "| vs tokamax + XLA default gradients |"),
    (train_step.main, ["--small", "--presets", "moe_0p5b_a0p07b", "--layers", "4", "--batch", "2", "--seq", "32",
                       "--steps", "1"], "| r=4 / r=1 |"),
    (scoring.main, ["--small", "--questions", "20"], "| speed-up |"),
    (profile_step.main, ["--layers", "4", "--batch", "2", "--seq", "16", "--steps", "1"], "| r=4 - r=1 |"),
    (expert_exchange.main, [], "| drops tokens |"),
    (expert_exchange.main, ["--check"], "| formula bytes |"),
    (expert_ffn.main, ["--presets", "moe_0p5b_a0p07b", "--reuse", "1", "4", "--layers", "4", "--batch", "2",
                       "--seq", "16", "--steps", "1", "--iters", "1"], "| speed-up |"),
    (output_head.main, ["--steps", "1", "--widths", "16"], "| speed-up |"),
    (inference.main, ["--small", "--lengths", "16", "--batch", "1", "--new-tokens", "2", "--reuse", "1", "2",
                      "--iters", "1"], "| expert MB read per layer |"),
    (hf_export.main, ["--preset", "configs/tiny.py", "--dtype", "float32"], "| folder GB |"),
    (restore_memory.main, ["--preset", "configs/tiny.py", "mesh.fsdp=2"], "| peak host GB |"),
    (restore_memory.main, ["--preset", "configs/tiny.py", "--params-only-run", "mesh.fsdp=2"], "| peak host GB |"),
])
def test_benchmark_prints_its_table(main, args, columns, capsys):
    main(args)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| "))
    assert header.rstrip().endswith(columns)
    assert "failed" not in out


def test_agreement_benchmark_runs_two_processes_and_prints_its_table():
    """benchmarks/agreement.py launches its own processes; process 0 prints the table (each of
    its lines after the launcher's "[0] ")."""
    small = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
             "model.expert_ffn=16", "model.num_experts=4", "data.seq_len=16", "data.batch_size=8"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.agreement", "--steps", "2", "--rounds", "1", *small],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("[0] | ")]
    assert rows[0] == ["", "ms per step (median)", "range over rounds", "vs without"], proc.stdout[-3000:]
    assert [row[0] for row in rows[1:]] == ["train step, no vote", "train step + vote", "vote alone (round trip)"]
