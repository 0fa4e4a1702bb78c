"""Runs train.py as several processes of one JAX run on this machine (2 simulated CPU devices
each), for the multi-process tests. A `Processes` group is a context manager that kills every
process it started when the block ends, so a failing test never leaves one behind."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import typing

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, also when run as a script

from conftest import TEST_XLA_FLAGS

from rexmoe_jax.runtime import launch


def child_env(index: int, count: int, port: int) -> dict[str, str]:
    env = launch.process_env(index, count, port)
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # not conftest's 8 devices: --simulate-devices sets the count
    return env


def train(args: list[str], heartbeat: int = 10) -> list[str]:
    """train.py as one of several processes with 2 simulated devices each."""
    return [str(ROOT / "train.py"), "--distributed", "--simulate-devices", "2", "--heartbeat-timeout",
            str(heartbeat), "--init-timeout", "120", *args]


class Processes:
    """`count` processes of `python COMMAND` as one JAX run, output in folder/process<i>.log."""

    def __init__(self, folder: pathlib.Path, count: int, command: list[str]):
        folder.mkdir(parents=True, exist_ok=True)
        port = launch.free_port()
        command = [sys.executable, *command]
        self.logs = [folder / f"process{i}.log" for i in range(count)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(command, cwd=ROOT, env=child_env(i, count, port),
                                                   stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def __enter__(self) -> typing.Self:
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def output(self, index: int) -> str:
        return self.logs[index].read_text()

    def describe(self) -> str:
        return "\n".join(f"--- process {i} (exit {p.poll()}):\n{self.output(i)[-3000:]}"
                         for i, p in enumerate(self.procs))

    def wait(self, timeout: float) -> list[int]:
        """Every process's exit status; fails the test (after killing them) past `timeout`."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > deadline:
                self.kill_all()
                raise AssertionError(f"processes still running after {timeout}s\n{self.describe()}")
            time.sleep(0.05)
        return [p.returncode for p in self.procs]


def wait_until(predicate, timeout: float, what: str, group: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or any(p.poll() is not None for p in group.procs):
            raise AssertionError(f"never saw {what}\n{group.describe()}")
        time.sleep(0.01)


def _sigterm_in(pid: int, mask: str) -> bool:
    """Whether SIGTERM is in the process's signal mask `mask` (Linux: /proc/<pid>/status)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    bits = int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{mask}:")), 16)
    return bool(bits >> (signal.SIGTERM - 1) & 1)


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler."""
    return _sigterm_in(pid, "SigCgt")


def ignores_sigterm(pid: int) -> bool:
    """Whether the process ignores SIGTERM."""
    return _sigterm_in(pid, "SigIgn")


def check_host_rows() -> None:
    """Run as each of 2 processes (python tests/processes.py): each process reads only its
    rows of every global batch (an instrumented source), and the global batch the mesh holds at
    step t, gathered back, is the one-process batch of step t. Twice: on train.py's mesh, where a
    process's devices are adjacent on the data axis (rows 0-3 or 4-7), and on one that
    interleaves the processes as a TPU slice's torus order does (process p holds rows 2p, 2p + 1,
    2p + 4 and 2p + 5)."""
    os.environ.update(JAX_PLATFORMS="cpu",
                      XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2")
    from rexmoe_jax import data, sharding
    from rexmoe_jax.config import MeshConfig
    from rexmoe_jax.runtime import distributed

    distributed.initialize(init_timeout=120, heartbeat_timeout=10)
    import jax
    import numpy as np

    me = jax.process_index()
    by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    interleaved = np.asarray([by_process[0], by_process[2], by_process[1], by_process[3]])
    layouts = {
        "adjacent": (sharding.make_mesh(MeshConfig(data=2, expert=2)), [4 * me + i for i in range(4)]),
        "interleaved": (jax.sharding.Mesh(interleaved.reshape(4, 1, 1, 1), sharding.MESH_AXES),
                        [2 * me, 2 * me + 1, 2 * me + 4, 2 * me + 5]),
    }
    sequences = data.pack(data.TokenDocuments(np.arange(2000, dtype=np.int32), np.asarray([0, 2000])),
                          np.arange(1), 9, seed=None)  # sequence i starts with token 9 i

    class Recording:
        def __init__(self):
            self.read = set()

        def __len__(self):
            return len(sequences)

        def __getitem__(self, index):
            self.read.add(int(index))
            return sequences[index]

    for name, (mesh, mine) in layouts.items():
        blocks, count = sharding.process_rows(mesh, 8)
        held = [row for block in blocks for row in range(block * 8 // count, (block + 1) * 8 // count)]
        assert held == mine, (name, blocks, count)
        source = Recording()
        own_rows = data.BatchIterator(source, 8, seed=3, blocks=blocks, block_count=count, prefetch=1)
        whole = data.BatchIterator(sequences, 8, seed=3, prefetch=1)
        gather = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))
        own = set()
        for _ in range(6):
            batch = next(whole)
            own |= set((batch[mine, 0] // 9).tolist())
            with sharding.activate(mesh):
                seen = gather(sharding.put_batch(next(own_rows), mesh))
            np.testing.assert_array_equal(np.asarray(seen.addressable_data(0)), batch)
        ahead = {int(i) for _ in range(4) for i in next(whole)[mine, 0] // 9}
        assert own <= source.read <= own | ahead, (name, sorted(source.read - own - ahead))
        print(f"process {me}, {name} devices: rows {mine} of each batch, read only those", flush=True)
    distributed.finish()


def check_agreement(differing: str) -> int:
    """Run as each of 3 processes (python tests/processes.py agree KEY): process 1 holds another
    config (KEY "config") or process 2 resumes another step (KEY "step"); the start-up check,
    through the commands' contract, must end each with exit status 2 and the same one line."""
    os.environ.update(JAX_PLATFORMS="cpu",
                      XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=1")
    from rexmoe_jax import cli, sharding
    from rexmoe_jax.config import MeshConfig
    from rexmoe_jax.runtime import distributed

    distributed.initialize(init_timeout=120, heartbeat_timeout=10)
    import jax

    me = jax.process_index()
    what = {"config": {"train": {"steps": 20 if differing == "config" and me == 1 else 10}},
            "resumed step": 30 if differing == "step" and me == 2 else 0}

    @cli.command
    def start() -> int:
        try:
            distributed.check_same(sharding.make_mesh(MeshConfig()), what)
        finally:
            distributed.finish()
        return 0

    return start()


def train_unshared(folder: str, overrides: list[str]) -> int:
    """Run as each of 2 processes (python tests/processes.py unshared DIR OVERRIDES...): train.py
    with its own --workdir DIR/host<i>, as on a host that has not mounted the shared folder."""
    import train

    workdir = f"{folder}/host{os.environ['JAX_PROCESS_ID']}"
    return train.main(["--distributed", "--simulate-devices", "2", "--init-timeout", "120",
                       "--workdir", workdir, *overrides])


def train_one_process(stop_after: int, workdir: str, overrides: list[str]) -> int:
    """Run as one process (python tests/processes.py one STEP DIR OVERRIDES...): tiny.py with
    OVERRIDES through loop.run on this environment's devices (conftest's 8), stopped by request
    after step STEP (0: not stopped). The multi-process tests' one-process runs go through this,
    in a process of their own, so that a run XLA ends or hangs (its collective deadlock, which
    ended two pytest workers in stop 39's CI; see CPU_DEVICES_XLA_FLAGS) fails its test alone."""
    from rexmoe_jax import loop
    from rexmoe_jax.config import apply_overrides, load_preset
    from rexmoe_jax.runtime.preemption import StopRequest

    class StopAfter(StopRequest):
        def requested(self, step: int) -> bool:
            return 0 < stop_after <= step

    config = apply_overrides(load_preset(ROOT / "configs" / "tiny.py"), overrides)
    result = loop.run(config, pathlib.Path(workdir), stop=StopAfter())
    if "stopped_at" in result:
        print(f"one process: stopped after step {result['stopped_at']}", flush=True)
    else:
        print(f"one process: ended at step {result['step']}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["one"]:
        sys.exit(train_one_process(int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
    if sys.argv[1:2] == ["agree"]:
        sys.exit(check_agreement(sys.argv[2]))
    if sys.argv[1:2] == ["unshared"]:
        sys.exit(train_unshared(sys.argv[2], sys.argv[3:]))
    check_host_rows()
