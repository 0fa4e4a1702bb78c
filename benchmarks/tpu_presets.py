"""The paper presets compiled for TPU slices from this machine (libtpu; nothing runs): per row,
`train.py --compile-only --target` in its own process, and a Markdown table of memory per device,
compile time, the roofline estimate and the bytes each kind of collective sends per step (the
pod table of the README; the meshes compared in docs/tpu.md).

    python -m benchmarks.tpu_presets                       # every row below, one at a time
    python -m benchmarks.tpu_presets --rows 0 3            # some of them
    python -m benchmarks.tpu_presets --json runs/tpu.jsonl # also keep each report
    python -m benchmarks.tpu_presets --set compute.attention=flash  # every row with an override
    python -m benchmarks.tpu_presets --meshes 0 2          # other meshes for some presets on their slice
    python -m benchmarks.tpu_presets --table runs/tpu.jsonl # the table of saved reports, compiling nothing
    python -m benchmarks.tpu_presets --attention benchmarks/tpu_attention_results.jsonl  # XLA against flash

A row that does not fit prints the compiler's one line instead. Each compile takes 5 to 27
minutes on a loaded 2-core machine (the 7B rows the longest).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from rexmoe_jax.compile.hlo import KINDS

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 1024 ** 3

# (preset, target, overrides): each paper preset at r = 1 and its largest r on the smallest v5p
# and v6e slice it fits with a tenth of HBM free, with the preset's own settings (remat, bf16,
# flash attention, its mesh and micro-batches for that slice from its SLICES); the slice below
# each (where there is one) did not fit (docs/tpu.md, "The paper presets on TPU slices").
ROWS = tuple((preset, target, []) for preset, target in (
    ("moe_0p5b_a0p07b", "v5p-8"), ("moe_0p5b_a0p07b_r4", "v5p-8"),
    ("moe_2p3b_a0p3b", "v5p-8"), ("moe_2p3b_a0p3b_r4", "v5p-8"),
    ("moe_7b_a3b_se", "v5p-16"), ("moe_7b_a3b_se_r3", "v5p-32"),
    ("moe_0p5b_a0p07b", "v6e-1"), ("moe_0p5b_a0p07b_r4", "v6e-1"),
    ("moe_2p3b_a0p3b", "v6e-4"), ("moe_2p3b_a0p3b_r4", "v6e-4"),
    ("moe_7b_a3b_se", "v6e-32"), ("moe_7b_a3b_se_r3", "v6e-32"),
))

# Meshes for the r = 1 presets on one slice each, to find the one the roofline estimate prefers
# (docs/tpu.md, "Which mesh"): (preset, target, [overrides of each mesh]). "mesh.data=-1" alone
# is the default, every device on the data axis. The 7B entries (4 and 5) were compared for fit
# only, one slice below 7B's earlier rows.
MESHES = (
    ("moe_0p5b_a0p07b", "v5p-8", [["mesh.expert=4"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=4"],
                                  ["mesh.data=2", "mesh.expert=2"]]),
    ("moe_2p3b_a0p3b", "v5p-16", [["mesh.expert=8"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=8"],
                                  ["mesh.data=2", "mesh.expert=4"]]),
    ("moe_0p5b_a0p07b", "v6e-8", [["mesh.expert=8"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=8"],
                                  ["mesh.data=2", "mesh.expert=4"]]),
    ("moe_2p3b_a0p3b", "v6e-8", [["mesh.expert=8"], ["mesh.data=1", "mesh.fsdp=8"],
                                 ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"]]),
    ("moe_7b_a3b_se", "v5p-16", [["mesh.fsdp=2", "mesh.expert=4", "optim.grad_accum=16"],
                                 ["mesh.data=1", "mesh.fsdp=8", "optim.grad_accum=16"],
                                 ["mesh.data=1", "mesh.fsdp=8", "optim.grad_accum=32"]]),
    ("moe_7b_a3b_se", "v6e-32", [["mesh.fsdp=4", "mesh.expert=8", "optim.grad_accum=16"],
                                 ["mesh.fsdp=2", "mesh.expert=8", "mesh.tensor=2", "optim.grad_accum=32"],
                                 ["mesh.fsdp=2", "mesh.expert=4", "mesh.tensor=4", "optim.grad_accum=64"]]),
    # TPU7x (two devices a chip), with the defaults (flash attention): docs/tpu.md, "TPU7x".
    ("moe_2p3b_a0p3b", "tpu7x-8", [["mesh.expert=8"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=8"],
                                   ["mesh.data=2", "mesh.expert=4"]]),
    ("moe_0p5b_a0p07b", "tpu7x-8", [["mesh.expert=8"], ["mesh.data=-1"], ["mesh.data=1", "mesh.fsdp=8"],
                                    ["mesh.data=2", "mesh.expert=4"]]),
    ("moe_7b_a3b_se", "tpu7x-8", [["mesh.data=1", "mesh.fsdp=8", "optim.grad_accum=32"],
                                  ["mesh.fsdp=2", "mesh.expert=4", "optim.grad_accum=32"]]),
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


def settings(report: dict) -> str:
    """The mesh axes above 1 and the micro-batches a report was compiled with."""
    axes = " x ".join(f"{axis} {n}" for axis, n in report["mesh"].items() if n > 1) or "one device"
    return f"{axes}, {report['micro_batches']} micro-batches"


HEADER = ("| preset | slice, mesh | GiB per device (state + temporaries) | compile | step, estimate "
          "| MFU, estimate | " + " | ".join(KINDS) + " |\n|" + "---|" * (6 + len(KINDS)))


def table_row(preset: str, target: str, overrides: list[str], report: dict) -> str:
    """One row of HEADER: the step estimate's longest term named, the collectives as GiB sent
    per device and step (a device is a chip, or half a TPU7x chip)."""
    given = f" `{' '.join(overrides)}`" if overrides else ""
    if "error" in report:
        return f"| `{preset}` | {target}{given} | does not fit: {report['error']} |" + " |" * (4 + len(KINDS))
    roof, gib = report["roofline_estimate"], report["hbm_capacity_per_device"] / GIB
    low, high = ("at least ", "at most ") if report["loops_of_unknown_length"] else ("", "")
    # Reports from before the bytes sent were counted (7B's) give their results' bytes, starred.
    counted = all("sent_bytes" in c for c in report["collectives"].values())
    field, star = ("sent_bytes", "") if counted else ("bytes", "*")
    sent = [report["collectives"].get(kind, {}).get(field, 0) / GIB for kind in KINDS]
    state, temps = report["argument_size_in_bytes"] / GIB, report["temp_size_in_bytes"] / GIB
    return (f"| `{preset}` | {target}, {settings(report)}{given} | "
            f"{report['total_bytes_per_device'] / GIB:.1f} ({state:.1f} + {temps:.1f}) of {gib:.1f} | "
            f"{report['compile_seconds']:.0f} s | {low}{roof['step_seconds']:.1f} s, "
            f"{roof['bound']}-bound | {high}{100 * roof['mfu']:.1f}% | "
            + " | ".join(f"{x:.1f}{star}" if x else "0" for x in sent) + " |")


def attention_rows(reports: list[dict]) -> str:
    """Each (preset, slice) compiled with compute.attention=xla and =flash, side by side: GiB per
    chip, TiB of HBM traffic per chip and step, and the step estimate."""
    by_key = {(r["preset"], r["target"], " ".join(r["overrides"])): r for r in reports}

    def cells(r: dict) -> str:
        low = "at least " if r["loops_of_unknown_length"] else ""
        roof = r["roofline_estimate"]
        return (f"{r['total_bytes_per_device'] / GIB:.1f} | {r['hbm_bytes_per_device'] / 2 ** 40:.1f} | "
                f"{low}{roof['step_seconds']:.1f} s, {roof['bound']}-bound")

    lines = ["| preset, slice | XLA: GiB per chip | TiB of HBM traffic | step, estimate | flash: GiB per chip "
             "| TiB of HBM traffic | step, estimate |", "|" + "---|" * 7]
    for (preset, target, given), xla in by_key.items():
        flash = by_key.get((preset, target, "compute.attention=flash"))
        if given == "compute.attention=xla" and flash:
            lines.append(f"| `{preset}`, {target} | {cells(xla)} | {cells(flash)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="indices into ROWS (default: all)")
    parser.add_argument("--meshes", type=int, nargs="*", default=None,
                        help="indices into MESHES: compile each of those meshes instead of ROWS")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides added to every row compiled, e.g. compute.attention=flash")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="append each report to this JSON Lines file")
    parser.add_argument("--table", type=pathlib.Path, default=None,
                        help="print the table of the reports saved in this JSON Lines file (--json) instead")
    parser.add_argument("--attention", type=pathlib.Path, default=None,
                        help="print the XLA against flash attention table of the reports in this file")
    args = parser.parse_args(argv)
    if args.attention:
        print(attention_rows([json.loads(line) for line in args.attention.read_text().splitlines()]))
        return 0
    if args.meshes is not None:
        jobs = [(preset, target, mesh) for index in args.meshes for preset, target, meshes in [MESHES[index]]
                for mesh in meshes]
    else:
        jobs = [ROWS[index] for index in (args.rows if args.rows is not None else range(len(ROWS)))]
    print(HEADER)
    if args.table:
        for line in args.table.read_text().splitlines():
            saved = json.loads(line)
            print(table_row(saved.pop("preset"), saved.pop("target"), saved.pop("overrides"), saved))
        return 0
    for preset, target, overrides in jobs:
        overrides = [*overrides, *args.set]
        report = compile_row(preset, target, overrides)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps({"preset": preset, "target": target, "overrides": overrides, **report}) + "\n")
        print(table_row(preset, target, overrides, report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
