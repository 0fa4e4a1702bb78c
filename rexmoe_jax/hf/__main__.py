"""Hugging Face in and out.

    python -m rexmoe_jax.hf export --workdir RUN --output DIR [--dtype bfloat16] [--max-shard-gb 5]
    python -m rexmoe_jax.hf import --model DIR --workdir RUN [section.field=value ...]
    python -m rexmoe_jax.hf widen --workdir RUN --reuse R --output RUN2 [section.field=value ...]

A bad input (a folder without config, an unsupported model or option, shapes that disagree with
the config, a truncated file, an --output or --workdir that is not empty) stops with one line
naming it and exit status 2, and writes nothing; a write that fails (no space, no permission)
stops with one line and exit status 4, leaving nothing behind. A damaged newest checkpoint is
skipped for the newest readable one, with a note, as evaluate and generate do.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

from rexmoe_jax import cli
from rexmoe_jax.cli import BadInput, WriteFailed
from rexmoe_jax.hf.export import export
from rexmoe_jax.hf.importer import import_model
from rexmoe_jax.hf.run_io import PRESET, UnreadableLeaf, checkpoint_leaves, newest_readable
from rexmoe_jax.hf.widen import widen
from rexmoe_jax.inference.restore import read_config
from rexmoe_jax.runtime.workdir import failure_reason


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m rexmoe_jax.hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="a run's newest checkpoint as a transformers Qwen2-MoE folder")
    out.add_argument("--workdir", required=True, type=pathlib.Path)
    out.add_argument("--output", required=True, type=pathlib.Path)
    out.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    out.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (default 5)")
    into = commands.add_parser("import", help="a Qwen2-MoE or Mixtral folder as a new run")
    into.add_argument("--model", required=True, type=pathlib.Path)
    into.add_argument("--workdir", required=True, type=pathlib.Path)
    into.add_argument("overrides", nargs="*", metavar="section.field=value")
    grow = commands.add_parser("widen", help="an r = 1 run as a ReXMoE run at r = --reuse")
    grow.add_argument("--workdir", required=True, type=pathlib.Path)
    grow.add_argument("--reuse", required=True, type=int)
    grow.add_argument("--output", required=True, type=pathlib.Path)
    grow.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    """Does the command; returns the line that reports it."""
    start = time.perf_counter()
    if args.command == "import":
        config = import_model(args.model, args.workdir, args.overrides)
        m = config.model
        return (
            f"imported {args.model} into {args.workdir}: {m.num_layers} layers, {m.num_experts} experts per "
            f"layer, r = {m.reuse}, renormalize_gates={m.renormalize_gates}; {_continue(args.workdir)}"
        )
    if args.command == "export" and not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise BadInput(f"--max-shard-gb must be a positive number of GB, got {args.max_shard_gb}")
    config = read_config(args.workdir)
    leaves = checkpoint_leaves(args.workdir, config)
    try:
        return _write(args, config, leaves, start)
    except UnreadableLeaf as err:
        print(f"note: {err}; using the newest readable checkpoint", file=sys.stderr, flush=True)
        return _write(args, config, newest_readable(args.workdir), start)


def _write(args: argparse.Namespace, config, leaves, start: float) -> str:
    if args.command == "export":
        summary = export(
            config, leaves, args.output, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3)
        )
        return (
            f"exported step {summary['step']} of {args.workdir} to {args.output} as Qwen2-MoE: "
            f"{summary['experts_per_layer']} experts per layer, {summary['bytes'] / 1e6:.1f} MB of {args.dtype} "
            f"weights in {len(summary['files'])} file(s), {time.perf_counter() - start:.1f}s"
        )
    wide = widen(config, leaves, args.reuse, args.output, args.overrides)
    return (
        f"widened step {leaves.step} of {args.workdir} to r = {args.reuse} in {args.output}; PSR "
        f"{wide.psr.schedule} from step {wide.psr.start_step} to {wide.psr.end_step}, order "
        f"{wide.psr.order}; {_continue(args.output)}"
    )


def _continue(workdir: pathlib.Path) -> str:
    return f"continue it with: python train.py --config {workdir / PRESET} --workdir {workdir}"


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        print(run(args), flush=True)
    except OSError as err:  # the commands write into new folders that a failure removes again
        target = args.workdir if args.command == "import" else args.output
        raise WriteFailed(f"{failure_reason(err)} while writing {target}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
