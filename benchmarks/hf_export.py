"""Export time, peak host memory and folder size of `python -m rexmoe_jax.hf export` for a preset
with random weights: a run folder is written from the preset's shapes, then exported by a child
process whose peak resident memory is measured. Folder sizes at r = 1 and at the preset's r come
from the exported tensors' shapes.

    python benchmarks/hf_export.py --preset configs/moe_0p5b_a0p07b_r4.py --dtype bfloat16
    python benchmarks/hf_export.py --preset configs/moe_2p3b_a0p3b_r4.py --sizes-only
    python benchmarks/hf_export.py --run runs/r2     # a run of yours instead
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.benchmarking import write_random_params
from rexmoe_jax.config import apply_overrides, load_preset
from rexmoe_jax.hf import qwen2_moe
from rexmoe_jax.hf.export import DTYPES
from rexmoe_jax.hf.run_io import param_shapes
from rexmoe_jax.inference.restore import read_config

GB = 1e9


def folder_bytes(model, dtype: str) -> int:
    return sum(
        int(np.prod(shape)) * np.dtype(d).itemsize
        for _, shape, d in qwen2_moe.tensor_specs(model, DTYPES[dtype])
    )


def _child(command: list[str]) -> tuple[float, float]:
    """(seconds, peak resident GB) of a child process; ru_maxrss is the largest of any child so
    far, so each measurement runs in its own grandchild."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True
    ).stdout
    seconds, kib = out.split()
    return float(seconds), int(kib) * 1024 / GB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="write a run with random weights of this preset's shapes")
    source.add_argument("--run", type=pathlib.Path, help="export this run folder instead (kept as it is)")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--sizes-only", action="store_true", help="print the folder sizes; write nothing")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    config = read_config(args.run) if args.run else apply_overrides(load_preset(args.preset), args.overrides)
    model = config.model
    name = args.run or args.preset
    print(
        f"{name}: exported folder {folder_bytes(dataclasses.replace(model, reuse=1), args.dtype) / GB:.2f} GB "
        f"at r = 1, {folder_bytes(model, args.dtype) / GB:.2f} GB at r = {model.reuse} ({args.dtype})"
    )
    if args.sizes_only:
        return
    shapes = param_shapes(config)
    largest = max(int(np.prod(s.shape)) * 4 for s in shapes.values())
    with tempfile.TemporaryDirectory() as scratch:
        run, out = args.run or pathlib.Path(scratch) / "run", pathlib.Path(scratch) / "hf"
        start = time.perf_counter()
        if not args.run:
            write_random_params(run, config)
        written = time.perf_counter() - start
        baseline_s, baseline_gb = _child([sys.executable, "-c", "import rexmoe_jax.hf.__main__"])
        seconds, peak_gb = _child(
            [
                sys.executable,
                "-m",
                "rexmoe_jax.hf",
                "export",
                "--workdir",
                str(run),
                "--output",
                str(out),
                "--dtype",
                args.dtype,
            ]
        )
        size = sum(f.stat().st_size for f in out.iterdir()) / GB
        shutil.rmtree(out)
    params_gb = sum(int(np.prod(s.shape)) * 4 for s in shapes.values()) / GB
    print(
        f"{'' if args.run else f'random parameters written in {written:.0f}s; '}import alone {baseline_s:.1f}s, {baseline_gb:.2f} GB resident"
    )
    print("| preset | r | params (f32) GB | largest leaf GB | export s | peak resident GB | folder GB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {pathlib.Path(name).stem} | {model.reuse} | {params_gb:.2f} | {largest / GB:.2f} | {seconds:.0f} "
        f"| {peak_gb:.2f} | {size:.2f} |"
    )


if __name__ == "__main__":
    main()
