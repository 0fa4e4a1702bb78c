"""Benchmark: the CPU expert FFN as three blocked grouped-matmul loops against one fused loop
(blocked.swiglu), alone and in whole train steps, r = 1, 4 and 8 against the dense twin.

    python -m benchmarks.expert_ffn [--steps N] [--layers L] [--batch B] [--seq S]

Both variants are measured in this run, one after the other: "three loops" is what the blocked
path ran before (layers.swiglu with three blocked.grouped_matmul calls, each with its own
custom VJP), "fused" what it runs now. The first table times one expert FFN forward and
backward at each preset's --small shape (train_step.py's tiny widths; the tiny preset as it is)
with the rows a batch of B x S tokens routes to it, uniformly over a pool of r*N experts. The
second times one MoE layer (router, top-K, sort, permute, expert FFN, combine, auxiliary
losses; `moe.MoEFFN`, fused FFN) forward and backward on B x S tokens, as it is and with its
expert FFN swapped for a stand-in that costs nothing: what grows with r inside a layer, split
into the FFN and the rest. The third times whole train steps (PSR off, L layers so that r = 8
fits) and gives each row's tokens/s over its preset's dense twin and over its own variant's
first r (r = 1 unless --reuse says otherwise; the issue's targets: 0.8 and 0.95).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_step
from benchmarks.benchmarking import environment, median_seconds, print_table
from pallas_kernels.grouped_matmul import blocked
from rexmoe_jax.config import apply_overrides, load_preset
from rexmoe_jax.model.dispatch import ExpertWeights
from rexmoe_jax.model.layers import swiglu
from rexmoe_jax.model.moe import MoEFFN

PRESETS = ("tiny", "moe_0p5b_a0p07b", "moe_2p3b_a0p3b")
REUSE = (1, 4, 8)
FUSED = blocked.swiglu


def three_loops(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E, block=None):
    """The expert FFN as it ran before the fused loop: three grouped matmuls."""
    def matmul(lhs, rhs):
        return blocked.grouped_matmul(lhs, rhs, group_sizes_E)

    return swiglu(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, matmul=matmul)


VARIANTS = {"three loops": three_loops, "fused": FUSED}


def config_for(preset: str, reuse: int, args, dense: bool = False):
    """The preset at the benchmark's batch, sequence and depth, PSR off; --small widths for
    the paper presets (train_step.py's), the tiny preset as it is."""
    extra = [f"model.reuse={reuse}"] + (["model.ffn=dense"] if dense else [])
    shape = argparse.Namespace(batch=args.batch, seq=args.seq, layers=args.layers, small=preset != "tiny",
                               overrides=[])
    if preset == "tiny":
        overrides = [f"data.batch_size={args.batch}", f"data.seq_len={args.seq}", "psr.schedule=none",
                     f"model.num_layers={args.layers}"]
        return apply_overrides(load_preset(train_step.CONFIGS / "tiny.py"), overrides + extra)
    return train_step.bench_config(preset, shape, extra)


def ffn_ms(fn, rows: int, d: int, f: int, pool: int, iters: int) -> float:
    """Forward and backward of one expert FFN on `rows` rows spread uniformly over the pool."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for s in ((pool, d, f), (pool, d, f), (pool, f, d))]
    sizes = jnp.asarray(np.bincount(rng.integers(0, pool, rows), minlength=pool), jnp.int32)
    cot = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    grad = jax.jit(jax.grad(lambda x, *w: jnp.sum(fn(x, *w, sizes) * cot), argnums=(0, 1, 2, 3)))
    return 1e3 * median_seconds(grad, x, *weights, warmup=1, iters=iters)


def no_ffn(x_MxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E, block=None):
    """A stand-in for the expert FFN that costs next to nothing but keeps every input in the
    gradient, so that the rest of the layer compiles and runs as it does around the real one."""
    return x_MxD * (jnp.sum(gate_ExDxF) + jnp.sum(up_ExDxF) + jnp.sum(down_ExFxD))


def layer_ms(config, reuse: int, iters: int) -> float:
    """Forward and backward of one MoE layer over the pool of r*N experts (no PSR mask)."""
    model = config.model
    pool = reuse * model.num_experts
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((config.data.batch_size, config.data.seq_len, model.d_model)), jnp.float32)
    shapes = ((pool, model.d_model, model.expert_ffn),) * 2 + ((pool, model.expert_ffn, model.d_model),)
    weights = ExpertWeights(*(jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for s in shapes))
    layer = MoEFFN(model, config.compute, pool, pool)
    params = layer.init(jax.random.key(0), x, weights, None)

    def loss(params, x, weights):
        y, stats = layer.apply(params, x, weights, None)
        return jnp.sum(y * y) + stats.load_balance + stats.z_loss

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return 1e3 * median_seconds(grad, params, x, weights, warmup=1, iters=iters)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--layers", type=int, default=8, help="layers of the train steps (8: r = 8 fits)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reuse", type=int, nargs="+", default=list(REUSE), help="r values; the first is the base")
    parser.add_argument("--skip-steps", action="store_true", help="only the expert FFN and MoE layer tables")
    args = parser.parse_args(argv)

    rows = []
    for preset in args.presets:
        model = config_for(preset, 1, args).model
        assignments = args.batch * args.seq * model.top_k
        for reuse in args.reuse:
            pool = reuse * model.num_experts
            ms = {name: ffn_ms(fn, assignments, model.d_model, model.expert_ffn, pool, args.iters)
                  for name, fn in VARIANTS.items()}
            rows.append([preset, f"{assignments:,} x {model.d_model} x {model.expert_ffn}", str(pool),
                         f"{ms['three loops']:.2f}", f"{ms['fused']:.2f}", f"{ms['three loops'] / ms['fused']:.2f}x"])
    print_table(f"one expert FFN, forward + backward (ms, median of {args.iters}), float32 - {environment()}",
                ["preset", "rows x D x F", "pool", "three loops", "fused", "speed-up"], rows)

    rows = []
    try:
        for preset in args.presets:
            config = config_for(preset, 1, args)
            base = None
            for reuse in args.reuse:
                blocked.swiglu = FUSED
                whole = layer_ms(config, reuse, args.iters)
                blocked.swiglu = no_ffn  # dispatch.grouped_swiglu calls it through the module
                rest = layer_ms(config, reuse, args.iters)
                base = base or (whole, rest)
                rows.append([preset, str(reuse), str(reuse * config.model.num_experts), f"{whole:.2f}",
                             f"{whole - rest:.2f}", f"{rest:.2f}",
                             "" if reuse == args.reuse[0] else f"{whole - rest - base[0] + base[1]:+.2f} / {rest - base[1]:+.2f}"])
    finally:
        blocked.swiglu = FUSED
    print_table(f"one MoE layer, forward + backward, {args.batch} x {args.seq} tokens (ms, median of {args.iters}), "
                f"float32 - {environment()}",
                ["preset", "r", "pool", "layer", "expert FFN", "rest (FFN a stand-in)", "FFN / rest minus the first r"],
                rows)
    if args.skip_steps:
        return

    rows = []
    try:
        for preset in args.presets:
            dense_s = train_step.measure(config_for(preset, 1, args, dense=True), args.steps)
            tokens = args.batch * args.seq
            rows.append([preset, "dense twin", "", f"{dense_s * 1e3:.1f}", f"{tokens / dense_s:,.0f}", "", ""])
            for name, fn in VARIANTS.items():
                blocked.swiglu = fn  # dispatch.grouped_swiglu calls it through the module
                seconds = {r: train_step.measure(config_for(preset, r, args), args.steps) for r in args.reuse}
                base = seconds[args.reuse[0]]
                for r in args.reuse:
                    rows.append([preset, name, str(r), f"{seconds[r] * 1e3:.1f}", f"{tokens / seconds[r]:,.0f}",
                                 f"{dense_s / seconds[r]:.3f}", "" if r == args.reuse[0] else f"{base / seconds[r]:.3f}"])
    finally:
        blocked.swiglu = FUSED
    print_table(f"train steps, {args.layers} layers, {args.batch} x {args.seq} tokens, PSR off - {environment()}",
                ["preset", "expert FFN", "r", "step (ms)", "tokens/s", "/ dense", "/ first r"], rows)


if __name__ == "__main__":
    main()
