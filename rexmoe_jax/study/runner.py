"""The study queue: train.py subprocesses pinned to their own cores, resumed, recorded.

One loop in the main thread starts runs into free slots, polls them, prints progress and writes
a record when one finishes. Signals only set a counter; the loop forwards them, so a signal
that lands while a child is being started is not lost. Children run in their own session: a
Ctrl-C in the terminal reaches only this process, which passes it on once (train.py quits
without saving on a second signal).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time

from rexmoe_jax import outputs
from rexmoe_jax.cli import INTERRUPTED
from rexmoe_jax.runlog import read_records
from rexmoe_jax.runtime.workdir import METRICS_FILE
from rexmoe_jax.sources import PREPARED_META, corpus_files
from rexmoe_jax.study import record as study_record
from rexmoe_jax.study.spec import ROOT, TRAIN_SCRIPT, Arm, Study, StudyError

# XLA:CPU flags that size its thread pools; replaced by the runner's own for each child.
_XLA_THREAD_FLAGS = ("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                     "TF_NUM_INTRAOP_THREADS")


def _usable_cores() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else \
        tuple(range(os.cpu_count() or 1))


def parse_cores(text: str, usable: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """"1" or "0-3" or "0,2,4-5" -> the core ids; "" -> every core this process may use. Each
    must be one this process may use (`usable`, default: its affinity), so that pinning a
    training cannot fail after it has started."""
    usable = _usable_cores() if usable is None else usable
    if not text:
        return usable
    cores = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            span = range(int(first), int(last or first) + 1)
            if not span:
                raise ValueError(part)  # a range backwards, like 1-0
            cores += span
    except ValueError:
        raise StudyError(f"--cores {text!r}: expected core ids like 1 or 0-3 or 0,2,4-5") from None
    unusable = sorted(set(cores) - set(usable))
    if unusable:
        raise StudyError(f"--cores {text!r}: core {unusable[0]} is not one this machine lets it use "
                         f"({','.join(map(str, usable))})")
    return tuple(sorted(set(cores)))


@dataclasses.dataclass(frozen=True)
class Options:
    corpus: str
    runs: pathlib.Path  # Run folders: runs/<study>/<arm>/seed<k>.
    results: pathlib.Path
    slots: tuple[tuple[int, ...], ...]  # The cores of each concurrent training.
    dry_run: bool = False
    arms: tuple[str, ...] = ()  # Only these arms this sitting (a gate before the rest); () means all.
    seeds: tuple[int, ...] = ()  # Only these seeds this sitting (runs that fit it); () means all.
    train_script: pathlib.Path = TRAIN_SCRIPT  # Tests substitute a fake trainer.
    poll_seconds: float = 2.0
    progress_seconds: float = 300.0

    @classmethod
    def from_args(cls, args, study: Study, results: pathlib.Path) -> Options:
        if study.corpus and not args.corpus:
            raise StudyError(f"this study trains on a corpus built with: {study.corpus}; pass --corpus DIR")
        if args.corpus and not pathlib.Path(args.corpus).exists():
            raise StudyError(f"--corpus {args.corpus!r} does not exist")
        if args.corpus and not (pathlib.Path(args.corpus) / PREPARED_META).is_file():
            files = corpus_files(args.corpus, setting="--corpus")
            if not any(path.stat().st_size for path in files):  # every training would fail on it
                raise StudyError(f"--corpus {args.corpus!r}: its {len(files)} file(s) are empty; give a "
                                 "corpus with text")
        if study.corpus and not (pathlib.Path(args.corpus) / PREPARED_META).is_file():
            # A build's top folder, say, would train on its raw files with another tokenizer.
            raise StudyError(f"--corpus {args.corpus!r} is not a prepared corpus (it has no "
                             f"{PREPARED_META}); pass the folder of tokens the study's build writes: "
                             f"{study.corpus}")
        if args.parallel < 1 or args.cores_per_run < 1:
            raise StudyError("--parallel and --cores-per-run must be >= 1")
        cores = parse_cores(args.cores)
        need = args.parallel * args.cores_per_run
        if need > len(cores):
            raise StudyError(f"--parallel {args.parallel} x --cores-per-run {args.cores_per_run} needs {need} "
                             f"cores; {len(cores)} available ({','.join(map(str, cores))})")
        slots = tuple(cores[i * args.cores_per_run:(i + 1) * args.cores_per_run] for i in range(args.parallel))
        corpus = str(pathlib.Path(args.corpus).resolve()) if args.corpus else ""
        arms = tuple(name for name in args.arms.split(",") if name) if args.arms else ()
        unknown = [name for name in arms if name not in {a.name for a in study.arms}]
        if unknown:
            raise StudyError(f"--arms: no arm named {unknown[0]!r}; the study's arms: "
                             f"{', '.join(a.name for a in study.arms)}")
        seeds = _parse_seeds(args.seeds, tuple(sorted({s for arm in study.arms for s in arm.seeds})))
        return cls(corpus, pathlib.Path(args.runs).resolve() / study.name, results.resolve(), slots, args.dry_run,
                   arms=arms, seeds=seeds)

    def selects(self, job: _Job) -> bool:
        """Whether this sitting runs `job` (--arms and --seeds)."""
        return (not self.arms or job.arm.name in self.arms) and (not self.seeds or job.seed in self.seeds)


def _parse_seeds(text: str, study_seeds: tuple[int, ...]) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise StudyError(f"--seeds {text!r}: give seeds as integers, e.g. 0,2") from None
    unknown = [s for s in seeds if s not in study_seeds]
    if unknown:
        raise StudyError(f"--seeds: the study has no seed {unknown[0]}; its seeds: "
                         f"{', '.join(map(str, study_seeds))}")
    return seeds


@dataclasses.dataclass
class _Job:
    arm: Arm
    seed: int
    workdir: pathlib.Path
    record: pathlib.Path
    overrides: list[str]  # As recorded: without the machine's corpus path.
    process: subprocess.Popen | None = None
    slot: int = -1
    started: float = 0.0
    from_step: int = 0
    signalled: int = 0

    @property
    def label(self) -> str:
        return f"{self.arm.name} seed {self.seed}"


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _plan(study: Study, options: Options) -> list[_Job]:
    return [_Job(arm, seed, options.runs / arm.name / f"seed{seed}", options.results / arm.name / f"seed{seed}.json",
                 study.overrides(arm, seed)) for arm, seed in study.queue()]


def _check_existing(jobs: list[_Job], corpus: dict) -> None:
    """Records made with other settings or on another corpus would be silently mixed into the
    report; stop instead, naming them."""
    for job in jobs:
        record = study_record.load_record(job.record, job.overrides)
        theirs = (record or {}).get("corpus")  # every record the runner writes names one
        if theirs is not None and not study_record.same_corpus(theirs, corpus):
            raise StudyError(f"record {job.record} was trained on another corpus "
                             f"({study_record.describe_corpus(theirs)}; --corpus gives "
                             f"{study_record.describe_corpus(corpus)}); pass the corpus its study was run on")


def _child_env(cores: int) -> dict[str, str]:
    """Thread pools sized to the child's cores, so that parallel runs do not fight."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_XLA_THREAD_FLAGS)]
    if cores == 1:
        flags += ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
    else:
        flags += [f"intra_op_parallelism_threads={cores}"]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update({name: str(cores) for name in _THREAD_VARIABLES})
    return env


def _pin(pid: int, cores: tuple[int, ...]) -> None:
    """Pins a child that has just started: the interpreter starts no thread before it imports
    jax, and threads inherit their creator's cores, so every thread the run makes stays on
    `cores`. (A preexec_fn would pin before exec, but is unsafe in a process with threads.)"""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cores)


def _command(study: Study, options: Options, job: _Job, *extra: str) -> list[str]:
    corpus = [f"data.corpus={options.corpus}"] if options.corpus else []
    return [sys.executable, str(options.train_script), "--config", str(study.preset), "--workdir", str(job.workdir),
            *extra, *job.overrides, *corpus]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _start(study: Study, options: Options, job: _Job, slot: int) -> None:
    job.workdir.mkdir(parents=True, exist_ok=True)
    job.from_step, job.slot = study_record.resume_step(job.workdir), slot
    job.started, job.signalled = time.time(), 0
    cores = options.slots[slot]
    with open(job.workdir / "train.log", "a") as log:
        job.process = subprocess.Popen(_command(study, options, job), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=ROOT, env=_child_env(len(cores)), start_new_session=True)
    try:
        _pin(job.process.pid, cores)
    except OSError as err:  # Checked by parse_cores; a machine whose cores changed since: stop it.
        _stop(job)
        raise StudyError(f"cannot pin {job.label} to core(s) {','.join(map(str, cores))} "
                         f"({err.strerror}); it was stopped") from None
    how = f"resuming after step {job.from_step}" if job.from_step else "starting"
    _say(f"{how} {job.label} on core(s) {','.join(map(str, cores))} (pid {job.process.pid}) in {job.workdir}")


def _log_attempt(job: _Job, options: Options) -> None:
    attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(job.started)),
               "seconds": round(time.time() - job.started, 1), "exit": job.process.returncode,
               "from_step": job.from_step, "to_step": study_record.resume_step(job.workdir),
               "commit": _git("rev-parse", "HEAD").strip() or "unknown",
               "dirty": bool(_git("status", "--porcelain", "--untracked-files=no").strip()),
               "cpu": _cpu_model(), "cores": list(options.slots[job.slot])}
    with open(job.workdir / study_record.ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps(attempt) + "\n")


def _sizes(study: Study, options: Options, job: _Job) -> dict:
    """train.py --dry-run's sizes (from shapes: seconds, nothing trained)."""
    done = subprocess.run(_command(study, options, job, "--dry-run"), capture_output=True, text=True, cwd=ROOT,
                          env=_child_env(1), start_new_session=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise StudyError(f"train.py --dry-run failed for {job.label}: {done.stderr.strip()[-300:]}")
    return json.loads(lines[-1])


class _Recorder:
    """Writes records; the corpus is hashed once per sitting."""

    def __init__(self, study: Study, options: Options):
        self.study, self.options = study, options
        self.corpus = study_record.corpus_identity(options.corpus)
        self.sources = study_record.document_sources(options.corpus)

    def write(self, job: _Job) -> dict:
        config = json.loads((job.workdir / "config.json").read_text())
        tokens = study_record.training_tokens(self.options.corpus, config["data"]["eval_fraction"], job.seed)
        record = study_record.build_record(study=self.study.name, arm=job.arm.name, seed=job.seed,
                                           workdir=job.workdir, overrides=job.overrides,
                                           sizes=_sizes(self.study, self.options, job), corpus=self.corpus,
                                           train_tokens=tokens, held_out=study_record.held_out_coverage(
                                               self.options.corpus, config, job.seed, self.sources))
        study_record.write_atomic(job.record, record)
        return record


def _finish(job: _Job, study: Study, options: Options, recorder: _Recorder) -> bool:
    """Logs the attempt and records a completed run; False when the run failed."""
    _log_attempt(job, options)
    code, minutes = job.process.returncode, (time.time() - job.started) / 60
    if study_record.is_complete(job.workdir, study.steps):
        record = recorder.write(job)
        _say(f"done {job.label}: held-out loss {record['final']['eval_loss']:.4f} after {minutes:.1f} min; "
             f"record {job.record}")
        return True
    if code == 0 or job.signalled:  # A second signal kills it: it resumes from its last checkpoint.
        _say(f"stopped {job.label} with its checkpoint of step {study_record.resume_step(job.workdir)} "
             f"({minutes:.1f} min); the same command resumes it from there")
        return True
    tail = (job.workdir / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    _say(f"FAILED {job.label} (exit {code}) after {minutes:.1f} min: {tail[0]} (see {job.workdir / 'train.log'})")
    return False


def _progress(jobs: list[_Job], steps: int) -> None:
    for job in jobs:
        records = read_records(job.workdir / METRICS_FILE, warn=False)  # being written: a torn last line is dropped
        train = [r for r in records if "loss" in r and r["step"] > job.from_step]
        evals = [r for r in records if "eval_loss" in r]
        if not train:
            _say(f"  {job.label}: compiling or before its first log step")
            continue
        rate = (train[-1]["step"] - job.from_step) / max(time.time() - job.started, 1e-9)
        last_eval = f", held-out {evals[-1]['eval_loss']:.3f} at {evals[-1]['step']}" if evals else ""
        _say(f"  {job.label}: step {train[-1]['step']}/{steps}, loss {train[-1]['loss']:.3f}{last_eval}, "
             f"{1 / rate:.2f} s/step, about {(steps - train[-1]['step']) / rate / 60:.0f} min left")


class _Signals:
    """Counts SIGTERM / SIGINT; the loop forwards each to the running children."""

    def __init__(self):
        self.count = 0

    def install(self) -> _Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.count += 1
        print(f"\nreceived {signal.Signals(signum).name}: asking the running trainings to checkpoint and stop "
              "(a second signal stops them at once)", file=sys.stderr, flush=True)


def _forward(signals: _Signals, running: dict[int, _Job]) -> None:
    for job in running.values():
        while job.signalled < min(signals.count, 2):
            job.signalled += 1
            try:
                os.kill(job.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                break


def _stop(job: _Job, grace: float = 30.0) -> None:
    """Ends a training: SIGTERM (it saves a checkpoint and exits), SIGKILL after `grace` seconds."""
    if job.process.poll() is None:
        os.kill(job.process.pid, signal.SIGTERM)
        try:
            job.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()


def _loop(study: Study, options: Options, pending: list[_Job], recorder: _Recorder, signals: _Signals) -> int:
    running: dict[int, _Job] = {}
    try:
        return _run_queue(study, options, pending, recorder, signals, running)
    except BaseException:  # A failure of the runner itself: no training is left behind.
        for job in running.values():
            _stop(job)
        raise


def _run_queue(study: Study, options: Options, pending: list[_Job], recorder: _Recorder, signals: _Signals,
               running: dict[int, _Job]) -> int:
    failures, last_progress = 0, time.time()
    while pending or running:
        for slot in range(len(options.slots)):
            if slot not in running and pending and not signals.count:
                _start(study, options, pending[0], slot)
                running[slot] = pending.pop(0)
        _forward(signals, running)
        time.sleep(options.poll_seconds)
        for slot, job in list(running.items()):
            if job.process.poll() is not None:
                del running[slot]
                failures += not _finish(job, study, options, recorder)
        if signals.count and not running:
            break
        if running and time.time() - last_progress >= options.progress_seconds:
            last_progress = time.time()
            _progress(list(running.values()), study.steps)
    return failures


def run(study: Study, options: Options) -> int:
    """Runs every (arm, seed) that has no record. Returns 0 when nothing failed and no signal cut
    the sitting short, INTERRUPTED (130, the command contract's Ctrl-C) when a signal stopped
    runs that are left, 1 when a run failed."""
    jobs = _plan(study, options)
    recorder = _Recorder(study, options)
    _check_existing(jobs, recorder.corpus)
    pending = [job for job in jobs if not job.record.is_file() and options.selects(job)]
    recorded = sum(job.record.is_file() for job in jobs)
    only = "; ".join(([f"arms {', '.join(options.arms)}"] if options.arms else [])
                     + ([f"seeds {', '.join(map(str, options.seeds))}"] if options.seeds else []))
    only = f" ({only} only)" if only else ""
    _say(f"study {study.name}: {len(jobs)} runs, {recorded} recorded, {len(pending)} to go{only}; "
         f"{len(options.slots)} at once on cores {' | '.join(','.join(map(str, s)) for s in options.slots)}; "
         f"records in {options.results}")
    for job in pending:
        if study_record.is_complete(job.workdir, study.steps):  # Trained, but stopped before its record.
            recorder.write(job)
            _say(f"recorded {job.label} (trained in an earlier sitting)")
    pending = [job for job in pending if not job.record.is_file()]
    for job in pending:  # Before anything starts: a record may go nowhere a user's file or a run's is.
        outputs.check_file(job.record, "--results", ours=lambda _: False)
    if options.dry_run:
        for job in pending:
            step = study_record.resume_step(job.workdir)
            print(f"  {job.label}: {'resume after step ' + str(step) if step else 'new'} -> {job.workdir}")
        return 0
    signals = _Signals().install()
    failures = _loop(study, options, pending, recorder, signals)
    left = sum(not job.record.is_file() for job in jobs if options.selects(job))
    _say(f"{sum(job.record.is_file() for job in jobs)} of {len(jobs)} runs recorded; {failures} failed this "
         f"sitting" + (f"; {left} of this sitting's left: run the same command to continue" if left else ""))
    if failures:
        print(f"error: {failures} run(s) failed this sitting; each FAILED line above names its train.log",
              file=sys.stderr, flush=True)
        return 1
    return INTERRUPTED if signals.count and left else 0
