"""Benchmark: what the per-step stop vote (distributed.StopVote) costs a multi-process run, by the
clock: the train step with and without the vote, in the same processes, and one vote alone.

    python -m benchmarks.agreement [--processes 2] [--devices 2] [--steps 20] [--rounds 3] [key=value ...]

Starts --processes local processes (rexmoe_jax.launch) of --devices simulated CPU devices each,
gloo collectives between them, mesh data=processes x expert=devices; `configs/tiny.py` by
default, with any overrides. Each process runs the train step in --rounds rounds of --steps
steps with the vote and --steps without, alternately, the host loop's way: the metrics of the
previous step are read after the next one is dispatched (train.log_every=1), and a vote cast at
one step is read at the next. "Vote alone" is one vote's round trip with no step in flight:
what the vote would cost if the host had nothing else to wait for. Process 0 prints the table
(medians over rounds; the spread is the rounds' range).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2, help="simulated CPU devices per process")
    parser.add_argument("--steps", type=int, default=20, help="steps per round and setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_args(argv)


def _launch(args, argv) -> int:
    """This script again as --processes processes of one JAX run."""
    from rexmoe_jax.runtime import launch
    from rexmoe_jax.runtime.distributed import CPU_DEVICES_XLA_FLAGS, with_xla_flags

    os.environ.update(JAX_PLATFORMS="cpu", XLA_FLAGS=with_xla_flags(
        f"--xla_force_host_platform_device_count={args.devices}", CPU_DEVICES_XLA_FLAGS))
    group = launch.Group(["-m", "benchmarks.agreement", *argv], args.processes, launch.free_port(), grace=30)
    return group.wait()


def _per_step(step_fn, state, batch, vote, steps: int):
    """Seconds per step over `steps` steps run as the loop runs them; returns (seconds, state)."""
    import jax

    from rexmoe_jax import sharding

    pending = None
    start = time.perf_counter()
    for _ in range(steps):
        with sharding.activate(batch.sharding.mesh):
            state, metrics = step_fn(state, batch)
        if pending is not None:
            float(pending)  # the previous step's loss: the loop's one-step-late metrics
        pending = metrics["loss"]
        if vote is not None:
            vote(False)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps, state


def _measure(args) -> None:
    import jax
    import numpy as np

    from benchmarks.benchmarking import environment, print_table
    from rexmoe_jax import loop, sharding, trainer
    from rexmoe_jax.config import apply_overrides, load_preset
    from rexmoe_jax.optimizer import make_optimizer
    from rexmoe_jax.runtime import distributed

    distributed.initialize(init_timeout=120, heartbeat_timeout=30)
    mesh_overrides = [f"mesh.data={args.processes}", f"mesh.expert={args.devices}"]
    config = apply_overrides(load_preset(CONFIGS / "tiny.py"), mesh_overrides + args.overrides)
    mesh = sharding.make_mesh(config.mesh)
    model, tx = trainer.build_model(config), make_optimizer(config.optim, config.train.steps)
    shardings = trainer.state_shardings(config, model, tx, mesh)
    state = trainer.init_state(config, model, tx, shardings)
    train_step, _ = loop.jitted_steps(config, model, tx, mesh, shardings)
    blocks, count = sharding.process_rows(mesh, config.data.batch_size)
    shape = (config.data.batch_size // count * len(blocks), config.data.seq_len + 1)
    rows = np.random.default_rng(blocks[0]).integers(0, config.model.vocab_size, shape, dtype=np.int32)
    batch = sharding.put_batch(rows, mesh)
    # Everything compiled before the first collective, then a barrier, as the loop does: a
    # process that compiles (or reads the compilation cache) 30 s later than another would
    # fail the first collective (distributed.barrier).
    with sharding.activate(mesh):
        train_step = train_step.lower(state, batch).compile()
    votes = iter([distributed.StopVote(mesh) for _ in range(1 + 2 * args.rounds)])  # each compiles its gather
    distributed.barrier("compiled")
    _, state = _per_step(train_step, state, batch, next(votes), 3)  # warm up
    distributed.barrier("benchmark")
    timings = {"without": [], "with": [], "alone": []}
    for _ in range(args.rounds):
        seconds, state = _per_step(train_step, state, batch, None, args.steps)
        timings["without"].append(seconds)
        seconds, state = _per_step(train_step, state, batch, next(votes), args.steps)
        timings["with"].append(seconds)
        vote = next(votes)
        vote(False)
        start = time.perf_counter()
        for _ in range(args.steps):
            vote(False)
        timings["alone"].append((time.perf_counter() - start) / args.steps)
    if jax.process_index() == 0:
        ms = {k: 1000 * float(np.median(v)) for k, v in timings.items()}
        added = ms["with"] - ms["without"]
        spread = {k: f"{1000 * min(v):.2f}-{1000 * max(v):.2f}" for k, v in timings.items()}
        print_table(f"the stop vote: {args.processes} processes x {args.devices} devices (mesh "
                    f"{dict(mesh.shape)}), configs/tiny.py {' '.join(args.overrides) or 'as it is'}, "
                    f"{config.tokens_per_step:,} tokens per step; {environment()}",
                    ["", "ms per step (median)", "range over rounds", "vs without"],
                    [["train step, no vote", f"{ms['without']:.2f}", spread["without"], ""],
                     ["train step + vote", f"{ms['with']:.2f}", spread["with"],
                      f"{added:+.2f} ms ({100 * added / ms['without']:+.1f}%)"],
                     ["vote alone (round trip)", f"{ms['alone']:.3f}", spread["alone"], ""]])
    distributed.finish()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if "JAX_PROCESS_ID" not in os.environ:
        return _launch(args, argv)
    _measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
