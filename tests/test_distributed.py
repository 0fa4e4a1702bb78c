"""Several processes as one run (2 processes x 2 simulated CPU devices, mesh data=2 x expert=2,
gloo collectives): the same losses as one process on the same mesh, a stop request to one
process, a dead process, restarts on another process count, per-process data, and start-up
errors. Every group of processes is killed when its test ends, passed or failed."""

import json
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from processes import ROOT, Processes, child_env, handles_sigterm, train, wait_until

from rexmoe_jax import loop
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.config import ConfigError
from rexmoe_jax.runlog import read_records
from rexmoe_jax.runtime import distributed, launch

STEPS = 12
SMALL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.expert_ffn=16", "model.num_experts=4", "model.top_k=2", "model.reuse=2",
         "psr.schedule=linear", "psr.start_step=3", "psr.end_step=9", "data.seq_len=16",
         "data.batch_size=8", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=6",
         "train.eval_batches=1", "train.checkpoint_every=4", "train.sample_tokens=0",
         "mesh.data=2", "mesh.expert=2", "optim.grad_accum=2"]  # micro-batches of 4: one row per device
RUN_LIMIT = 300  # seconds for one multi-process run on a busy 2-core machine
HEARTBEAT = 10


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    """SMALL on 200 KJV chapters (JSON Lines): tokenized in a fraction of the book's time."""
    from rexmoe_jax.data import read_embedded_documents

    path = tmp_path_factory.mktemp("corpus") / "kjv200.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_embedded_documents()[:200]))
    return SMALL + [f"data.corpus={path}"]


def one_process(args, workdir, stop_after: int = 0) -> str:
    """The same run (train.py's default preset) as one process on 4 of 8 devices, in a process
    of its own (tests/processes.py one), stopped after `stop_after` when > 0: its output."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "processes.py"), "one", str(stop_after),
                           str(workdir), *args, "mesh.num_devices=4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=RUN_LIMIT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory):
    """One process, the same data=2 x expert=2 mesh, uninterrupted: its metrics."""
    workdir = tmp_path_factory.mktemp("reference")
    assert f"one process: ended at step {STEPS}" in one_process(args, workdir)
    return records(workdir)


def records(workdir):
    return [{k: v for k, v in r.items() if k not in loop.TIMED}
            for r in read_records(workdir / "metrics.jsonl")]


def assert_same_curve(workdir, reference, rtol=1e-5):
    """Step by step, every logged loss and evaluation within rtol (2 processes vs 1: gloo sums
    in another order than one process's collectives)."""
    got = records(workdir)
    assert [r["step"] for r in got] == [r["step"] for r in reference]
    for mine, ref in zip(got, reference):
        for key in ("loss", "lb_loss", "eval_loss"):
            if key in ref:
                np.testing.assert_allclose(mine[key], ref[key], rtol=rtol,
                                           err_msg=f"{key} at step {ref['step']}")


def multiprocess_env():
    """This test's environment for a launcher or a lone process: the test compilation cache,
    no device count (--simulate-devices sets it), no process variables."""
    env = child_env(0, 1, 0)
    for name in distributed.ENV_VARS:
        env.pop(name)
    return env


def checkpoints(workdir):
    checkpointer = Checkpointer(workdir, 3)
    steps = checkpointer.steps()
    checkpointer.close()
    return steps


@pytest.mark.e2e
def test_two_processes_equal_one_process(args, reference, tmp_path):
    """python -m rexmoe_jax.launch -n 2 -- train.py --distributed ...: every logged value of the
    12 steps matches one process on the same mesh within 1e-5, the end-of-run sample is decoded,
    and both processes exit 0."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "rexmoe_jax.launch", "-n", "2", "--",
               *train(["--workdir", str(workdir), *args, "train.sample_tokens=4"])]
    with open(tmp_path / "launch.log", "w") as out:
        launcher = subprocess.Popen(command, cwd=ROOT, env=multiprocess_env(), stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            code = launcher.wait(timeout=RUN_LIMIT)
        finally:
            if launcher.poll() is None:
                launcher.kill()  # its processes die with it (PR_SET_PDEATHSIG)
    output = (tmp_path / "launch.log").read_text()
    assert code == 0 and "launch: exit codes [0, 0]" in output, output[-3000:]
    assert "\n[0] sample: " in output, output[-3000:]
    assert_same_curve(workdir, reference)
    assert checkpoints(workdir)[-1] == STEPS


def stop_one(group, rng, when):
    """SIGTERM to one process, chosen by `rng`, once `when()` holds."""
    victim = rng.randrange(2)
    wait_until(when, RUN_LIMIT, "the moment to send SIGTERM", group)
    group.procs[victim].send_signal(signal.SIGTERM)
    return victim


def saving(workdir, after):
    """Whether orbax is writing a checkpoint of a step after `after` (its temporary folder)."""
    folder = workdir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return any(".orbax-checkpoint-tmp" in n and int(n.split(".")[0]) > after for n in names)


def assert_stopped_together(group, workdir, victim, previous):
    codes = group.wait(RUN_LIMIT)
    assert codes == [0, 0], group.describe()
    stopped = checkpoints(workdir)[-1]
    assert previous < stopped < STEPS, group.describe()
    assert f"after step {stopped}; checkpoint saved" in group.output(0), group.describe()
    assert "received SIGTERM" in group.output(victim)
    return stopped


@pytest.mark.e2e
def test_sigterm_to_one_process_stops_both_at_one_step_then_resumes(args, reference, tmp_path):
    """SIGTERM to a random process during start-up: both finish the same step, save it together
    and exit 0. Resumed on 2 processes, SIGTERM to a random one while a checkpoint is being
    written: the same again. Resumed on 1 process (2 -> 1): the uninterrupted run's curve."""
    seed = random.randrange(1 << 30)
    rng, workdir = random.Random(seed), tmp_path / "run"
    command = train(["--workdir", str(workdir), *args], HEARTBEAT)
    with Processes(tmp_path / "start-up", 2, command) as group:
        victim = stop_one(group, rng, lambda: all(handles_sigterm(p.pid) for p in group.procs))
        first = assert_stopped_together(group, workdir, victim, 0)
    with Processes(tmp_path / "saving", 2, command) as group:
        victim = stop_one(group, rng, lambda: saving(workdir, first))
        second = assert_stopped_together(group, workdir, victim, first)
        assert f"resumed from step {first}" in group.output(0)
    ended = one_process(args, workdir)
    assert f"one process: ended at step {STEPS}" in ended, f"seed {seed}: stops after {first} and {second}"
    assert_same_curve(workdir, reference)


@pytest.mark.e2e
def test_one_process_checkpoint_resumes_on_two(args, reference, tmp_path):
    """Stopped at step 5 on one process: a new run on two processes started from that checkpoint
    (--from) and the run itself resumed on two both continue the one-process curve."""
    workdir = tmp_path / "run"
    assert "one process: stopped after step 5" in one_process(args, workdir, stop_after=5)
    branch = tmp_path / "branch"
    source = workdir / "checkpoints" / "5"
    command = train(["--workdir", str(branch), "--from", str(source), *args])
    with Processes(tmp_path / "branch-logs", 2, command) as group:
        assert group.wait(RUN_LIMIT) == [0, 0], group.describe()
        assert f"started from checkpoint 5 in {workdir.resolve() / 'checkpoints'}" in group.output(0)
    assert_same_curve(branch, [r for r in reference if r["step"] > 5])
    with Processes(tmp_path / "logs", 2, train(["--workdir", str(workdir), *args])) as group:
        assert group.wait(RUN_LIMIT) == [0, 0], group.describe()
        assert "resumed from step 5" in group.output(0)
    assert_same_curve(workdir, reference)


@pytest.mark.e2e
def test_a_dead_process_ends_the_other_and_the_run_resumes(args, tmp_path):
    """SIGKILL to a random process after the first checkpoint: the other exits non-zero within
    the heartbeat timeout, and its log names what was lost: process N (the watchdog's line, or
    JAX's list of tasks without heartbeats), or the coordination service that process 0 runs
    (JAX ends the others at once then). The run resumes from the newest checkpoint."""
    victim = random.randrange(2)
    workdir = tmp_path / "run"
    longer = [*args, "train.steps=400"]
    with Processes(tmp_path / "logs", 2, train(["--workdir", str(workdir), *longer], HEARTBEAT)) as group:
        wait_until(lambda: (workdir / "checkpoints" / "4").is_dir(), RUN_LIMIT, "checkpoint 4", group)
        group.procs[victim].kill()
        killed = time.monotonic()
        codes = group.wait(HEARTBEAT + 30)
        survivor = 1 - victim
        took = time.monotonic() - killed
        assert codes[victim] == -signal.SIGKILL and codes[survivor] != 0, group.describe()
        assert took < HEARTBEAT + 30
        said = group.output(survivor)
        named = ("coordination_service",) if victim == 0 else (
            f"lost process {victim}", f"stopped sending heartbeats):\n{victim}")
        assert any(name in said for name in named), group.describe()
    print(f"process {survivor} exited {took:.1f}s after process {victim} was killed (heartbeat timeout "
          f"{HEARTBEAT}s), status {codes[survivor]}")
    newest = checkpoints(workdir)[-1]
    assert f"one process: ended at step {STEPS}" in one_process([*longer, "train.steps=12"], workdir)
    assert newest >= 4


def test_each_process_feeds_only_its_rows_of_the_global_batch(tmp_path):
    with Processes(tmp_path, 2, [str(ROOT / "tests" / "processes.py")]) as group:
        assert group.wait(RUN_LIMIT) == [0, 0], group.describe()
        for process in range(2):
            assert group.output(process).count("read only those") == 2, group.describe()


@pytest.mark.parametrize("differing,line", [
    ("config", "error: the processes disagree on the config (groups of processes that agree: [[0, 2], [1]]); "
               "start every process with the same command on the same --workdir"),
    ("step", "error: the processes disagree on the resumed step (groups of processes that agree: [[0, 1], [2]]); "
             "start every process with the same command on the same --workdir"),
])
@pytest.mark.e2e
def test_processes_that_disagree_stop_at_start_naming_the_groups(tmp_path, differing, line):
    """Three processes, one of which holds another config or resumes another step: every one
    exits with status 2 and the same single line naming what differs and who agrees."""
    with Processes(tmp_path, 3, [str(ROOT / "tests" / "processes.py"), "agree", differing]) as group:
        assert group.wait(RUN_LIMIT) == [2, 2, 2], group.describe()
        for i in range(3):  # gloo's "[Gloo] Rank i is connected" goes to stdout, the logs hold both
            said = [text for text in group.output(i).splitlines() if text.strip() and not text.startswith("[Gloo]")]
            assert said == [line], group.describe()


@pytest.mark.e2e
def test_a_lock_left_by_another_host_stops_every_process_with_its_line(tmp_path, args):
    """The restart after a host crashed: the workdir's lock names that host. Only process 0
    takes the lock, so only it sees the refusal; every process must still end at once, with
    status 2 and a line naming the file to delete, not wait for process 0 until JAX aborts."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / "run.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "node7-gone", "since": "2026-12-06T09:00:00"}))
    started = time.monotonic()
    with Processes(tmp_path, 2, train(["--workdir", str(workdir), *args])) as group:
        assert group.wait(RUN_LIMIT) == [2, 2], group.describe()
    took = time.monotonic() - started
    for process, prefix in ((0, "error: "), (1, "error: process 0: ")):
        said = [text for text in group.output(process).splitlines() if text.startswith("error:")]
        line = (f"{prefix}--workdir {str(workdir)!r} is locked by process 4242 on host node7-gone "
                f"(since 2026-12-06T09:00:00); if that run has ended, delete {lock}")
        assert said == [line], group.describe()
    assert lock.exists() and sorted(p.name for p in workdir.iterdir()) == ["run.lock"]
    print(f"both processes ended {took:.1f}s after starting")


@pytest.mark.e2e
def test_a_workdir_that_is_not_shared_stops_every_process_at_start(tmp_path, args):
    """Each process given a folder of its own (a host that did not mount the shared one): they
    would wait for each other at the first checkpoint for ever; at start each says which
    process does not see the workdir's lock that process 0 wrote, and nothing is left behind."""
    folder = tmp_path / "hosts"
    command = [str(ROOT / "tests" / "processes.py"), "unshared", str(folder), *args]
    with Processes(tmp_path, 2, command) as group:
        assert group.wait(RUN_LIMIT) == [2, 2], group.describe()
    for process in range(2):
        said = [text for text in group.output(process).splitlines() if text.startswith("error:")]
        workdir = str(folder / f"host{process}")
        assert said == [f"error: --workdir {workdir!r} is not one folder that every host shares: process 1 "
                        "does not see the run.lock that process 0 wrote in it; give a folder all hosts mount "
                        "(NFS, Filestore, gcsfuse)"], group.describe()
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.e2e
def test_a_refusal_on_another_process_than_0_stops_every_process(tmp_path, args):
    """Process 1 cannot write its --workdir (a file stands there): it refuses, and process 0,
    which could go on, ends too, with the line naming process 1, not waiting for it."""
    folder = tmp_path / "hosts"
    folder.mkdir()
    (folder / "host1").write_text("a file, not a folder")
    command = [str(ROOT / "tests" / "processes.py"), "unshared", str(folder), *args]
    with Processes(tmp_path, 2, command) as group:
        assert group.wait(RUN_LIMIT) == [2, 2], group.describe()
    refusal = f"--workdir {str(folder / 'host1')!r} is not writable ("
    for process, prefix in ((0, "error: process 1: "), (1, "error: ")):
        said = [text for text in group.output(process).splitlines() if text.startswith("error:")]
        assert len(said) == 1 and said[0].startswith(prefix + refusal), group.describe()
    assert sorted(p.name for p in folder.iterdir()) == ["host1"]


def test_disagreement_names_every_value_that_differs():
    values = {0: np.asarray([7, 1]), 1: np.asarray([8, 1]), 2: np.asarray([7, 2]), 3: np.asarray([8, 2])}
    with pytest.raises(ConfigError) as err:
        distributed.raise_if_different(["config", "resumed step"], values)
    assert str(err.value).startswith("the processes disagree on the config (groups of processes that agree: "
                                     "[[0, 2], [1, 3]]) and on the resumed step (groups of processes that agree: "
                                     "[[0, 1], [2, 3]]); ")
    distributed.raise_if_different(["config"], {0: np.asarray([5]), 1: np.asarray([5])})
    # Past three, the rest are counted: five values differ between two processes.
    with pytest.raises(ConfigError) as err:
        distributed.raise_if_different(list("abcdef"), {0: np.arange(6), 1: np.asarray([0, 9, 9, 9, 9, 9])})
    agree = "(groups of processes that agree: [[0], [1]])"
    assert str(err.value).startswith(f"the processes disagree on the b {agree} and on the c {agree} and on "
                                     f"the d {agree} and on 2 more; start every ")


def test_compiled_together_compiles_then_waits_for_all_before_each_new_signature(monkeypatch):
    """With several processes, each new signature is compiled, then a barrier, then run; a call
    with a signature seen before goes straight to the compiled function."""
    import jax
    import jax.numpy as jnp

    events = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda name: events.append(("barrier", name)))

    def double(x, *, scale):
        events.append(("trace", x.shape, scale))
        return x * scale

    step = distributed.CompiledTogether(jax.jit(double, static_argnames="scale"))
    np.testing.assert_array_equal(step(jnp.ones(3), scale=2), np.full(3, 2.0))
    step(jnp.zeros(3), scale=2)  # same shapes, dtype, sharding and static argument
    step(jnp.ones(4), scale=2)  # a new shape
    np.testing.assert_array_equal(step(jnp.ones(4), scale=3), np.full(4, 3.0))  # a new static value
    kinds = [event[0] for event in events]
    assert kinds == ["trace", "barrier", "trace", "barrier", "trace", "barrier"], events
    assert len({event[1] for event in events if event[0] == "barrier"}) == 3  # a name used once
    assert [event[1:] for event in events if event[0] == "trace"] == [((3,), 2), ((4,), 2), ((4,), 3)]


def test_compiled_together_with_one_process_is_the_call_itself(monkeypatch):
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(distributed, "barrier", lambda name: pytest.fail("one process waits for nobody"))
    step = distributed.CompiledTogether(jax.jit(lambda x: x + 1))
    np.testing.assert_array_equal(step(jnp.zeros(2)), np.ones(2))


@pytest.mark.e2e
def test_train_processes_with_different_configs_exit_2(args, tmp_path):
    """train.py as two processes of one run, started with different train.steps: both stop at
    the start-up check with exit status 2 and one error line, before training a step."""
    port = launch.free_port()
    procs = []
    for i, steps in enumerate((10, 12)):
        with open(tmp_path / f"process{i}.err", "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, *train(["--workdir", str(tmp_path / "run"), *args, f"train.steps={steps}"])],
                cwd=ROOT, env=child_env(i, 2, port), stdout=subprocess.DEVNULL, stderr=err))
    try:
        codes = [p.wait(RUN_LIMIT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errors = [[x for x in (tmp_path / f"process{i}.err").read_text().splitlines() if x.startswith("error:")]
              for i in range(2)]
    assert codes == [2, 2], errors
    for found in errors:
        assert found == ["error: the processes disagree on the config's train.steps (groups of processes "
                         "that agree: [[0], [1]]); start every process with the same command on the same "
                         "--workdir"]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.e2e
def test_sigterm_while_joining_alone_ends_the_process_after_the_patience(tmp_path):
    """Process 0 of 2, whose partner never comes, waits inside JAX's join (a C++ call no Python
    handler interrupts): after SIGTERM it waits distributed.JOIN_PATIENCE seconds for the partner,
    then ends as killed by the signal, with one line, long before --init-timeout."""
    port = launch.free_port()
    env = dict(multiprocess_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID="0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--distributed", "--init-timeout", "120",
                             "--workdir", str(tmp_path / "run"), "mesh.num_devices=1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):  # the coordinator is up: the process is inside the join
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, err = proc.communicate(timeout=distributed.JOIN_PATIENCE + 30)
    finally:
        proc.kill()
    took = time.monotonic() - start
    assert proc.returncode == -signal.SIGTERM and distributed.JOIN_PATIENCE <= took < distributed.JOIN_PATIENCE + 10
    assert "Traceback" not in err
    assert f"stopped by SIGTERM: process 0 of 2 had not joined the run {distributed.JOIN_PATIENCE:.0f} s later; " \
           "nothing to save" in err.splitlines()
    assert not (tmp_path / "run").exists()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("env,message", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "could not join the run at 127.0.0.1:"),
    ({"JAX_NUM_PROCESSES": "2"}, "set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
])
def test_startup_errors_are_one_line_and_bounded(env, message):
    """Nobody at the coordinator's port: a one-line error once --init-timeout has passed."""
    env = dict(multiprocess_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{launch.free_port()}", **env)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "train.py", "--distributed", "--init-timeout", "3", "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == distributed.LOST_PROCESS, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert message in lines[0] and time.monotonic() - start < 60


def test_several_processes_need_distributed():
    env = dict(multiprocess_env(), JAX_NUM_PROCESSES="2")
    done = subprocess.run([sys.executable, "train.py", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2 and "pass --distributed" in done.stderr


def test_a_coordinator_port_taken_on_this_host_is_one_line(monkeypatch):
    """Process 0 hosts the coordinator: with its port taken (here by a listening socket) gRPC
    would end the process with a segmentation fault; the check before joining says why."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
        monkeypatch.setenv("JAX_PROCESS_ID", "0")
        with pytest.raises(distributed.StartupError) as err:
            distributed.initialize(init_timeout=10, heartbeat_timeout=10)
    assert str(err.value) == (f"process 0 of 2 hosts the coordinator at 127.0.0.1:{port}, but port {port} "
                              "is taken on this host (Address already in use); choose a free port (launch "
                              "--port, or JAX_COORDINATOR_ADDRESS)")
    assert err.value.exit_status == 5
