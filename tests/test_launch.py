"""The one-machine launcher, with small Python commands standing in for train.py: each process's
environment, exit codes, stopping the others when one fails, and signals passed on."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from conftest import TEST_XLA_FLAGS
from files import one_error_line

ROOT = pathlib.Path(__file__).resolve().parent.parent


def launch(*args, timeout=60, **popen):
    return subprocess.Popen([sys.executable, "-m", "rexmoe_jax.launch", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc, timeout=60):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()  # the launched processes die with it


def test_each_process_gets_its_place_in_the_run(tmp_path):
    """Each process's environment; its lines come out whole, after "[i] ", though the processes
    run unbuffered and `print` writes each of its pieces on its own."""
    script = tmp_path / "show.py"
    script.write_text("import os, sys\n"
                      "for n in range(300):\n"
                      "    print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], "
                      "os.environ['JAX_COORDINATOR_ADDRESS'], n)\n"
                      "    print('e', n, file=sys.stderr)\n"
                      "print('no newline', end='')\n")
    proc = launch("-n", "3", "--port", "4321", "--", str(script))
    out, err = finish(proc)
    assert proc.returncode == 0, err
    for i in range(3):
        mine = [line for line in out.splitlines() if line.startswith(f"[{i}] ")]
        expected = [f"[{i}] {i} 3 127.0.0.1:4321 {n}" for n in range(300)] + [f"[{i}] no newline"]
        assert mine == expected
        assert [line for line in err.splitlines() if line.startswith(f"[{i}] ")] == [
            f"[{i}] e {n}" for n in range(300)]
    assert len(out.splitlines()) == 3 * 301
    assert err.splitlines()[-1] == "launch: exit codes [0, 0, 0]"


def test_gloo_connection_reports_are_left_out_unless_short(tmp_path):
    """gloo's line for a group whose peers all connected is dropped; one short of its peers, and
    lines that only look alike, are passed on."""
    def report(rank, connected, expected, tail=""):
        return (f"[Gloo] Rank {rank} is connected to {connected} peer ranks. "
                f"Expected number of connected peer ranks is : {expected}{tail}")

    script = tmp_path / "gloo.py"
    script.write_text(f"import sys\n"
                      f"print({report(0, 3, 3)!r}, file=sys.stderr)\n"
                      f"print({report(1, 2, 3)!r}, file=sys.stderr)\n"
                      f"print({report(0, 1, 1, '!')!r})\n"
                      f"print('step 1')\n")
    proc = launch("-n", "2", "--", str(script))
    out, err = finish(proc)
    assert proc.returncode == 0, err
    for i in range(2):
        mine = [line for line in err.splitlines() if line.startswith(f"[{i}] ")]
        assert mine == [f"[{i}] {report(1, 2, 3)}"]
        assert [line for line in out.splitlines() if line.startswith(f"[{i}] ")] == [
            f"[{i}] {report(0, 1, 1, '!')}", f"[{i}] step 1"]


def test_a_failure_stops_the_others_and_sets_the_status():
    code = ("import os, sys, time\n"
            "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(600)\n")
    start = time.monotonic()
    proc = launch("-n", "2", "--", sys.executable, "-c", code)
    _, err = finish(proc)
    assert proc.returncode == 3 and time.monotonic() - start < 30
    assert "process 1 exited with code 3; stopping the others" in err
    assert "launch: exit codes [-15, 3]" in err  # the sleeper got SIGTERM


def test_sigterm_is_passed_on_to_every_process(tmp_path):
    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
            f"open(r'{tmp_path}/' + os.environ['JAX_PROCESS_ID'], 'w').close()\n"
            "time.sleep(600)\n")
    proc = launch("-n", "2", "--", sys.executable, "-c", code)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc)
    assert proc.returncode == 0 and "launch: exit codes [0, 0]" in err, err


def test_a_command_that_cannot_start_is_one_line_and_starts_nothing(tmp_path):
    (tmp_path / "not-executable").write_text(f"#!/bin/sh\necho started > {tmp_path / 'started'}\n")
    for command, why in ((str(tmp_path / "nonexistent"), "does not exist"), ("no-such-command-here", "does not exist"),
                         (str(tmp_path / "not-executable"), "is not executable"), (str(tmp_path), "is not a file")):
        proc = launch("-n", "2", "--", command)
        out, err = finish(proc)
        assert proc.returncode == 2 and out == ""
        assert one_error_line(err) == f"error: cannot start {command!r}: it {why} (and no such command is on PATH)"
    script = str(tmp_path / "nosuch.py")
    proc = launch("-n", "2", "--", script)
    out, err = finish(proc)
    assert proc.returncode == 2 and out == ""
    assert one_error_line(err) == f"error: cannot start {script!r}: that Python script does not exist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-executable"]


@pytest.mark.e2e
def test_train_py_waiting_to_join_ends_when_its_partner_fails():
    """Process 1 fails before joining; process 0, train.py waiting for it at the coordinator,
    ends on the launcher's SIGTERM after distributed.JOIN_PATIENCE, not at the end of the 60 s
    grace."""
    env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS)
    start = time.monotonic()
    proc = launch("-n", "2", "--", "bash", "-c",
                  f'if [ "$JAX_PROCESS_ID" = 1 ]; then sleep 3; exit 3; fi; exec {sys.executable} train.py '
                  "--distributed --init-timeout 120 --workdir /nonexistent/never-made mesh.num_devices=1", env=env)
    _, err = finish(proc, timeout=120)
    assert proc.returncode == 3 and time.monotonic() - start < 40, err
    assert "launch: exit codes [-15, 3]" in err and "Traceback" not in err
