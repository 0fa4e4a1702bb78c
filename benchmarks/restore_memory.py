"""Peak host memory and per-device memory of restoring a trained run for inference: the whole
train state on one device (what evaluate and generate did before inference learned meshes)
against the parameters alone, in a chosen dtype, sharded over a mesh of simulated CPU devices.

A run with random weights is written from the preset's shapes (a step-0 checkpoint with its
fresh optimizer state, as training writes it); each restore then runs in its own child process,
whose peak resident memory is read from the kernel. With --sizes-only nothing is written: the
bytes each restore places are computed from the shapes (for presets whose train state does not
fit this machine's memory). With --params-only-run the run's checkpoint holds the parameters
alone (benchmarking.write_random_params), which is all the sharded restore reads, and only that
restore is measured: the 2.3B presets' whole train state does not fit this machine's memory.

    python benchmarks/restore_memory.py --preset configs/moe_0p5b_a0p07b_r4.py mesh.fsdp=8
    python benchmarks/restore_memory.py --preset configs/moe_2p3b_a0p3b_r4.py --sizes-only mesh.fsdp=8
    python benchmarks/restore_memory.py --preset configs/moe_2p3b_a0p3b_r4.py --params-only-run mesh.fsdp=8
    python benchmarks/restore_memory.py --run runs/r2 mesh.fsdp=8   # a run of yours instead
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

GB = 1e9
DEVICES = 8


def _child(workdir: str, mode: str, dtype: str, mesh: list[str]) -> None:
    """Restores in this process and prints a JSON line: seconds, peak resident GB, and the
    largest bytes any one device holds."""
    import jax  # here and in main: after XLA_FLAGS is set (the device count), which jax reads once

    from rexmoe_jax import trainer
    from rexmoe_jax.checkpoint import Checkpointer
    from rexmoe_jax.inference import restore
    from rexmoe_jax.optimizer import make_optimizer

    start = time.perf_counter()
    config = restore.read_config(pathlib.Path(workdir))
    if mode == "whole state, one device":
        model, tx = trainer.build_model(config), make_optimizer(config.optim, config.train.steps)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        checkpointer = Checkpointer(pathlib.Path(workdir), 1, read_only=True)
        tree, _ = checkpointer.restore(trainer.abstract_state(config, model, tx, device), config)
        checkpointer.close()
    else:
        tree = restore.restore(workdir, mesh=restore.inference_mesh(config, mesh), dtype=dtype).params
    jax.block_until_ready(tree)
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    # VmHWM, the peak of this process image: ru_maxrss would also count the parent's pages at fork.
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    peak_kib = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    print(json.dumps({"seconds": time.perf_counter() - start, "device_gb": max(per_device.values()) / GB,
                      "peak_gb": peak_kib * 1024 / GB}))


def _measure(workdir: pathlib.Path, mode: str, dtype: str, mesh: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}")
    out = subprocess.run([sys.executable, __file__, "--child", str(workdir), mode, dtype, *mesh], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _sizes(config, dtype: str, mesh: list[str]) -> list[list[str]]:
    """Bytes each restore places, from the shapes alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rexmoe_jax import trainer
    from rexmoe_jax.inference import restore

    abstract = trainer.abstract_params(config, restore.inference_mesh(config, mesh), jnp.dtype(dtype))
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
    per_device = {}
    for leaf in jax.tree.leaves(abstract):
        shard = leaf.sharding.shard_shape(leaf.shape)
        for device in leaf.sharding.device_set:
            per_device[device.id] = per_device.get(device.id, 0) + int(np.prod(shard)) * jnp.dtype(dtype).itemsize
    whole = 3 * params * 4  # parameters and Adam's two moments, float32, on one device
    return [["whole state, one device", "-", f"{whole / GB:.2f}", "-"],
            [f"parameters only, {dtype}, sharded", "-", f"{max(per_device.values()) / GB:.2f}", "-"]]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], argv[3], argv[4:])
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"--xla_force_host_platform_device_count={DEVICES}")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="write a run with random weights of this preset's shapes")
    source.add_argument("--run", type=pathlib.Path, help="restore this run folder instead (kept as it is)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--sizes-only", action="store_true", help="bytes from the shapes; write and restore nothing")
    parser.add_argument("--params-only-run", action="store_true", help="the run holds the parameters alone (written "
                        "so for presets whose train state does not fit in memory): measure only the sharded restore")
    parser.add_argument("mesh", nargs="*", metavar="mesh.AXIS=SIZE", help="the inference mesh (default: every "
                        "device on the data axis)")
    args = parser.parse_args(argv)

    import numpy as np

    from benchmarks.benchmarking import environment, print_table, write_random_params
    from rexmoe_jax import trainer
    from rexmoe_jax.config import load_preset
    from rexmoe_jax.data import tokenizer_path
    from rexmoe_jax.hf.regroup import unflatten
    from rexmoe_jax.hf.run_io import param_shapes, write_run
    from rexmoe_jax.inference import restore

    config = restore.read_config(args.run) if args.run else load_preset(args.preset)
    title = (f"restoring {pathlib.Path(args.run or args.preset).stem} ({trainer.summary(config)['params_total'] / 1e9:.2f}B "
             f"parameters) for inference on {DEVICES} simulated CPU devices, mesh {' '.join(args.mesh) or 'data=8'}")
    header = ["restore", "seconds", "largest per-device GB", "peak host GB"]
    if args.sizes_only:
        print_table(f"{title}; from the shapes - {environment()}", header, _sizes(config, args.dtype, args.mesh))
        return
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.run or pathlib.Path(scratch) / "run"
        if args.run is None and args.params_only_run:
            write_random_params(workdir, config)
        elif args.run is None:
            rng = np.random.default_rng(0)
            shapes = param_shapes(config)
            write_run(workdir, config, unflatten({p: rng.standard_normal(s.shape, np.float32) * np.float32(0.02)
                                                 for p, s in shapes.items()}), tokenizer_path(config.data))
        rows = []
        modes = ["whole state, one device"] * (not args.params_only_run) + [f"parameters only, {args.dtype}, sharded"]
        for mode in modes:
            m = _measure(workdir, mode, args.dtype, args.mesh)
            rows.append([mode, f"{m['seconds']:.1f}", f"{m['device_gb']:.2f}", f"{m['peak_gb']:.2f}"])
    written = "; the run holds the parameters alone" if args.params_only_run else ""
    print_table(f"{title}{written} - {environment()}", header, rows)


if __name__ == "__main__":
    main()
