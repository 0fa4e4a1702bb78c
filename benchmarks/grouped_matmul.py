"""Benchmark: the expert matmul (one SwiGLU projection, rows x d -> f) per implementation at the
paper's MoE shapes, against the dense matmul ceiling measured in the same run.

    python -m benchmarks.grouped_matmul [--small] [--iters N]

Rows are tokens x K, routed uniformly over the pool. TFLOP/s counts useful FLOPs only
(2 rows d f forward; three times that for forward + backward, dX and dW). "capacity 1.25" is
the padded batched einsum a capacity-factor design runs instead ((pool, 1.25 rows / pool, d)
x (pool, d, f)); its dispatch cost is not included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.benchmarking import ceilings, environment, median_seconds, parse_args, print_table
from benchmarks.shapes import shapes
from pallas_kernels.grouped_matmul import grouped_matmul


def implementations() -> list[str]:
    names = ["ragged_dot", "blocked"]
    try:
        import tokamax  # noqa: F401

        names.append("tokamax")
    except ImportError:
        pass
    return names + ["capacity 1.25"]


def timed(shape, implementation, iters):
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = np.random.default_rng(0).multinomial(shape.rows, np.ones(shape.pool) / shape.pool)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    lhs = jax.random.normal(keys[0], (shape.rows, shape.d), jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (shape.pool, shape.d, shape.f), jnp.bfloat16) * 0.05
    if implementation.startswith("capacity"):
        slots = int(np.ceil(1.25 * shape.rows / shape.pool))
        lhs = jax.random.normal(keys[0], (shape.pool, slots, shape.d), jnp.bfloat16)

        def fwd(lhs, rhs):
            return jnp.einsum("pcd,pdf->pcf", lhs, rhs)
    else:
        def fwd(lhs, rhs):
            return grouped_matmul(lhs, rhs, group_sizes, implementation=implementation)

    loss = lambda lhs, rhs: jnp.sum(fwd(lhs, rhs).astype(jnp.float32))
    t_fwd = median_seconds(jax.jit(fwd), lhs, rhs, iters=iters)
    t_bwd = median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1))), lhs, rhs, iters=iters)
    return t_fwd, t_bwd


def main(argv=None) -> None:
    args = parse_args(__doc__, argv)
    peak = ceilings(args.small, iters=args.iters)
    rows = []
    for shape in shapes(args.small):
        flops = 2 * shape.rows * shape.d * shape.f
        for implementation in implementations():
            try:
                t_fwd, t_bwd = timed(shape, implementation, args.iters)
            except Exception as err:  # noqa: BLE001 - a row that fails (out of memory) says so.
                rows.append([shape.name, implementation, f"failed: {type(err).__name__}", "", "", "", ""])
                continue
            rows.append([shape.name, implementation, f"{t_fwd * 1e3:.2f}", f"{flops / t_fwd / 1e12:.1f}",
                         f"{t_bwd * 1e3:.2f}", f"{2 * flops / t_bwd / 1e12:.1f}",
                         f"{100 * flops / t_fwd / peak['matmul_flops']:.0f}%"])
    print_table(f"expert matmul (rows x d -> f), bf16, median of {args.iters} - {environment()}; dense "
                f"ceiling {peak['matmul_flops'] / 1e12:.1f} TFLOP/s",
                ["shape", "implementation", "fwd (ms)", "fwd TFLOP/s", "bwd dX+dW (ms)", "bwd TFLOP/s",
                 "fwd of ceiling"], rows)


if __name__ == "__main__":
    main()
