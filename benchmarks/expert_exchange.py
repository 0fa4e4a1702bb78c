"""Benchmark, by count rather than by clock: the bytes the expert-parallel exchange moves per train
step and device, ragged (dropless, exact rows) against fixed buffers, at a preset's shape.

    python -m benchmarks.expert_exchange [--preset moe_2p3b_a0p3b_r4] [--mesh data=1 fsdp=4 expert=8]
    python -m benchmarks.expert_exchange psr.schedule=none     # overrides of the preset
    python -m benchmarks.expert_exchange --check   # the counts against a compiled step (CPU, 4 devices)

Per MoE layer, micro-batch and direction, a device holding T tokens with top-K routing sends:
  ragged  exactly its T*K rows of D activations (1/E of them to itself), after all-gathering
          the E x P int32 row counts (a few KiB);
  fixed   E*C rows of D activations, and on the way out E*C int32 expert ids, where C =
          dispatch.capacity(T*K, E, capacity_factor, live_share): T*K (E*T*K rows in all) when
          capacity_factor = 0, and never more.
A step runs each exchange out and back in the forward pass, again in the backward pass (the
transposed exchange moves as many rows; integer ids have no gradient), and once more in the
forward pass that remat recomputes. --check lowers a small model's step on CPU and counts these
collectives (the ragged op lowers for GPU and TPU there, though XLA:CPU cannot compile it), and
compares the fixed exchange's compiled all-to-all bytes with the formula.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re

import jax.numpy as jnp

from benchmarks.benchmarking import print_table
from rexmoe_jax import reuse
from rexmoe_jax.config import Config, apply_overrides, load_preset
from rexmoe_jax.model.dispatch import capacity
from rexmoe_jax.runtime.distributed import CPU_DEVICES_XLA_FLAGS

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def exchange_bytes(config: Config) -> dict[str, tuple[int, bool]]:
    """(bytes one device sends per train step in the MoE exchanges, whether tokens can be
    dropped) for each exchange."""
    m, compute, mesh = config.model, config.compute, config.mesh
    experts = mesh.expert
    batch_devices = mesh.data * mesh.fsdp * mesh.expert
    micro_batches = config.optim.grad_accum
    tokens = config.data.batch_size // micro_batches * config.data.seq_len // batch_devices
    rows = tokens * m.top_k
    width = m.d_model * jnp.dtype(compute.dtype).itemsize
    forward_passes = 1 + (compute.remat != "none")
    passes = forward_passes + 1  # and the backward pass
    live_share = 1.0
    if config.psr.schedule != "none":
        live_share = reuse.initial_pool(config.psr.initial_experts, m.num_experts, m.pool_size) / m.pool_size
    per_destination = capacity(rows, experts, compute.capacity_factor, live_share)
    slots = experts * per_destination
    per_layer = {
        "ragged": passes * 2 * rows * width + forward_passes * experts * m.pool_size * 4,
        "fixed": passes * 2 * slots * width + forward_passes * slots * 4,
        "fixed, dropless": passes * 2 * experts * rows * width + forward_passes * experts * rows * 4,
    }
    drops = {"ragged": False, "fixed": per_destination < rows, "fixed, dropless": False}
    return {name: (b * m.num_layers * micro_batches, drops[name]) for name, b in per_layer.items()}


def _table(config: Config, name: str) -> None:
    counts = exchange_bytes(config)
    gib = 1024 ** 3
    m = config.model
    print_table(f"{name}: d_model {m.d_model}, top-{m.top_k} of a pool of {m.pool_size}, {m.num_layers} MoE "
                f"layers, {config.tokens_per_step:,} tokens per step on mesh data={config.mesh.data} fsdp="
                f"{config.mesh.fsdp} expert={config.mesh.expert}, {config.compute.dtype}, remat="
                f"{config.compute.remat}, capacity_factor={config.compute.capacity_factor}",
                ["exchange", "GiB per step and device", "x ragged", "drops tokens"],
                [[path, f"{b / gib:,.1f}", f"{b / counts['ragged'][0]:.2f}", "yes" if drops else "no"]
                 for path, (b, drops) in counts.items()])


def _compiled_check() -> None:
    import jax

    from rexmoe_jax import loop, sharding, trainer
    from rexmoe_jax.model import collectives
    from rexmoe_jax.optimizer import make_optimizer

    if jax.device_count() < 4:
        flags = " ".join(("--xla_force_host_platform_device_count=4", *CPU_DEVICES_XLA_FLAGS))
        raise SystemExit(f"--check needs 4 devices: JAX_PLATFORMS=cpu XLA_FLAGS='{flags}'")
    small = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
             "model.num_kv_heads=1", "model.expert_ffn=16", "model.num_experts=8", "model.top_k=2",
             "data.seq_len=8", "data.batch_size=8", "mesh.data=1", "mesh.expert=4", "mesh.num_devices=4"]
    resolve = collectives.resolve
    collectives.resolve = lambda implementation: "native"  # lower the op GPU and TPU run
    rows = []
    try:
        for remat in ("none", "full"):
            for exchange in ("fixed", "ragged"):
                cfg = apply_overrides(Config(), small + [f"compute.remat={remat}",
                                                         f"compute.expert_exchange={exchange}"])
                mesh = sharding.make_mesh(cfg.mesh)
                model, tx = trainer.build_model(cfg), make_optimizer(cfg.optim, 10)
                shardings = trainer.state_shardings(cfg, model, tx, mesh)
                state = trainer.abstract_state(cfg, model, tx, shardings)
                batch = jax.ShapeDtypeStruct((8, 9), jnp.int32, sharding=sharding.batch_sharding(mesh))
                step, _ = loop.jitted_steps(cfg, model, tx, mesh, shardings)
                with sharding.activate(mesh):
                    lowered = step.lower(state, batch)
                text = lowered.as_text()
                ragged = len(re.findall(r"ragged_all_to_all", text))
                # XLA:CPU compiles the fixed exchange only (the ragged op is for GPU and TPU).
                moved = _all_to_all_bytes(lowered.compile().as_text()) if exchange == "fixed" else "-"
                rows.append([remat, exchange, ragged, moved, exchange_bytes(cfg)[exchange][0]])
    finally:
        collectives.resolve = resolve
    print_table("collectives in a compiled small step (1 MoE layer, T*K = 32 rows per device, E = 4)",
                ["remat", "exchange", "ragged_all_to_all ops", "compiled all-to-all bytes", "formula bytes"],
                rows)


def _all_to_all_bytes(hlo: str) -> int:
    """The bytes of the all-to-all results in compiled HLO text (each runs once: one layer)."""
    total = 0
    for line in hlo.splitlines():
        if " all-to-all(" not in line:
            continue
        for dtype, dims in re.findall(r"(f32|s32|bf16)\[([\d,]*)\]", line.split(" all-to-all(")[0]):
            total += math.prod(int(d) for d in dims.split(",") if d) * {"f32": 4, "s32": 4, "bf16": 2}[dtype]
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moe_2p3b_a0p3b_r4")
    parser.add_argument("--mesh", nargs="*", default=["data=1", "fsdp=4", "expert=8"], metavar="AXIS=SIZE")
    parser.add_argument("--check", action="store_true", help="count the collectives of a compiled small step")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    if args.check:
        _compiled_check()
        return
    config = apply_overrides(load_preset(CONFIGS / f"{args.preset}.py"),
                             [f"mesh.{m}" for m in args.mesh] + args.overrides)
    _table(config, args.preset)


if __name__ == "__main__":
    main()
