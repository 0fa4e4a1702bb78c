"""The benchmark scripts run end to end (tiny shapes, two timed calls) and print their tables,
so they cannot rot between GPU sessions. Their timings are not checked: speed is measured by
running them, not by tests."""

import pytest

from benchmarks import grouped_matmul as gmm_bench
from benchmarks import moe_block, profile_step, scoring, train_step
from benchmarks import token_permute as permute_bench


pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("main,args,columns", [
    (permute_bench.main, ["--small", "--iters", "1"], "| of copy BW |"),
    (gmm_bench.main, ["--small", "--iters", "1"], "| fwd of ceiling |"),
    (moe_block.main, ["--small", "--iters", "1"], "| vs tokamax + XLA default gradients |"),
    (train_step.main, ["--small", "--presets", "moe_0p5b_a0p07b", "--layers", "4", "--batch", "2", "--seq", "32",
                       "--steps", "1"], "| r=4 / r=1 |"),
    (scoring.main, ["--small", "--questions", "20"], "| speed-up |"),
    (profile_step.main, ["--layers", "4", "--batch", "2", "--seq", "16", "--steps", "1"], "| r=4 - r=1 |"),
])
def test_benchmark_prints_its_table(main, args, columns, capsys):
    main(args)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| "))
    assert header.rstrip().endswith(columns)
    assert "failed" not in out
