"""Benchmark: whole train steps of the paper presets on one device: tokens/s and model FLOPs
utilisation, r = 1 against r = 4 at the same dimensions.

    python -m benchmarks.train_step [--presets moe_0p5b_a0p07b moe_2p3b_a0p3b] [--layers L]
        [--batch B] [--seq S] [--steps N] [--small] [key=value ...]

--layers shortens the stack when one device cannot hold the whole model (the table says so).
MFU = tokens/s x training FLOPs per token (rexmoe_jax.metrics.flops_per_token) / the device's
dense bf16 peak; it is shown only where that peak is known. The last column is the r = 4 run's
tokens/s over the r = 1 run's (the paper's claim of minimal overhead: the target is 0.97).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.benchmarking import environment, print_table
from rexmoe_jax import metrics, trainer
from rexmoe_jax.config import apply_overrides, load_preset
from rexmoe_jax.optimizer import make_optimizer

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def measure(config, steps: int) -> float:
    """Seconds per train step: the median over `steps` steps after two warm-up steps."""
    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, max(config.train.steps, 10))
    state = trainer.init_state(config, model, tx)
    step = jax.jit(trainer.make_train_step(config, model, tx), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1)),
                        jnp.int32)
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
    peak = metrics.device_peak_flops(jax.devices()[0])
    rows = []
    for preset in args.presets:
        per_r = {}
        for reuse in (1, 4):
            name = preset if reuse == 1 else f"{preset}_r4"
            overrides = [f"data.batch_size={args.batch}", f"data.seq_len={args.seq}", "psr.schedule=none"]
            if args.layers:
                overrides.append(f"model.num_layers={args.layers}")
            if args.small:
                overrides += ["model.d_model=64", "model.expert_ffn=32", "model.num_heads=4", "model.num_kv_heads=2",
                              "model.vocab_size=512", "compute.dtype=float32", "compute.remat=none"]
            config = apply_overrides(load_preset(CONFIGS / f"{name}.py"), overrides + args.overrides)
            seconds = measure(config, args.steps)
            tokens = config.tokens_per_step / seconds
            active = trainer.summary(config)["params_active"]
            flops = metrics.flops_per_token(config.model, config.data.seq_len, active)
            per_r[reuse] = tokens
            mfu = f"{100 * tokens * flops / peak:.1f}%" if peak else "n/a (peak unknown)"
            depth = f"{config.model.num_layers}" + (" (shortened)" if args.layers else "")
            rows.append([name, depth, f"{config.data.batch_size} x {config.data.seq_len}", f"{seconds * 1e3:.1f}",
                         f"{tokens:,.0f}", mfu, f"{per_r[4] / per_r[1]:.3f}" if reuse == 4 else ""])
    print_table(f"train step on one device, full pool (PSR off), the presets' dtype - {environment()}",
                ["preset", "layers", "batch x seq", "step (ms)", "tokens/s", "MFU", "r=4 / r=1"], rows)


if __name__ == "__main__":
    main()
