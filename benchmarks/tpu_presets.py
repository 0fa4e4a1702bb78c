"""The paper presets compiled for TPU slices from this machine (libtpu; nothing runs): per row,
`train.py --compile-only --target` in its own process, and a Markdown table of memory per chip,
compile time, the roofline estimate and the collectives' bytes per step (the pod table of
docs/tpu.md).

    python -m benchmarks.tpu_presets                       # every row below, one at a time
    python -m benchmarks.tpu_presets --rows 0 3            # some of them
    python -m benchmarks.tpu_presets --json runs/tpu.jsonl # also keep each report
    python -m benchmarks.tpu_presets --meshes 0 2          # other meshes for some presets on their slice

A row that does not fit prints the compiler's one line instead. Each compile takes 1 to 20
minutes on a 2-core machine (the 7B rows the longest).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 1024 ** 3
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")

# (preset, target, overrides): each paper preset at r = 1 and its largest r on the smallest v5p
# and v6e slice it fits with its own settings (remat, bf16, grad_accum=16, or 8 where 64 batch
# shards need 64 sequences per micro-batch), and the mesh it was
# compiled with there (docs/tpu.md, "The paper presets on TPU slices"). The slice below each
# (where there is one) did not fit.
ROWS = (
    ("moe_0p5b_a0p07b", "v5p-8", ["mesh.expert=4", "optim.grad_accum=16"]),
    ("moe_0p5b_a0p07b_r4", "v5p-8", ["mesh.expert=4", "optim.grad_accum=16"]),
    ("moe_2p3b_a0p3b", "v5p-16", ["mesh.expert=8", "optim.grad_accum=16"]),
    ("moe_2p3b_a0p3b_r4", "v5p-16", ["mesh.expert=8", "optim.grad_accum=16"]),
    ("moe_7b_a3b_se", "v5p-32", ["mesh.fsdp=2", "mesh.expert=8", "optim.grad_accum=16"]),
    ("moe_7b_a3b_se_r3", "v5p-32", ["mesh.fsdp=2", "mesh.expert=8", "optim.grad_accum=16"]),
    ("moe_0p5b_a0p07b", "v6e-8", ["mesh.expert=8", "optim.grad_accum=16"]),
    ("moe_0p5b_a0p07b_r4", "v6e-8", ["mesh.expert=8", "optim.grad_accum=16"]),
    ("moe_2p3b_a0p3b", "v6e-8", ["mesh.expert=8", "optim.grad_accum=16"]),
    ("moe_2p3b_a0p3b_r4", "v6e-8", ["mesh.expert=8", "optim.grad_accum=16"]),
    # 7B on v6e-32 (fsdp 4 x expert 8) planned 32.4 GiB per chip of 29.8. On 64 chips the batch axes
    # need a micro-batch of 64 sequences, so 8 of them (the same 512 sequences per step).
    ("moe_7b_a3b_se", "v6e-64", ["mesh.fsdp=8", "mesh.expert=8", "optim.grad_accum=8"]),
    ("moe_7b_a3b_se_r3", "v6e-64", ["mesh.fsdp=8", "mesh.expert=8", "optim.grad_accum=8"]),
)

# Other meshes for the r = 1 presets on their smallest slices (the row's own mesh first), to
# find the one the roofline estimate prefers: (preset, target, [overrides of each mesh]).
# "mesh.data=-1" alone is the default, every device on the data axis.
MESHES = (
    ("moe_0p5b_a0p07b", "v5p-8", [["mesh.expert=4"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=4"],
                                  ["mesh.data=2", "mesh.expert=2"]]),
    ("moe_2p3b_a0p3b", "v5p-16", [["mesh.expert=8"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=8"],
                                  ["mesh.data=2", "mesh.expert=4"]]),
    ("moe_0p5b_a0p07b", "v6e-8", [["mesh.expert=8"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=8"],
                                  ["mesh.data=2", "mesh.expert=4"]]),
    ("moe_2p3b_a0p3b", "v6e-8", [["mesh.expert=8"], ["mesh.data=1", "mesh.fsdp=8"],
                                 ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"]]),
    ("moe_7b_a3b_se", "v5p-32", [["mesh.fsdp=2", "mesh.expert=8"], ["mesh.fsdp=4", "mesh.expert=4"],
                                 ["mesh.data=1", "mesh.fsdp=16"]]),
    ("moe_7b_a3b_se", "v6e-64", [["mesh.fsdp=8", "mesh.expert=8", "optim.grad_accum=8"],
                                 ["mesh.fsdp=4", "mesh.expert=16", "optim.grad_accum=8"],
                                 ["mesh.fsdp=16", "mesh.expert=4", "optim.grad_accum=8"]]),
)


def compile_row(preset: str, target: str, overrides: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{preset}.py"),
               "--compile-only", "--target", target, *overrides]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode == 0 and last.startswith("{"):
        return json.loads(last)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return {"error": errors[-1] if errors else done.stderr.strip().splitlines()[-1]}


def table_row(preset: str, target: str, overrides: list[str], report: dict) -> str:
    settings = " ".join(overrides)
    if "error" in report:
        return f"| `{preset}` | {target} | `{settings}` | does not fit: {report['error']} |||||"
    roof = report["roofline_estimate"]
    bound = "at least " if report["loops_of_unknown_length"] else ""
    collectives = ", ".join(f"{kind} {c['bytes'] / GIB:.1f}" for kind, c in report["collectives"].items())
    return (f"| `{preset}` | {target} | `{settings}` | {report['total_bytes_per_device'] / GIB:.1f} "
            f"({report['argument_size_in_bytes'] / GIB:.1f} state) | {report['compile_seconds']:.0f} s | "
            f"{bound}{roof['step_seconds']:.2f} s | {100 * roof['mfu']:.0f}% | {collectives} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="indices into ROWS (default: all)")
    parser.add_argument("--meshes", type=int, nargs="*", default=None,
                        help="indices into MESHES: compile each of those meshes instead of ROWS")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="append each report to this JSON Lines file")
    args = parser.parse_args(argv)
    if args.meshes is not None:
        jobs = [(preset, target, mesh) for index in args.meshes for preset, target, meshes in [MESHES[index]]
                for mesh in meshes]
    else:
        jobs = [ROWS[index] for index in (args.rows if args.rows is not None else range(len(ROWS)))]
    print("| preset | slice | settings | GiB per chip | compile | step (estimate) | MFU (estimate) "
          "| GiB per step and chip, by collective |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, target, overrides in jobs:
        report = compile_row(preset, target, overrides)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps({"preset": preset, "target": target, "overrides": overrides, **report}) + "\n")
        print(table_row(preset, target, overrides, report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
