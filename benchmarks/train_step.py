"""Benchmark: whole train steps of the paper presets on one device: tokens/s and model FLOPs
utilisation, r = 1 against r = 4 and against the dense model with the same active FLOPs.

    python -m benchmarks.train_step [--presets moe_0p5b_a0p07b moe_2p3b_a0p3b] [--layers L]
        [--batch B] [--seq S] [--steps N] [--small] [key=value ...]

--layers shortens the stack when one device cannot hold the whole model (the table says so).
Each preset gives three rows, measured one after the other in this run: its dense twin
(model.ffn=dense: every FFN one SwiGLU of width K*F, the same d, layers and attention), its
r = 1 MoE and its r = 4 MoE. MFU = tokens/s x training FLOPs per token
(rexmoe_jax.model.metrics.flops_per_token) / a dense matmul's FLOP/s measured at the start of the
same run in the steps' compute dtype (benchmarking.ceilings), so every device gets one; where
the device's datasheet peak is known, MFU against it is shown too. "/ dense" is an MoE row's
tokens/s over the dense row's (the issue's target: r = 1 at 0.8 or more), and the last column
the r = 4 run's tokens/s over the r = 1 run's (the paper's minimal overhead: target 0.97).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.benchmarking import ceilings, environment, print_table
from rexmoe_jax import trainer
from rexmoe_jax.config import apply_overrides, load_preset
from rexmoe_jax.model import metrics
from rexmoe_jax.optimizer import make_optimizer

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def prepare(config):
    """The jitted train step (state donated), an initial state and a batch of random tokens."""
    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, max(config.train.steps, 10))
    state = trainer.init_state(config, model, tx)
    step = jax.jit(trainer.make_train_step(config, model, tx), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1)),
                        jnp.int32)
    return step, state, batch


def measure(config, steps: int) -> float:
    """Seconds per train step: the median over `steps` steps after two warm-up steps."""
    step, state, batch = prepare(config)
    for _ in range(2):
        state, out = step(state, batch)
    jax.block_until_ready(out["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready(out["loss"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["moe_0p5b_a0p07b", "moe_2p3b_a0p3b"])
    parser.add_argument("--layers", type=int, default=0, help="shorten the stack to L layers (0: as the preset)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="tiny dimensions, for a CPU")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    ceiling = None  # measured once, in the first config's compute dtype
    rows = []
    for preset in args.presets:
        tokens = {}
        for variant, name, extra in (("dense", preset, ["model.ffn=dense"]), (1, preset, []),
                                     (4, f"{preset}_r4", [])):
            config = bench_config(name, args, extra)
            if ceiling is None:
                dtype = jnp.dtype(config.compute.dtype)
                ceiling = ceilings(args.small, iters=max(args.steps, 3), matmul_dtype=dtype)["matmul_flops"]
            peak = metrics.device_peak_flops(jax.devices()[0], config.compute.dtype)
            seconds = measure(config, args.steps)
            tokens[variant] = config.tokens_per_step / seconds
            active = trainer.summary(config)["params_active"]
            flops = metrics.flops_per_token(config.model, config.data.seq_len, active)
            rows.append([
                f"{name} (dense, FFN {config.model.dense_ffn})" if variant == "dense" else name,
                f"{config.model.num_layers}" + (" (shortened)" if args.layers else ""),
                f"{config.data.batch_size} x {config.data.seq_len}", f"{seconds * 1e3:.1f}",
                f"{tokens[variant]:,.0f}", f"{flops / 1e6:,.1f}",
                f"{100 * tokens[variant] * flops / ceiling:.1f}%",
                f"{100 * tokens[variant] * flops / peak:.1f}%" if peak else "n/a (peak unknown)",
                "" if variant == "dense" else f"{tokens[variant] / tokens['dense']:.3f}",
                f"{tokens[4] / tokens[1]:.3f}" if variant == 4 else ""])
    print_table(f"train step on one device, full pool (PSR off), the presets' dtype; same-run matmul ceiling "
                f"{ceiling / 1e9:,.1f} GFLOP/s ({dtype.name}) - {environment()}",
                ["model", "layers", "batch x seq", "step (ms)", "tokens/s", "MFLOP/token", "MFU of ceiling",
                 "MFU of peak", "/ dense", "r=4 / r=1"], rows)


def bench_config(name: str, args, extra: list[str]):
    """A preset at the benchmark's batch, sequence and depth (and tiny widths with --small), in
    one micro-batch, PSR off, with `extra` and the command line's overrides applied last."""
    overrides = [f"data.batch_size={args.batch}", f"data.seq_len={args.seq}", "psr.schedule=none",
                 "optim.grad_accum=1"]
    if args.layers:
        overrides.append(f"model.num_layers={args.layers}")
    if args.small:
        overrides += ["model.d_model=64", "model.expert_ffn=32", "model.num_heads=4", "model.num_kv_heads=2",
                      "model.vocab_size=512", "compute.dtype=float32", "compute.remat=none"]
    return apply_overrides(load_preset(CONFIGS / f"{name}.py"), overrides + extra + args.overrides)


if __name__ == "__main__":
    main()
