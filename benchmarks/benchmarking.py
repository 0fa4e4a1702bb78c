"""Helpers for the benchmark scripts (nothing in the library imports this).

`median_seconds` runs a jitted function after a warm-up and returns the median of many timed
calls, each ended with block_until_ready. `ceilings` measures, in the same run, the two numbers
every table is read against: dense matmul FLOP/s and copy bandwidth. `write_random_params`
writes a run folder with random parameters for the memory benchmarks.
"""

from __future__ import annotations

import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.hf.regroup import unflatten
from rexmoe_jax.hf.run_io import param_shapes


def parse_args(doc: str, argv=None):
    """The options every shape benchmark takes: --small and --iters."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="shapes / 16 (a quick run on a CPU)")
    parser.add_argument("--iters", type=int, default=20)
    return parser.parse_args(argv)


def median_seconds(fn: Callable, *args, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(small: bool = False, iters: int = 20, matmul_dtype=jnp.bfloat16) -> dict[str, float]:
    """Dense matmul FLOP/s (n^3 with n = 8192, or 1024 when small; bf16 unless `matmul_dtype`
    says otherwise, e.g. the float32 a CPU run computes in) and copy bandwidth (bytes read +
    written by x * 2 over 2 GiB, or 64 MiB when small), measured here and now."""
    n = 1024 if small else 8192
    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (n, n), matmul_dtype)
    b = jax.random.normal(keys[1], (n, n), matmul_dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    flops = 2 * n ** 3 / median_seconds(matmul, a, b, iters=iters)
    elements = (32 if small else 1024) * 1024 * 1024  # bf16: 2 bytes each
    x = jax.random.normal(keys[0], (elements,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 2)
    bandwidth = 2 * 2 * elements / median_seconds(copy, x, iters=iters)
    return {"matmul_flops": flops, "copy_bytes_per_s": bandwidth}


def environment() -> str:
    device = jax.devices()[0]
    return (f"{getattr(device, 'device_kind', device.platform)} ({jax.default_backend()}), "
            f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(f"\n{title}\n")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def write_random_params(run: pathlib.Path, config) -> None:
    """A run folder as far as the export and inference read it: config.json and a step-0
    checkpoint of the parameters alone, random (N(0, 0.02^2), float32), drawn leaf by leaf. The
    export (hf.run_io.checkpoint_leaves) and inference.restore never read the optimizer state
    that a resumable run (hf.run_io.write_run) also holds: three times the parameters in host
    memory, 28 GB for the 2.3B presets, more than this machine has. This writer needs about
    twice the parameters (the save copies each leaf to write it)."""
    run.mkdir()
    (run / "config.json").write_text(config.to_json() + "\n")
    rng = np.random.default_rng(0)
    params = {}
    for path, shape in param_shapes(config).items():
        leaf = rng.standard_normal(shape.shape, np.float32)
        leaf *= np.float32(0.02)
        params[path] = jnp.asarray(leaf)  # a NumPy leaf would be copied twice by the save
    checkpointer = Checkpointer(run, config.train.keep_checkpoints)
    try:
        checkpointer.save(0, {"params": unflatten(params)}, {"step": 0, "config": config.to_dict()})
    finally:
        checkpointer.close()
