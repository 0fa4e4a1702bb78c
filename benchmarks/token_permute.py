"""Benchmark: permute + combine at the paper's MoE shapes, against the copy bandwidth measured
in the same run.

    python -m benchmarks.token_permute [--small] [--iters N]

Bytes counted per call are the rows each kernel must read and write (A = tokens x K rows of D
elements): permute A D in and A D out; combine A D in and T D out; their backward passes the
same again plus the gate gradient's extra read of A D. The table's last column is the share
of copy bandwidth, the issue's target being 70% for permute + combine forward + backward; the
title carries the dense matmul ceiling and copy bandwidth measured in the same run. "pallas" is
timed on TPU (Mosaic TPU) and GPU (Mosaic GPU), next to XLA's gathers with gather gradients
("xla") and with its default scatter-add gradients ("reference").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.benchmarking import ceilings, environment, median_seconds, parse_args, print_table
from benchmarks.shapes import shapes
from pallas_kernels import token_permute


def implementations() -> list[str]:
    names = ["reference", "xla"]
    if jax.default_backend() in ("tpu", "gpu"):
        names.append("pallas")  # Interpret mode on CPU is far too slow to time.
    return names


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    experts = rng.integers(0, shape.pool, (shape.tokens, shape.top_k))
    order = jnp.asarray(np.argsort(experts.reshape(-1), kind="stable"), jnp.int32)
    keys = jax.random.split(jax.random.key(seed), 4)
    return {"x": jax.random.normal(keys[0], (shape.tokens, shape.d), jnp.bfloat16),
                "y": jax.random.normal(keys[1], (shape.rows, shape.d), jnp.bfloat16),
                "gates": jax.random.uniform(keys[2], (shape.tokens, shape.top_k), jnp.float32),
                "cot": jax.random.normal(keys[3], (shape.tokens, shape.d), jnp.bfloat16),
                "order": order, "inverse": token_permute.inverse_permutation(order)}


def measure(shape, implementation, iters):
    a = inputs(shape)
    k = shape.top_k

    def permute(x):
        return token_permute.permute(x, a["order"], a["inverse"], k, implementation=implementation)

    def combine(y, gates):
        return token_permute.combine(y, a["order"], a["inverse"], gates, implementation=implementation)

    def both(x, y, gates):  # permute and combine around a stand-in for the experts (y + rows)
        return jnp.sum((combine(permute(x) + y, gates) * a["cot"]).astype(jnp.float32))

    t_permute = median_seconds(jax.jit(permute), a["x"], iters=iters)
    t_combine = median_seconds(jax.jit(combine), a["y"], a["gates"], iters=iters)
    t_both = median_seconds(jax.jit(jax.grad(both, argnums=(0, 1, 2))), a["x"], a["y"], a["gates"], iters=iters)
    row_bytes = shape.rows * shape.d * 2
    token_bytes = shape.tokens * shape.d * 2
    moved = (2 * row_bytes) + (row_bytes + token_bytes)  # forward: permute, combine
    moved += (row_bytes + token_bytes) + (2 * row_bytes + token_bytes + row_bytes)  # backward
    return t_permute, t_combine, t_both, moved / t_both


def _failure(err: Exception) -> str:
    """A table cell for a row that failed: the error's type and first line."""
    first = str(err).splitlines()[0] if str(err) else ""
    return f"failed: {type(err).__name__}: {first}"[:120].replace("|", "/")


def main(argv=None) -> None:
    args = parse_args(__doc__, argv)
    peak = ceilings(args.small, iters=args.iters)
    rows = []
    for shape in shapes(args.small):
        for implementation in implementations():
            try:
                t_p, t_c, t_b, rate = measure(shape, implementation, args.iters)
            except Exception as err:  # noqa: BLE001 - a failing row says why.
                rows.append([shape.name, implementation, _failure(err), "", "", "", ""])
                continue
            rows.append([shape.name, implementation, f"{t_p * 1e6:.0f}", f"{t_c * 1e6:.0f}",
                         f"{t_b * 1e6:.0f}", f"{rate / 1e9:.0f}", f"{100 * rate / peak['copy_bytes_per_s']:.0f}%"])
    print_table(f"permute + combine, bf16, median of {args.iters} - {environment()}; copy bandwidth "
                f"{peak['copy_bytes_per_s'] / 1e9:.0f} GB/s, dense matmul "
                f"{peak['matmul_flops'] / 1e12:.3g} TFLOP/s",
                ["shape", "implementation", "permute fwd (us)", "combine fwd (us)", "both fwd+bwd (us)",
                 "fwd+bwd GB/s", "of copy BW"], rows)


if __name__ == "__main__":
    main()
