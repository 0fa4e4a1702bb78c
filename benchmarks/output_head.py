"""Benchmark (CPU): the output head's weight gradient as autodiff writes it against the form
`layers.output_logits` uses on CPU, alone and in whole train steps of the study model.

    python -m benchmarks.output_head [--steps N] [--widths 64 128]

The head's weight gradient is x^T g: x (N tokens x D) and the logits' gradient g (N x V),
contracted over the tokens, the leading axis of both. XLA:CPU runs that matmul well below the
speed of the forward matmul of the same size; with the transpose of x made first (D x N, behind
an optimization barrier so that XLA cannot fold it back into the matmul) it runs at full speed.
The first table times the two forms alone; the second, whole train steps of the tiny preset at
the studies' shape (8 x 64 tokens, 8,192 words, 8 layers, F = 2D) with each form, compiled in
this process and timed step by step in turn, so that both see the same load.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.benchmarking import environment, median_seconds, print_table
from benchmarks.train_step import CONFIGS, prepare
from rexmoe_jax.config import apply_overrides, load_preset
from rexmoe_jax.model import layers

TOKENS, VOCAB = 512, 8192


def autodiff_form(x_NxD, g_NxV):
    return jnp.einsum("nd,nv->dv", x_NxD, g_NxV)


def transposed_first(x_NxD, g_NxV):
    return jax.lax.optimization_barrier(x_NxD.T) @ g_NxV


def step_milliseconds(widths: list[int], steps: int) -> list[list[str]]:
    rows = []
    written_out = layers._cpu_logits
    for d in widths:
        config = apply_overrides(load_preset(str(CONFIGS / "tiny.py")), [
            f"model.d_model={d}", f"model.expert_ffn={2 * d}", f"model.vocab_size={VOCAB}", "model.num_layers=8",
            "model.num_experts=8", "model.top_k=2", "data.batch_size=8", "data.seq_len=64"])
        runs = {}
        try:
            for name, head in (("autodiff", layers._logits), ("written out", written_out)):
                layers._cpu_logits = head  # the step traces whichever head is in place when it compiles
                step, state, batch = prepare(config)
                runs[name] = [step.lower(state, batch).compile(), state, batch, []]
        finally:
            layers._cpu_logits = written_out
        for i in range(steps + 2):
            for run in runs.values():
                start = time.perf_counter()
                run[1], out = run[0](run[1], run[2])
                jax.block_until_ready(out)
                if i >= 2:  # two warm-up steps
                    run[3].append(time.perf_counter() - start)
        before, after = (float(np.median(runs[name][3])) * 1e3 for name in ("autodiff", "written out"))
        rows.append([f"{d}", f"{before:.0f}", f"{after:.0f}", f"{before / after:.2f}"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="train steps timed per form")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="model widths D")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for d in args.widths:
        x = jnp.asarray(rng.standard_normal((TOKENS, d)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((TOKENS, VOCAB)), jnp.float32)
        times = [median_seconds(jax.jit(form), x, g) for form in (autodiff_form, transposed_first)]
        gflops = [2 * TOKENS * d * VOCAB / t / 1e9 for t in times]
        rows.append([f"{TOKENS} x {d} by {TOKENS} x {VOCAB}", f"{times[0] * 1e3:.1f} ({gflops[0]:.1f})",
                     f"{times[1] * 1e3:.1f} ({gflops[1]:.1f})", f"{times[0] / times[1]:.2f}"])
    print_table(f"The head's weight gradient x^T g, float32: ms (GFLOP/s) - {environment()}",
                ["x, g", "as autodiff writes it", "x transposed first", "speed-up"], rows)
    print_table(f"Train step of the tiny preset, 8 x 64 tokens, V = {VOCAB}, float32: median ms - {environment()}",
                ["D", "autodiff head gradient", "written-out head gradient", "speed-up"],
                step_milliseconds(args.widths, args.steps))


if __name__ == "__main__":
    main()
