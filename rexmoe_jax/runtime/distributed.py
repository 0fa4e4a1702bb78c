"""Several processes as one run: joining JAX's distributed runtime, the decisions every process
takes together, noticing a process that died, and leaving together.

Start-up. `initialize` reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (JAX
itself reads only the first), and leaves what is unset to JAX's detection of Cloud TPU, SLURM
and Open MPI. CPU devices of all processes talk through gloo, so a multi-process run works on
any machine. Failing to join within `init_timeout` seconds is a `StartupError` with one line.

Agreement. The host loop changes course only where every process does the same:
  - checkpoint, evaluation and end steps are functions of (config, step), and `check_same`
    proves at start-up that every process has the same config and resumes the same step;
  - the non-finite check reads values of the global step, replicated on every process;
  - a stop request (SIGTERM or SIGINT, to any process) is put to a vote every step by
    `StopVote`: one flag per device gathered across all processes, read one step later so the
    host never waits for the device, and every process stops after the same step.
JAX's own preemption service is turned off: its SIGTERM notifier would replace the handler
that train.py installs before jax is imported, and it knows nothing of SIGINT.

A dead process. JAX's coordination service, which runs in process 0, declares a process dead
after `heartbeat_timeout` seconds without a heartbeat and ends the others (SIGABRT; its log
lists the dead task). A watchdog thread asks the service every second which processes are
alive, so that often a one-line error naming the lost process comes first (exit status
LOST_PROCESS); either way the survivors exit within the heartbeat timeout plus about a second.
When process 0 itself dies, the service goes with it and JAX ends the others at once, its log
naming the coordination service. Orbax writes checkpoints atomically, so those already written
stay good and a re-run resumes from the newest.

Simulated devices. `simulate_devices` (train.py's, evaluate's and generate's --simulate-devices)
gives a process N CPU devices before JAX starts, so that a mesh can be tried without the
hardware; once JAX has started in the process it refuses, as the flag could change nothing.

The end. `finish` stops the watchdog (a process that finished first is not a lost one) and
shuts the runtime down, which waits up to `heartbeat_timeout` for every process to get there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import signal
import socket
import sys
import threading
import time
import zlib

import numpy as np

from rexmoe_jax.cli import LOST_PROCESS, CommandError, one_line
from rexmoe_jax.config import ConfigError
from rexmoe_jax.runtime.preemption import StopRequest

# jax is imported inside the functions that use it: train.py imports this module, and installs
# its signal handler, before jax is loaded.

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_POLL_SECONDS = 1.0
JOIN_PATIENCE = 15.0  # seconds a process asked to stop while joining still waits for the others
_barrier_seconds = 300  # how long `barrier` waits: --init-timeout
# XLA:CPU flags for a process that runs one program on several CPU devices. With its default
# concurrency-optimised schedule, XLA:CPU (jaxlib 0.10.2) sometimes never starts one device's
# part of a train step whose collectives sit in nested loops (the micro-batch loop around the
# layer scan): the other devices wait at two rendezvous for ever (gdb: no thread of that device
# at either, the pools' other threads idle). It is not a pool too small for the blocked
# threads: PJRT_NPROC=32 hung too. Under load on 2 cores, runs of 200 steps of the multi-process
# tests' model on 4 of 8 devices hung in 11 of 15 tries without this flag (either emitters,
# PJRT_NPROC=32 or single-threaded Eigen) and in 0 of 24 with it; jaxlib 0.12.0.1 did not hang
# in 3 tries without it.
CPU_DEVICES_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


class StartupError(CommandError, RuntimeError):
    """The distributed runtime could not be joined; the message is one line."""

    exit_status = LOST_PROCESS


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise StartupError(f"{name}={raw!r} is not an integer") from None


def _join_arguments() -> dict:
    """initialize()'s arguments from the environment; None where JAX should detect them."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count, index = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    if (count is None) != (index is None):
        raise StartupError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither (to let JAX "
                           "detect them on Cloud TPU, SLURM or Open MPI)")
    if count is not None and address is None:
        raise StartupError("JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is not: set it to "
                           "host:port of process 0")
    return {"coordinator_address": address, "num_processes": count, "process_id": index}


def simulate_devices(count: int) -> None:
    """--simulate-devices N: this process runs on N CPU devices (to try a mesh without the
    hardware); 0 leaves the devices alone. Before anything asks JAX for its devices, and before
    `initialize` (then every process has N)."""
    if count < 0:
        raise ConfigError(f"--simulate-devices {count}: give a number of devices >= 1 (or 0: off)")
    if not count:
        return
    imported = "jax" in sys.modules
    if imported:
        from jax._src import xla_bridge  # private, but the one way to ask without starting JAX

        if xla_bridge.backends_are_initialized():
            raise ConfigError(f"--simulate-devices {count}: JAX has started on its devices already in this "
                              "process; give it to a new process (a command, not a notebook cell)")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = with_xla_flags(flags, CPU_DEVICES_XLA_FLAGS)
    os.environ["JAX_PLATFORMS"] = "cpu"  # read when jax is imported; one imported already is told
    if imported:
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def with_xla_flags(current: str, flags: tuple[str, ...]) -> str:
    """XLA_FLAGS `current` with each of `flags` (--name=value) whose name it does not set yet:
    a value the user gave stays."""
    names = {flag.split("=")[0] for flag in current.split()}
    return " ".join([*current.split(), *(f for f in flags if f.split("=")[0] not in names)])


def _check_port_free(address: str, who: str) -> None:
    """Process 0 hosts the coordinator on the address's port: one taken on this host would end
    it inside gRPC (a segmentation fault, no line), and its partners would wait for it."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StartupError(f"JAX_COORDINATOR_ADDRESS={address!r}: give host:port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port a past run left waiting is free
        try:
            probe.bind(("", int(port)))
        except OSError as err:
            raise StartupError(f"{who} hosts the coordinator at {address}, but port {port} is taken on this "
                               f"host ({err.strerror}); choose a free port (launch --port, or "
                               "JAX_COORDINATOR_ADDRESS)") from None


def initialize(init_timeout: int, heartbeat_timeout: int, stop: StopRequest | None = None) -> None:
    """Joins the run described by the environment (or detected by JAX); see the module doc. A
    `stop` request while joining: see `_join_or_stop`."""
    import jax

    where = _join_arguments()
    who = (f"process {where['process_id']} of {where['num_processes']}" if where["num_processes"] is not None
           else "this process")
    address = where["coordinator_address"] or "(auto-detected)"
    if where["process_id"] == 0 and where["coordinator_address"]:
        _check_port_free(where["coordinator_address"], who)
    # Gloo carries the cross-process collectives of CPU devices; other backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", False)  # see the module doc: StopVote
    # A failed connection aborts the process inside JAX with a stack trace, so this timer gives
    # up first, with one line; JAX's own deadline is set past it.
    timer = threading.Timer(init_timeout, _give_up, (who, address, init_timeout))
    timer.daemon = True
    timer.start()
    try:
        _join_or_stop(lambda: jax.distributed.initialize(**where, initialization_timeout=init_timeout + 60,
                                                         heartbeat_timeout_seconds=heartbeat_timeout,
                                                         shutdown_timeout_seconds=heartbeat_timeout), stop, who)
    except Exception as err:  # noqa: BLE001 - any failure to join is reported the same way
        raise StartupError(f"{who} could not join the run at {address} ({one_line(err)}); set "
                           "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None
    finally:
        timer.cancel()
    global _barrier_seconds
    _barrier_seconds = init_timeout
    if jax.process_count() > 1:
        _Watchdog.start(jax.process_index(), jax.process_count(), heartbeat_timeout)


def barrier(name: str) -> None:
    """Waits (up to --init-timeout) until every process gets here: the project's one way to wait
    for all processes (nothing to do with one). Through the coordination service, not a device
    collective: on CPU, a process that enters a collective more than 30 s before another fails
    (gloo's fixed timeout), and start-up and compiling are where processes drift that far apart
    on a busy machine. Each name is used once."""
    import jax

    if jax.process_count() == 1:
        return
    client = _runtime_client()
    if client is None:  # another JAX version: a device collective, without that protection
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"rexmoe:{name}", _barrier_seconds * 1000)


def _from_every_process(client, key: str, mine: str) -> list[str]:
    """Each process's `mine` for `key`, in process order, through the coordination service's
    key-value store: what every process knows once each has said its own."""
    import jax

    client.key_value_set(f"{key}:{jax.process_index()}", mine)
    return [client.blocking_key_value_get(f"{key}:{process}", _barrier_seconds * 1000)
            for process in range(jax.process_count())]


@contextlib.contextmanager
def refused_together(name: str):
    """A block every process runs (taking the workdir's lock, which only process 0 holds, and
    checking that each can write there): when any process refuses with a one-line error, every
    process raises it (its own, the others a ConfigError naming the process), so that all leave
    together, each with the line and exit status 2. Otherwise the others would wait for it at
    the next barrier, and it in the runtime's shutdown for them, until both timed out and JAX
    aborted them without the line. Each name is used once."""
    import jax

    client = _runtime_client()
    if jax.process_count() == 1 or client is None:
        yield
        return
    key = f"rexmoe:refused:{name}"
    try:
        yield
    except CommandError as err:
        client.key_value_set(f"{key}:{jax.process_index()}", f"refused: {err}")
        raise
    for process, outcome in enumerate(_from_every_process(client, key, "ok")):
        if outcome != "ok":
            raise ConfigError(f"process {process}: {outcome.removeprefix('refused: ')}")


def check_shared(path: pathlib.Path) -> None:
    """Raises ConfigError, on every process, unless every process reads at `path` what process
    0 wrote there (the workdir's lock: its pid, host and time), i.e. the workdir is one folder
    that all hosts share, as orbax's checkpoints need. A host that mounts another folder there
    (or none) would otherwise wait at the first checkpoint for ever."""
    import jax

    client = _runtime_client()
    if jax.process_count() == 1 or client is None:
        return
    if jax.process_index() == 0:
        client.key_value_set("rexmoe:shared:written", path.read_text())
    written = client.blocking_key_value_get("rexmoe:shared:written", _barrier_seconds * 1000)
    try:
        seen = path.read_text() == written
    except OSError:
        seen = False
    views = _from_every_process(client, "rexmoe:shared", "seen" if seen else "not seen")
    blind = [str(process) for process, view in enumerate(views) if view != "seen"]
    if blind:
        raise ConfigError(f"--workdir {str(path.parent)!r} is not one folder that every host shares: "
                          f"process {', '.join(blind)} does not see the {path.name} that process 0 wrote in "
                          "it; give a folder all hosts mount (NFS, Filestore, gcsfuse)")


class CompiledTogether:
    """A jitted function that, with several processes, is compiled on every process before any
    runs it, for each new signature (shapes, dtypes and shardings of the arrays, the static
    arguments): compile ahead, `barrier`, then call. The inference commands' steps go through
    it, so that a process whose compile is slower (a cold compilation cache) does not leave the
    others waiting in a collective past gloo's timeout. With one process, the call itself."""

    _barriers = 0  # a unique barrier name per compile, in the same order on every process

    def __init__(self, jitted):
        self.jitted = jitted
        self.signatures: set = set()
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        import jax

        if jax.process_count() > 1:
            signature = _signature(args, kwargs)
            if signature not in self.signatures:
                self.jitted.lower(*args, **kwargs).compile()  # fills the cache the call below reads
                CompiledTogether._barriers += 1
                barrier(f"compiled-{CompiledTogether._barriers}")
                self.signatures.add(signature)
        return self.jitted(*args, **kwargs)


def _signature(args, kwargs):
    """What decides a jitted function's compile: each array's shape, dtype and sharding, and the
    other (static) values as they are."""
    import jax

    leaves, tree = jax.tree.flatten((args, kwargs))
    return tree, tuple((tuple(leaf.shape), str(leaf.dtype), getattr(leaf, "sharding", None))
                       if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else leaf for leaf in leaves)


def _join_or_stop(join, stop: StopRequest | None, who: str) -> None:
    """Calls `join`, which blocks where no Python signal handler runs, on another thread, so that
    this one sees a stop request meanwhile. A process asked to stop while joining keeps waiting
    JOIN_PATIENCE seconds more: a preemption during start-up reaches every process at about the
    same time, and once all have joined they stop together after the first step, with a
    checkpoint. If the others do not come (a partner failed, and the launcher stops the rest),
    it ends as killed by the signal, with one line and nothing to save."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            join()
        except BaseException as err:  # noqa: BLE001 - raised again on the calling thread
            failure.append(err)

    thread = threading.Thread(target=run, name="rexmoe-join", daemon=True)
    thread.start()
    asked_at = None
    while thread.is_alive():
        thread.join(0.1)
        if stop is None or stop.signal_name is None or not thread.is_alive():
            continue
        asked_at = asked_at or time.monotonic()
        if time.monotonic() - asked_at > JOIN_PATIENCE:
            print(f"stopped by {stop.signal_name}: {who} had not joined the run {JOIN_PATIENCE:.0f} s later; "
                  "nothing to save", file=sys.stderr, flush=True)
            sig = getattr(signal, stop.signal_name)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
    if failure:
        raise failure[0]


def _give_up(who: str, address: str, seconds: int) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        why = "the coordinator answers, but not every process has joined"
    except (OSError, ValueError):
        why = "nothing answers there"
    print(f"error: {who} could not join the run at {address} within --init-timeout={seconds}s ({why}); check "
          "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, and that every process was started",
          file=sys.stderr, flush=True)
    os._exit(LOST_PROCESS)


def _runtime_client():
    """JAX's coordination-service client, or None. Private to JAX: without it (another JAX
    version) the watchdog is off and JAX's own heartbeat check still ends the process."""
    try:
        from jax._src import distributed as jax_distributed

        return getattr(jax_distributed.global_state, "client", None)
    except ImportError:
        return None


class _Watchdog:
    """Asks the coordination service which processes are alive; ends this one if any is not."""

    running: _Watchdog | None = None

    def __init__(self, client, me: int, count: int, heartbeat_timeout: int):
        self.client, self.me, self.count, self.timeout = client, me, count, heartbeat_timeout
        self.stopped = threading.Event()

    @classmethod
    def start(cls, me: int, count: int, heartbeat_timeout: int) -> None:
        client = _runtime_client()
        if client is None or not hasattr(client, "get_live_nodes"):
            return
        cls.running = cls(client, me, count, heartbeat_timeout)
        threading.Thread(target=cls.running.watch, name="rexmoe-watchdog", daemon=True).start()

    def watch(self) -> None:
        unreachable_since = None
        while not self.stopped.wait(_POLL_SECONDS):
            try:
                live = self.client.get_live_nodes(list(range(self.count)))
            except Exception as err:  # noqa: BLE001 - the coordinator (process 0) is gone or slow
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > self.timeout:
                    self.lost([0], f"the coordinator does not answer ({one_line(err)})")
                continue
            unreachable_since = None
            lost = sorted(set(range(self.count)) - set(live))
            if lost and not self.stopped.is_set():
                self.lost(lost, f"no heartbeat for --heartbeat-timeout={self.timeout}s")

    def lost(self, processes: list[int], why: str) -> None:
        names = ", ".join(str(p) for p in processes)
        print(f"error: process {self.me}: lost process {names} ({why}); the checkpoints already written "
              "are intact: start every process again to resume", file=sys.stderr, flush=True)
        os._exit(LOST_PROCESS)  # Not sys.exit: the main thread is stuck in a collective.


def exit_lost(err: BaseException) -> None:
    """Called when a collective failed: another process is gone. Exits now rather than through
    the runtime's shutdown, which would wait for the dead process; first gives the watchdog
    (which names the lost process) until the heartbeat timeout to act."""
    import jax

    me, watchdog = jax.process_index(), _Watchdog.running
    if watchdog is not None:
        try:
            watchdog.client.get_live_nodes(list(range(watchdog.count)))
        except Exception:  # noqa: BLE001 - the coordinator does not answer: it is the lost one
            watchdog.lost([0], f"a collective failed and the coordinator does not answer: {one_line(err)}")
        time.sleep(watchdog.timeout + 2 * _POLL_SECONDS)
    print(f"error: process {me}: lost another process (a collective failed: {one_line(err)}); the "
          "checkpoints already written are intact: start every process again to resume",
          file=sys.stderr, flush=True)
    os._exit(LOST_PROCESS)


def finish() -> None:
    """Leaves the run together with the other processes (nothing to do with one process)."""
    import jax

    if jax.process_count() == 1:
        return
    if _Watchdog.running is not None:
        _Watchdog.running.stopped.set()
    jax.distributed.shutdown()


class _Gather:
    """One row of `width` values per device of `mesh`, gathered onto every device: what each
    process holds. Compiled when made, so that the compiling happens before a barrier (see
    `barrier`)."""

    def __init__(self, mesh, dtype, width: int = 1):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        self.devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self.owner = np.asarray([d.process_index for d in mesh.devices.flat])
        self.sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        shape = jax.ShapeDtypeStruct((self.owner.size, width), dtype, sharding=self.sharding)
        gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self.fn = gather.lower(shape).compile()

    def __call__(self, value: np.ndarray):
        """Dispatches the gather of this process's `value` (one element); returns its future."""
        import jax

        shards = [jax.device_put(value[None], d) for d in self.devices]
        local = jax.make_array_from_single_device_arrays(
            (self.owner.size, *value.shape), self.sharding, shards)
        return self.fn(local)

    def by_process(self, result) -> dict[int, np.ndarray]:
        """A gathered result as {process: its value}."""
        rows = np.asarray(result.addressable_data(0))
        return {int(p): rows[i] for i, p in enumerate(self.owner)}


class StopVote:
    """Whether to stop after this step, the same answer on every process (see the module doc)."""

    def __init__(self, mesh):
        import jax

        self._gather = _Gather(mesh, np.int32) if jax.process_count() > 1 else None
        self._pending = None
        self.requested_by: list[int] = []  # the processes whose request decided the stop

    def __call__(self, requested_here: bool) -> bool:
        """One process: its own request, at once. Several: the requests cast one step earlier
        anywhere, read while the device runs this step (so a stop comes a step later)."""
        if self._gather is None:
            return requested_here
        cast = self._gather(np.asarray([requested_here], np.int32))
        previous, self._pending = self._pending, cast
        if previous is None:
            return False
        self.requested_by = sorted(p for p, flag in self._gather.by_process(previous).items() if flag[0])
        return bool(self.requested_by)


def check_same(mesh, what: dict) -> None:
    """Raises ConfigError, on every process, unless all processes hold the same `what` (JSON-
    like values: each field of the config, the step to resume): their control flow would
    differ. The message names the values that differ and the groups of processes that agree on
    each."""
    import jax

    if jax.process_count() == 1:
        return
    gather = _Gather(mesh, np.uint32, width=len(what))
    barrier("same")  # after compiling the initial state, which takes each process its own time
    digests = np.asarray([zlib.crc32(json.dumps(value, sort_keys=True).encode()) for value in what.values()],
                         np.uint32)
    raise_if_different(list(what), gather.by_process(gather(digests)))


def raise_if_different(names: list[str], values: dict[int, np.ndarray], most: int = 3) -> None:
    """`values`: each process's row of digests, one per name. Raises ConfigError naming the
    names whose digests differ (the first `most` of them, then how many more), each with the
    groups of processes that agree on it."""
    differences = []
    for column, name in enumerate(names):
        groups: dict[int, list[int]] = {}
        for process, row in sorted(values.items()):
            groups.setdefault(int(row[column]), []).append(process)
        if len(groups) > 1:
            differences.append(f"the {name} (groups of processes that agree: {sorted(groups.values())})")
    if differences:
        more = f" and on {len(differences) - most} more" if len(differences) > most else ""
        named = " and on ".join(differences[:most])
        raise ConfigError(f"the processes disagree on {named}{more}; start every process with the same "
                          "command on the same --workdir")
