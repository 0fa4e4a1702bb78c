"""Benchmark: one MoE block, forward + backward, for each combination of dispatch pieces.

    python -m benchmarks.moe_block [--small] [--iters N]

The block: router (D x pool matmul, softmax, top-K), permute, the three expert matmuls of
SwiGLU, combine; the gradient is taken with respect to the input, the router and the experts.
Rows compare the baselines a user would otherwise get ("XLA gathers, default gradients": the
scatter-add backward) with this project's pieces; the last column is the speed-up over
"tokamax + XLA default gradients" (the issue's target: 1.5x at 2.3B-R4). The title carries the
dense matmul ceiling and copy bandwidth measured in the same run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.benchmarking import ceilings, environment, median_seconds, parse_args, print_table
from benchmarks.shapes import shapes
from rexmoe_jax.model import dispatch

BASELINE = "tokamax + XLA default gradients"


def combinations() -> list[tuple[str, dict]]:
    combos = [("XLA ragged_dot + XLA default gradients", {"gmm": "ragged_dot", "permute": "reference"}),
              (BASELINE, {"gmm": "tokamax", "permute": "reference"}),
              ("tokamax + gather gradients", {"gmm": "tokamax", "permute": "xla"}),
              ("ragged_dot + gather gradients", {"gmm": "ragged_dot", "permute": "xla"}),
              ("blocked + gather gradients", {"gmm": "blocked", "permute": "xla"}),
              ("capacity 1.25 (drops)", {"capacity": 1.25})]
    if jax.default_backend() == "tpu":
        combos.append(("ragged_dot + Pallas permute", {"gmm": "ragged_dot", "permute": "pallas"}))
    if jax.default_backend() == "gpu":  # The Mosaic GPU permute and combine.
        combos.append(("tokamax + Pallas permute", {"gmm": "tokamax", "permute": "pallas"}))
    return combos


def block_time(shape, options, iters):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (shape.tokens, shape.d), jnp.bfloat16)
    router = jax.random.normal(keys[1], (shape.d, shape.pool), jnp.float32) * 0.02
    weights = dispatch.ExpertWeights(
        jax.random.normal(keys[2], (shape.pool, shape.d, shape.f), jnp.bfloat16) * 0.02,
        jax.random.normal(keys[3], (shape.pool, shape.d, shape.f), jnp.bfloat16) * 0.02,
        jax.random.normal(keys[4], (shape.pool, shape.f, shape.d), jnp.bfloat16) * 0.02)
    cot = jax.random.normal(keys[5], (shape.tokens, shape.d), jnp.bfloat16)

    def loss(x, router, weights):
        routing = dispatch.route(x.astype(jnp.float32) @ router, None, shape.top_k, False)
        if "capacity" in options:
            y, _ = dispatch.capacity_experts(x, routing, weights, options["capacity"])
        else:
            y = dispatch.sorted_experts(x, routing, weights, options["gmm"], options["permute"])
        return jnp.sum((y * cot).astype(jnp.float32))

    return median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), x, router, weights, iters=iters)


def main(argv=None) -> None:
    args = parse_args(__doc__, argv)
    peak = ceilings(args.small, iters=args.iters)
    rows = []
    for shape in shapes(args.small):
        times = {}
        for name, options in combinations():
            try:
                times[name] = block_time(shape, options, args.iters)
            except Exception as err:  # noqa: BLE001 - a row that fails (out of memory, no tokamax) says so.
                times[name] = None
                rows.append([shape.name, name, f"failed: {type(err).__name__}", "", ""])
                continue
            rows.append([shape.name, name, f"{times[name] * 1e3:.2f}", f"{shape.tokens / times[name]:,.0f}", ""])
        base = times.get(BASELINE)
        for row in rows[-len(combinations()):]:
            t = times.get(row[1])
            row[4] = f"{base / t:.2f}x" if base and t else ""
    print_table(f"MoE block forward + backward, bf16, median of {args.iters} - {environment()}; dense matmul "
                f"{peak['matmul_flops'] / 1e12:.3g} TFLOP/s, copy bandwidth "
                f"{peak['copy_bytes_per_s'] / 1e9:.0f} GB/s",
                ["shape", "combination", "fwd+bwd (ms)", "tokens/s", f"vs {BASELINE}"], rows)


if __name__ == "__main__":
    main()
