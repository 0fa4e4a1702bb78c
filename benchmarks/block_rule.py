"""Benchmark: does the blocked grouped matmul's block size explain r = 4's CPU overhead?

    python -m benchmarks.block_rule [--presets moe_0p5b_a0p07b ...] [--steps N]

Train steps of each preset's r = 1 and r = 4 models at train_step.py's --small shapes (4 layers,
8 x 128 tokens, PSR off), measured once per block rule: the default (a power of two near half
the mean rows per group, 16 to 128), one near the whole mean (32 to 128), and fixed blocks of 64
and 128 rows. The rule is swapped in for `blocked.default_block` for the run.
"""

from __future__ import annotations

import argparse

from benchmarks import train_step
from benchmarks.benchmarking import environment, print_table
from pallas_kernels.grouped_matmul import blocked

RULES = {
    "default (half the mean, 16-128)": blocked.default_block,
    "the mean (32-128)": lambda rows, groups: int(min(128, max(32, 1 << (max(1, rows // groups).bit_length() - 1)))),
    "64": lambda rows, groups: 64,
    "128": lambda rows, groups: 128,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["moe_0p5b_a0p07b", "moe_2p3b_a0p3b"])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    shape = argparse.Namespace(batch=8, seq=128, layers=4, small=True, overrides=[])
    rows, default = [], blocked.default_block
    try:
        for preset in args.presets:
            for rule, fn in RULES.items():
                blocked.default_block = fn
                ms = {r: 1e3 * train_step.measure(train_step.bench_config(name, shape, []), args.steps)
                      for r, name in ((1, preset), (4, f"{preset}_r4"))}
                rows.append([preset, rule, f"{ms[1]:.1f}", f"{ms[4]:.1f}", f"{ms[1] / ms[4]:.3f}"])
    finally:
        blocked.default_block = default
    print_table(f"train step per block rule, --small shapes, 4 layers, 8 x 128 tokens - {environment()}",
                ["preset", "block rule", "r=1 (ms)", "r=4 (ms)", "r=4 / r=1 tokens/s"], rows)


if __name__ == "__main__":
    main()
