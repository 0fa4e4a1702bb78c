"""Trains a ReXMoE model.

    python train.py                                   # the default small ReXMoE on the embedded corpus
    python train.py --config configs/NAME.py --workdir DIR key=value ...
    python train.py --config configs/NAME.py --dry-run     # sizes only; last line is JSON
    python train.py --workdir DIR2 --from DIR/checkpoints/STEP optim.schedule=wsd ...
                                                         # a new run from another's checkpoint
    python train.py --config configs/NAME.py --compile-only mesh.data=8 mesh.expert=8 \
        --simulate-devices 64                            # per-device memory of a mesh, on a CPU
    python train.py --config configs/NAME.py --compile-only --target v5p-64 mesh.fsdp=4 mesh.expert=8
                                                         # what the TPU compiler plans for a slice

Overrides name a config field by section and field (model.reuse=4, psr.schedule=linear,
train.steps=1000); an unknown key or a value of the wrong type is an error. On a TPU slice that a
preset names in its SLICES (with --target, or running there), the preset's mesh and micro-batches
for it come first; the command line's overrides win (a mesh given there replaces the slice's).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from rexmoe_jax import cli, targets
from rexmoe_jax.config import apply_overrides, load_preset, load_slices
from rexmoe_jax.runtime import distributed
from rexmoe_jax.runtime.preemption import StopRequest
from rexmoe_jax.runtime.workdir import CONFIG_FILE, checkpoint_source, has_checkpoints

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "tiny.py"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="preset file defining get_config(), or a run's config.json (default: the "
                             "--workdir's config.json when it has one, else --from's run's, else "
                             "configs/tiny.py)")
    parser.add_argument("--workdir", default=None,
                        help="run folder for metrics and checkpoints (default: runs/<preset>-<time>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model without training; print its sizes as JSON")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the train step for the mesh and print what the compiler plans: "
                             "per-device memory, FLOPs and bytes, collectives")
    parser.add_argument("--target", default=None, metavar="SLICE",
                        help="with --compile-only: compile for a TPU slice (v5p-64, v6e-8, v4-32, tpu7x-8, "
                             "v5e-16 / v5litepod-16, 2xv5p-64 for two slices) from this machine, with libtpu")
    parser.add_argument("--hlo-out", default=None, metavar="FILE",
                        help="with --compile-only: also write the compiled step's HLO text there")
    parser.add_argument("--simulate-devices", type=int, default=0, metavar="N",
                        help="run on N simulated CPU devices (to try a mesh without the hardware)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                             "JAX_PROCESS_ID, or detected on Cloud TPU, SLURM and Open MPI")
    parser.add_argument("--init-timeout", type=int, default=300, metavar="SECONDS",
                        help="--distributed: give up joining the coordinator after this long (default 300)")
    parser.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS",
                        help="--distributed: a process silent this long is dead and the others exit "
                             "(default 100)")
    parser.add_argument("--from", dest="source", default=None, metavar="RUN[/checkpoints/STEP]",
                        help="start a new --workdir from another run's checkpoint (its newest, or STEP): "
                             "weights, optimizer state, step and place in the data, under this command's "
                             "config; the other run is only read")
    parser.add_argument("--start-over", action="store_true",
                        help="train again from step 0 in --workdir when every checkpoint there is unreadable "
                             "(set aside as *.corrupt), or when it holds another run's config.json or "
                             "records but no checkpoint (both replaced)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_args(argv)


def describe(config) -> str:
    lines = []
    for section, fields in config.to_dict().items():
        lines.append(f"  {section}: " + " ".join(f"{k}={v!r}" for k, v in fields.items()))
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    """Exit statuses: rexmoe_jax.cli."""
    # First, before jax is imported: a preemption during start-up still ends in a checkpoint.
    stop = StopRequest().install() if argv is None else StopRequest()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    source_run = _check_source(args)
    if args.config is None:
        args.config = str(default_config(args.workdir, source_run))
    preset, slices = load_preset(args.config), load_slices(args.config)
    config = for_slice(args, preset, slices, targets.parse(args.target) if args.target else None)

    if args.target and not args.compile_only:
        print("error: --target compiles for a TPU slice without running; add --compile-only", file=sys.stderr)
        return 2
    if args.target:  # Before jax is imported: this machine's own backend is only the host.
        os.environ["JAX_PLATFORMS"] = "cpu"
    distributed.simulate_devices(args.simulate_devices)  # before jax is imported
    if not args.distributed and int(os.environ.get("JAX_NUM_PROCESSES") or 1) > 1:
        raise cli.BadInput(f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']} is set: pass --distributed to "
                           "join the other processes")
    if args.distributed:
        distributed.initialize(args.init_timeout, args.heartbeat_timeout, stop)
    try:
        return _run(args, preset, slices, config, stop)
    finally:
        distributed.finish()
        stop.release()


def _check_source(args: argparse.Namespace) -> pathlib.Path | None:
    """--from's run folder, checked before jax is imported, where it will be used: not once
    --workdir has checkpoints of its own (the source may be gone by then)."""
    if args.source is None:
        return None
    if args.dry_run or args.compile_only:
        raise cli.BadInput("--from starts a training run; leave it out with --dry-run and --compile-only")
    if args.workdir and has_checkpoints(pathlib.Path(args.workdir)):
        return None
    return checkpoint_source(pathlib.Path(args.source))[0]


def default_config(workdir: str | None, source_run: pathlib.Path | None) -> pathlib.Path:
    """The config of a command that names none: the run's own (resuming it), else that of the
    run it starts from (--from), else the default preset."""
    for folder in (pathlib.Path(workdir) if workdir else None, source_run):
        if folder is not None and (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return DEFAULT_CONFIG


def for_slice(args: argparse.Namespace, preset, slices: dict, target: targets.Target | None):
    """The run's config on `target` (None: no TPU slice): the preset, its settings for that
    slice (its `slices`, load_slices; every slice they name is checked), then the command
    line's overrides."""
    settings = targets.slice_settings(slices, target, args.overrides)
    if settings:
        print(f"settings for {target.name} from {args.config}: {' '.join(settings)} "
              "(an override on the command line replaces them)", flush=True)
    return apply_overrides(preset, [*settings, *args.overrides])


def _run(args: argparse.Namespace, preset, slices: dict, config, stop: StopRequest) -> int:
    import jax

    from rexmoe_jax import loop, trainer  # Imports jax: after the cheap argument checks.

    if jax.process_index() != 0:  # Only process 0 prints; every process trains.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if not args.target and (here := targets.slice_of(jax.devices())):  # running on a TPU slice
        config = for_slice(args, preset, slices, here)

    print(f"config {args.config}:\n{describe(config)}", flush=True)
    sizes = trainer.summary(config)
    print(f"parameters: {sizes['params_total']:,} total, {sizes['params_active']:,} active "
          f"(excluding embeddings); pool {sizes['pool_size']} experts per layer in "
          f"{sizes['num_groups']} groups; {sizes['tokens_per_step']:,} tokens per step", flush=True)
    if args.dry_run:
        print(json.dumps(sizes))
        return 0
    if args.compile_only:
        from rexmoe_jax.compile import report as compile_report

        # A bad mesh, an unknown target or a step too big for the chip (refused by the compiler or
        # planned larger than its HBM) is a ConfigError: one line.
        report = compile_report.compile_report(config, targets.parse(args.target) if args.target else None,
                                               args.hlo_out)
        print(compile_report.describe(report))
        print(json.dumps(report))
        compile_report.check_fits(report, config)  # after the report, which a too-big plan keeps
        return 0
    workdir = pathlib.Path(args.workdir) if args.workdir else (
        HERE / "runs" / f"{_run_name(pathlib.Path(args.config))}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        result = loop.run(config, workdir, stop=stop, start_over=args.start_over, source=args.source)
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        distributed.exit_lost(err)  # a collective failed: another process is gone
    if "eval_ppl" in result:
        print(f"held-out perplexity: {result['eval_ppl']:.2f} (loss {result['eval_loss']:.4f})")
    if "sample" in result:
        print(f"sample: {result['sample']}")
    return 0


def _run_name(config: pathlib.Path) -> str:
    """A new run folder's name: its preset's, or for a run's config.json that run's."""
    return config.parent.name if config.name == CONFIG_FILE else config.stem


if __name__ == "__main__":
    sys.exit(main())
