"""Starts N processes of one command on this machine as one multi-process JAX run: to try
multi-host training on a laptop, and for the multi-process tests.

    python -m rexmoe_jax.launch -n 2 -- train.py --distributed --simulate-devices 2 \\
        mesh.data=2 mesh.expert=2

Process i gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES=N and
JAX_PROCESS_ID=i. A command that starts with a .py file or -m runs with this Python. Each line a
process prints comes out whole, on the launcher's stdout or stderr as the process wrote it,
after "[i] " (process i), so that lines of different processes never mix; gloo's report that
a process reached all the peers it expected (CPU collectives, a few lines per process at each
new group of devices) is left out, and kept when the counts differ. SIGTERM or
SIGINT to the launcher is passed on to every process (each in its own session, so that a Ctrl-C
in the terminal reaches them once, through the launcher); they stop together after a step and
save it. When a process fails, the others get SIGTERM and, --grace seconds later, SIGKILL; if
the launcher itself is killed, so are they (Linux). The exit status is 0 when every process
exits 0, else the first failure's (128 + n for signal n).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time

from rexmoe_jax import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, port: int) -> dict[str, str]:
    """The environment of process `index` of `count`: train.py --distributed reads it."""
    return dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
                JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")


def _die_with_parent() -> None:
    """In a child, before exec: the kernel sends it SIGKILL when the launcher dies (Linux), so
    a killed launcher leaves no process behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


# gloo (CPU collectives) reports every group it joins; only a shortfall is news.
_GLOO_CONNECTED = re.compile(rb"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
                             rb"Expected number of connected peer ranks is : (\d+)")


def _news(line: bytes) -> bool:
    """Whether a process's line is passed on: all but gloo's complete-connection reports."""
    connected = _GLOO_CONNECTED.fullmatch(line.rstrip(b"\r"))
    return connected is None or connected[1] != connected[2]


class Lines:
    """The processes' output, passed on a whole line at a time with "[i] " in front."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.selector = selectors.DefaultSelector()
        self.partial: dict[int, bytes] = {}
        for i, proc in enumerate(procs):
            for pipe, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                self.selector.register(pipe, selectors.EVENT_READ, (f"[{i}] ".encode(), sink))

    def pass_on(self, timeout: float) -> bool:
        """Passes on what the processes wrote within `timeout` seconds; False once every pipe
        is closed."""
        if not self.selector.get_map():
            time.sleep(timeout)
            return False
        for key, _ in self.selector.select(timeout):
            prefix, sink = key.data
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:  # closed: the last line may lack its newline
                self.selector.unregister(key.fileobj)
                key.fileobj.close()
                rest = self.partial.pop(key.fd, b"")
                self._write(sink, [prefix + rest + b"\n"] if rest else [])
                continue
            *lines, self.partial[key.fd] = (self.partial.get(key.fd, b"") + chunk).split(b"\n")
            self._write(sink, [prefix + line + b"\n" for line in lines if _news(line)])
        return True

    @staticmethod
    def _write(sink, lines: list[bytes]) -> None:
        if not lines:
            return
        sink.flush()
        if hasattr(sink, "buffer"):  # bytes as written
            sink.buffer.write(b"".join(lines))
        else:  # a text-only stream (a notebook's): decoded
            sink.write(b"".join(lines).decode(errors="replace"))
        sink.flush()


def resolve(command: list[str]) -> list[str]:
    """The command line to start: a script or module with this Python; anything else must name
    an executable file (checked here, so that a typo is one line and nothing starts)."""
    if command[0] == "-m":
        return [sys.executable, *command]
    if command[0].endswith(".py"):
        if not pathlib.Path(command[0]).is_file():
            raise cli.BadInput(f"cannot start {command[0]!r}: that Python script does not exist")
        return [sys.executable, *command]
    found = shutil.which(command[0])
    if found is None:
        path = pathlib.Path(command[0])
        why = ("is not executable" if path.is_file() else "is not a file") if path.exists() else "does not exist"
        raise cli.BadInput(f"cannot start {command[0]!r}: it {why} (and no such command is on PATH)")
    return [found, *command[1:]]


class Group:
    """The N processes; `wait` returns the launcher's exit status."""

    def __init__(self, command: list[str], count: int, port: int, grace: float):
        command = resolve(command)
        self.grace = grace
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(count):
                # preexec_fn is safe here: the launcher starts no threads.
                self.procs.append(subprocess.Popen(command, env=process_env(i, count, port), start_new_session=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   preexec_fn=_die_with_parent))  # noqa: PLW1509
        except BaseException as err:
            self.signal_all(signal.SIGKILL)  # none is left behind
            for proc in self.procs:
                proc.wait()
            if isinstance(err, OSError):
                raise cli.BadInput(f"cannot start {command[0]!r}: {err.strerror}") from None
            raise
        self.lines = Lines(self.procs)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def wait(self) -> int:
        failure, killing_at = None, None
        while any(proc.poll() is None for proc in self.procs):
            self.lines.pass_on(timeout=0.1)
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code not in (None, 0) and failure is None:
                    failure = code
                    print(f"launch: process {i} exited with {_status(code)}; stopping the others",
                          file=sys.stderr, flush=True)
                    self.signal_all(signal.SIGTERM)
                    killing_at = time.monotonic() + self.grace
            if killing_at is not None and time.monotonic() > killing_at:
                self.signal_all(signal.SIGKILL)
        drain_until = time.monotonic() + 5  # a process's own children may hold its pipes open
        while self.lines.pass_on(timeout=0.1) and time.monotonic() < drain_until:
            pass
        codes = [proc.returncode for proc in self.procs]
        print(f"launch: exit codes {codes}", file=sys.stderr, flush=True)
        if failure is None:
            return 0
        return 128 - failure if failure < 0 else failure


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m rexmoe_jax.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=0, help="the coordinator's port (default: a free one)")
    parser.add_argument("--grace", type=float, default=60.0, metavar="SECONDS",
                        help="after a failure, how long the others get to exit before SIGKILL (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. train.py ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_processes < 1:
        parser.error("give -n N >= 1 and a command after --")
    group = Group(command, args.num_processes, args.port or free_port(), args.grace)

    def forward(signum, _frame):
        group.signal_all(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return group.wait()

