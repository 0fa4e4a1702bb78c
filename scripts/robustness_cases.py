"""Runs every case of issues 15 ("No work lost, no tracebacks") and 26 ("No work lost, second
round") against the real commands and prints their closing table: case -> message -> exit code
-> what was kept.

    python scripts/robustness_cases.py > table.md       # from the repository root; both issues
    python scripts/robustness_cases.py 26 > table.md    # one issue's cases (and case 1, the shared run)

Each case runs train.py, `python -m rexmoe_jax.evaluate`, `python -m rexmoe_jax.generate` or
`python -m rexmoe_jax.data` in a subprocess, in a temporary folder, set up as the test suite sets
it up (tests/test_loop.py, test_checkpoint.py, test_cli.py, test_data.py, test_evaluate.py,
test_generate.py). One small run trained as case 1's first process is copied for the cases that
need checkpoints (10, 20 and 30). The message is the command's last stderr line; "ok" says
whether the case behaved as the issue demands (exit status, one line, nothing lost, no
traceback). Progress goes to stderr, the table to stdout.

A full disk is a file-size limit (EFBIG, "file too large"), as in the tests; an unwritable
metrics.jsonl is a read-only file under `setpriv`, which drops root's permission override.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/files.py: the hashes the tests compare
from files import hashes  # noqa: E402
PY = sys.executable
TOKENIZER = ROOT / "rexmoe_jax" / "assets" / "tokenizer.json"
SMALL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.expert_ffn=16", "model.num_experts=4", "model.top_k=2", "psr.start_step=5", "psr.end_step=20",
         "data.seq_len=16", "data.batch_size=4", "train.steps=30", "train.log_every=1", "train.eval_every=10",
         "train.eval_batches=1", "train.checkpoint_every=10", "train.sample_tokens=0", "mesh.num_devices=1"]
NO_PERMISSION_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                          "--inh-caps", "-dac_override,-dac_read_search"]
EVALUATE = [PY, "-m", "rexmoe_jax.evaluate"]
GENERATE = [PY, "-m", "rexmoe_jax.generate"]


@dataclasses.dataclass
class Result:
    """A finished command."""
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def message(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else "(nothing on stderr)"

    @property
    def tracebacks(self) -> int:
        return self.stderr.count("Traceback")

    @property
    def one_line_error(self) -> bool:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return len(lines) == 1 and lines[0].startswith("error:")


@dataclasses.dataclass
class Case:
    """One row of the table."""
    name: str
    result: Result
    kept: str
    ok: bool


class Env:
    """The temporary folder, the corpus, and a compilation cache shared by the runs."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.corpus = tmp / "kjv200.jsonl"
        self.vars = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
                         JAX_COMPILATION_CACHE_DIR=str(tmp / "jax-cache"),
                         JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        self.base: pathlib.Path | None = None  # The trained run: checkpoints 10, 20, 30.
        self.fallback: Result | None = None  # Case 2's run, whose noise case 6 counts.

    def folder(self, name: str) -> pathlib.Path:
        path = self.tmp / name
        path.mkdir(parents=True)
        return path

    def copy_base(self, name: str) -> pathlib.Path:
        return pathlib.Path(shutil.copytree(self.base, self.tmp / name))

    def train(self, workdir: pathlib.Path, *overrides: str) -> list[str]:
        return [PY, "train.py", "--workdir", str(workdir), *SMALL, f"data.corpus={self.corpus}", *overrides]

    def run(self, cmd: list[str], *, env: dict | None = None, preexec_fn=None, cwd=ROOT) -> Result:
        print(f"  $ {' '.join(cmd)[:200]}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=env or self.vars, capture_output=True, text=True,
                              timeout=900, preexec_fn=preexec_fn, check=False)  # noqa: PLW1509
        return Result(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)


# What a run folder holds ---------------------------------------------------------------------


def _step_order(name: str) -> tuple:
    head = name.split(".")[0]
    return (int(head) if head.isdigit() else 1 << 30, name)


def checkpoints(workdir: pathlib.Path) -> list[str]:
    folder = workdir / "checkpoints"
    return sorted((p.name for p in folder.iterdir()), key=_step_order) if folder.is_dir() else []


def describe_checkpoints(workdir: pathlib.Path) -> str:
    names = checkpoints(workdir)
    return "checkpoints " + (", ".join(names) if names else "none")


def _reject(constant: str):
    raise ValueError(f"{constant} is not strict JSON")


def read_rows(workdir: pathlib.Path) -> tuple[list[dict], list[str]]:
    """metrics.jsonl read strictly (bare NaN or Infinity is an error): (rows, bad lines)."""
    path = workdir / "metrics.jsonl"
    rows, bad = [], []
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line, parse_constant=_reject))
        except ValueError as err:
            bad.append(f"line {number} {str(err)[:60]}")
    return rows, bad


def train_steps(workdir: pathlib.Path) -> list[int]:
    return [r["step"] for r in read_rows(workdir)[0] if "loss" in r]


def describe_rows(workdir: pathlib.Path, last: int) -> tuple[str, bool]:
    """('metrics.jsonl rows 1-30 once', True) when the training rows are steps 1..last, each
    once, and every line is strict JSON."""
    steps, bad = train_steps(workdir), read_rows(workdir)[1]
    broken = f", NOT strict JSON: {'; '.join(bad)}" if bad else ""
    if steps == list(range(1, last + 1)):
        return f"metrics.jsonl rows 1-{last} once{broken}", not bad
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    missing = sorted(set(range(1, last + 1)) - set(steps))
    return (f"metrics.jsonl rows {min(steps, default=0)}-{max(steps, default=0)}: {len(steps)} rows, "
            f"repeated {repeated or 'none'}, missing {missing or 'none'}{broken}", False)


def temporary_folders(workdir: pathlib.Path) -> list[str]:
    return [str(p.relative_to(workdir)) for p in workdir.rglob("*tmp*") if p.is_dir()]


def snapshot(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def same_rows(workdir: pathlib.Path, reference: pathlib.Path) -> bool:
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]
    return strip(read_rows(workdir)[0]) == strip(read_rows(reference)[0])


# 1-5: work damaged or a run that cannot resume ------------------------------------------------


def two_processes(env: Env) -> Case:
    """A trains a fresh run (it becomes the shared base); B, the same command, starts while A
    holds the lock."""
    workdir = env.tmp / "base"
    cmd = env.train(workdir)
    print(f"  $ {' '.join(cmd)[:200]}  (first process)", file=sys.stderr, flush=True)
    with open(env.tmp / "a.out", "w") as out, open(env.tmp / "a.err", "w") as err:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env.vars, stdout=out, stderr=err)
        while not (workdir / "run.lock").exists() and first.poll() is None:
            time.sleep(0.05)
        second = env.run(cmd)
        first_code = first.wait(timeout=900)
    env.base = workdir
    first_err = (env.tmp / "a.err").read_text()
    rows, rows_ok = describe_rows(workdir, 30)
    ok = (second.code == 2 and second.one_line_error and f"process {first.pid}" in second.message
          and first_code == 0 and rows_ok and checkpoints(workdir) == ["10", "20", "30"]
          and not temporary_folders(workdir) and first_err.count("Traceback") == 0)
    kept = (f"first process exit {first_code}, {first_err.count('Traceback')} tracebacks; {rows}; "
            f"{describe_checkpoints(workdir)}; temporary folders: {temporary_folders(workdir) or 'none'}")
    return Case("1. two processes on one --workdir (the second's line)", second, kept, ok)


def missing_metadata(env: Env) -> Case:
    workdir = env.copy_base("missing-metadata")
    (workdir / "checkpoints" / "30" / "state" / "_METADATA").unlink()
    result = env.run(env.train(workdir))
    rows, rows_ok = describe_rows(workdir, 30)
    resumed = "resumed from step 20" in result.stdout
    ok = (result.code == 0 and resumed and checkpoints(workdir) == ["10", "20", "30", "30.corrupt"]
          and rows_ok and same_rows(workdir, env.base))
    kept = (f"30 set aside as 30.corrupt, {'resumed from 20' if resumed else 'NOT resumed from 20'}; "
            f"{describe_checkpoints(workdir)}; {rows}, "
            f"{'equal to' if same_rows(workdir, env.base) else 'DIFFERENT from'} the uninterrupted run's")
    env.fallback = result
    return Case("2. checkpoint 30 without state/_METADATA", result, kept, ok)


def torn_line(env: Env) -> Case:
    workdir = env.copy_base("torn-line")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 7.1')  # killed mid-write
    result = env.run(env.train(workdir, "train.steps=40"))
    rows, rows_ok = describe_rows(workdir, 40)
    ok = result.code == 0 and rows_ok and "is not a complete JSON record" in result.stderr
    return Case("3. torn last line of metrics.jsonl, resumed to 40", result,
                f"torn line dropped with a warning; {rows}, strict JSON; {describe_checkpoints(workdir)}", ok)


def _file_size_limit(nbytes: int):
    def limit():  # In the child: writes past nbytes fail with EFBIG instead of killing it.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit


def full_disk(env: Env) -> Case:
    """Resumed from 30 to 50 with files limited to 256 KiB: checkpoint 40 fails in the background.
    Batches of 512 make a step take about as long as the failing write (4-sequence steps finish
    the 9 steps to the next save first). No compilation cache: its writes would meet the limit
    first. Then the same command without the limit."""
    workdir = env.copy_base("full-disk")
    plain = {k: v for k, v in env.vars.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    cmd = env.train(workdir, "train.steps=50", "data.batch_size=512")
    result = env.run(cmd, env=plain, preexec_fn=_file_size_limit(256 * 1024))
    after, leftovers = checkpoints(workdir), temporary_folders(workdir)
    last_row = max(train_steps(workdir))
    again = env.run(cmd)
    rows, rows_ok = describe_rows(workdir, 50)
    named = all(f" {step}" in result.message for step in after)  # "checkpoints 10, 20 and 30 are intact"
    ok = (result.code == 4 and result.one_line_error and "saving step 40" in result.message and named
          and after == ["10", "20", "30"] and not leftovers and last_row < 49 and again.code == 0 and rows_ok
          and again.tracebacks == 0)
    kept = (f"checkpoints {', '.join(after)}; "
            f"temporary folders: {leftovers or 'none'}; last row: step {last_row} (the save after 40 is 50); "
            f"re-run without the limit: exit {again.code}, {describe_checkpoints(workdir)}, {rows}")
    return Case("4. full disk (256 KiB file-size limit) at save 40", result, kept, ok)


def unwritable_log(env: Env) -> Case:
    """metrics.jsonl read-only from the start of a resume to 50; logging every 10 steps, its first
    write is the evaluation line of step 40, which comes after the step-40 checkpoint."""
    workdir = env.copy_base("unwritable-log")
    (workdir / "metrics.jsonl").chmod(0o444)
    cmd = NO_PERMISSION_OVERRIDE + env.train(workdir, "train.steps=50", "train.log_every=10")
    result = env.run(cmd)
    ok = (result.code == 4 and result.one_line_error and "permission denied" in result.message
          and checkpoints(workdir) == ["20", "30", "40"])
    return Case("5. unwritable metrics.jsonl, resumed to 50", result,
                f"{describe_checkpoints(workdir)} (40 saved before the failed write)", ok)


# 6-8: noise and slowness ------------------------------------------------------------------------


def fallback_noise(env: Env) -> Case:
    result = env.fallback
    closed = result.stderr.count("Event loop is closed")
    lines = result.stderr.splitlines()
    warnings = sum(line.startswith("warning:") for line in lines)
    return Case("6. noise of the fallback in case 2", result,
                f'{closed} "Event loop is closed" lines; {len(lines)} stderr line(s), {warnings} warning(s)',
                closed == 0 and warnings == 1 and result.tracebacks == 0)


def sigterm_at_start(env: Env) -> Case:
    """SIGTERM as soon as train.py has printed its config; seconds are from the signal to the exit."""
    workdir = env.tmp / "sigterm"
    cmd = env.train(workdir)
    print(f"  $ {' '.join(cmd)[:200]}  (SIGTERM after the config line)", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env.vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    start = time.perf_counter()
    out, err = proc.communicate(timeout=600)
    result = Result(proc.returncode, first + out, err, time.perf_counter() - start)
    said = "nothing new to save" in result.stdout
    files = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []
    ok = result.code == 0 and said and not checkpoints(workdir) and not (workdir / "metrics.jsonl").exists()
    return Case("7. SIGTERM during start-up (seconds: signal to exit)", result,
                f"stdout: {'stopped before compiling' if said else 'NO stop line'}; "
                f"workdir holds {files or 'nothing'}", ok and result.seconds < 30)


def evaluate_checks_first(env: Env, full: Result) -> Case:
    result = env.run(EVALUATE + ["--workdir", str(env.base), "--tasks", "examples/tasks/kjv_cloze.jsonl",
                                 "--output", str(env.tmp / "no" / "such" / "eval.json")])
    ok = result.code == 2 and result.one_line_error and result.seconds < full.seconds
    return Case("8. evaluate, valid --tasks, unwritable --output", result,
                f"refused before evaluating (a full evaluate took {full.seconds:.1f} s); "
                f"no eval.json: {not (env.base / 'eval.json').exists()}", ok)


# Tracebacks instead of one line: each must be one line naming the file or field, exit 2 ----


def one_line(name: str, result: Result, naming: str, kept: str = "", ok: bool = True) -> Case:
    ok = ok and result.code == 2 and result.one_line_error and naming in result.message
    return Case(name, result, kept or f"names {naming!r}", ok)


def train_refuses(env: Env, name: str, naming: str, *args: str) -> Case:
    """train.py with a bad input: one line, and nothing written into its fresh workdir."""
    workdir = env.tmp / "refused" / name.split()[0].strip(".")
    result = env.run([PY, "train.py", "--workdir", str(workdir), *args])
    files = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []
    return one_line(name, result, naming, f"names {naming!r}; workdir holds {files or 'nothing'}", not files)


def bad_presets(env: Env) -> list[Case]:
    sources = {"T1. --config with a syntax error": "def get_config(:\n",
               "T2. --config whose get_config() raises": "def get_config():\n    raise ValueError('boom')\n",
               "T3. --config returning a wrong type": "def get_config():\n    return 3\n"}
    cases = []
    for number, (name, source) in enumerate(sources.items()):
        preset = env.folder(f"preset{number}") / "preset.py"
        preset.write_text(source)
        cases.append(train_refuses(env, name, str(preset), "--config", str(preset)))
    return cases


def bad_corpora(env: Env) -> list[Case]:
    folder = env.folder("corpora")
    (folder / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), folder / "c.parquet")
    prepared = env.run([PY, "-m", "rexmoe_jax.data", "prepare", "--source", str(env.corpus),
                        "--tokenizer", str(TOKENIZER), "--output", str(folder / "prepared")])
    assert prepared.code == 0, prepared.stderr
    meta = json.loads((folder / "prepared" / "meta.json").read_text())
    shutil.copytree(folder / "prepared", folder / "no-key")
    (folder / "prepared" / "meta.json").write_text("{not json")
    del meta["num_tokens"]
    (folder / "no-key" / "meta.json").write_text(json.dumps(meta))
    return [
        train_refuses(env, "T4. .jsonl corpus with non-UTF-8 bytes", "c.jsonl:2", *SMALL,
                      f"data.corpus={folder / 'c.jsonl'}"),
        train_refuses(env, "T5. .parquet whose text column holds integers", "c.parquet", *SMALL,
                      f"data.corpus={folder / 'c.parquet'}"),
        train_refuses(env, "T6. prepared corpus, malformed meta.json", str(folder / "prepared" / "meta.json"),
                      *SMALL, f"data.corpus={folder / 'prepared'}"),
        train_refuses(env, "T7. prepared corpus, meta.json without num_tokens", "num_tokens", *SMALL,
                      f"data.corpus={folder / 'no-key'}"),
    ]


def bad_arguments(env: Env) -> list[Case]:
    folder = env.folder("arguments")
    (folder / "t.jsonl").write_bytes(b'{"context": "caf\xe9", "choices": ["a", "b"], "label": 0}\n')
    evaluate = EVALUATE + ["--workdir", str(env.base), "--output", str(folder / "eval.json")]
    return [
        train_refuses(env, "T8. train.sample_prompt= (empty), 8 sample tokens", "train.sample_prompt", *SMALL,
                      f"data.corpus={env.corpus}", "train.sample_tokens=8", "train.sample_prompt="),
        one_line("T9. evaluate --tasks missing.jsonl",
                 env.run(evaluate + ["--tasks", str(folder / "missing.jsonl")]), "missing.jsonl"),
        one_line("T10. evaluate: tasks file with non-UTF-8 bytes",
                 env.run(evaluate + ["--tasks", str(folder / "t.jsonl")]), "t.jsonl:1"),
        one_line("T11. evaluate --input-set psalms=/missing.txt",
                 env.run(evaluate + ["--input-set", "psalms=/missing.txt"]), "--input-set psalms="),
        one_line("T12. generate --max-new-tokens -3", env.run(GENERATE + [
            "--workdir", str(env.base), "--prompt", "And", "--max-new-tokens", "-3"]), "--max-new-tokens"),
        one_line("T13. evaluate --batches 0", env.run(evaluate + ["--batches", "0"]), "--batches"),
    ]


# Accepted silently ----------------------------------------------------------------------------


def silent_inputs(env: Env) -> list[Case]:
    import numpy as np

    folder = env.folder("silent")
    np.save(folder / "c.npy", np.asarray([3, -1, 0] * 200, np.int32))
    (folder / "label.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": true}\n')
    long_prompt = ("And God said, Let there be light: and there was light. "
                   "And God saw the light, that it was good.")
    before = snapshot(env.base)
    generated = env.run(GENERATE + ["--workdir", str(env.base), "--prompt", long_prompt,
                                    "--max-new-tokens", "4"])
    unchanged = snapshot(env.base) == before
    return [
        train_refuses(env, "S1. .npy corpus with negative token ids", "negative token ids", *SMALL,
                      f"data.corpus={folder / 'c.npy'}", f"data.tokenizer={TOKENIZER}"),
        one_line("S2. task label true", env.run(EVALUATE + ["--workdir", str(env.base), "--tasks",
                                                           str(folder / "label.jsonl")]), "label.jsonl:1"),
        Case("S3. prompt longer than data.seq_len (16)", generated,
             f"generated with a warning; run folder {'unchanged' if unchanged else 'CHANGED'}",
             generated.code == 0 and "runs past the 16 positions" in generated.stderr and unchanged
             and generated.tracebacks == 0),
    ]


# Side effects of read-only tools ------------------------------------------------------------


def read_only_tools(env: Env) -> list[Case]:
    """Evaluate (its row comes first: case 8 compares with its time), generate, a non-finite run."""
    workdir = env.copy_base("read-only")
    (workdir / "checkpoints" / "30" / "state" / "_METADATA").unlink()
    before = snapshot(workdir)
    output = env.tmp / "read-only-eval.json"
    evaluated = env.run(EVALUATE + ["--workdir", str(workdir), "--output", str(output)])
    step = json.loads(output.read_text())["step"] if output.is_file() else None
    unchanged = snapshot(workdir) == before
    fresh = env.folder("no-checkpoint")
    shutil.copy(workdir / "config.json", fresh / "config.json")
    generated = env.run(GENERATE + ["--workdir", str(fresh), "--prompt", "And"])
    files = sorted(p.name for p in fresh.iterdir())
    nonfinite = env.tmp / "nonfinite"
    blown = env.run(env.train(nonfinite, "optim.learning_rate=1e30", "optim.clip_norm=0", "psr.schedule=none",
                              "train.checkpoint_every=1"))
    rows, bad = read_rows(nonfinite)
    nulls = sum(v is None for r in rows for v in r.values())
    strict = f"NOT strict JSON ({'; '.join(bad)})" if bad else f"strict JSON, {nulls} null value(s)"
    others = [line for line in blown.stderr.splitlines()[:-1] if line.strip()]
    cases = [
        Case("R1. evaluate, checkpoint 30 without state/_METADATA", evaluated,
             f"evaluated step {step}; run folder {'unchanged, nothing renamed' if unchanged else 'CHANGED'}",
             evaluated.code == 0 and step == 20 and unchanged and evaluated.tracebacks == 0),
        one_line("R2. generate on a run with no checkpoint", generated, "has no checkpoint yet",
                 f"folder holds {files}", files == ["config.json"]),
        Case("R3. non-finite metrics (learning rate 1e30)", blown,
             f"metrics.jsonl {strict}; {describe_checkpoints(nonfinite)}; "
             f"other stderr lines: {' / '.join(others) or 'none'}",
             blown.code == 3 and blown.message.startswith("error:") and blown.tracebacks == 0
             and nulls > 0 and not bad),
    ]
    return cases


# Issue 26: no work lost, second round ----------------------------------------------------------


def kept(before: dict, after: dict) -> tuple[str, bool]:
    """('files unchanged (N hashed)', True), or what changed."""
    if before == after:
        return f"files unchanged ({len(before)} hashed before and after)", True
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return f"CHANGED: {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}", False


def refused(name: str, result: Result, naming: str, root: pathlib.Path, before: dict, code: int = 2) -> Case:
    """A refused command: the status, one line naming `naming`, and every file under `root` as it was."""
    what, same = kept(before, hashes(root))
    ok = result.code == code and result.one_line_error and naming in result.message and same
    return Case(name, result, f"names {naming!r}; {what}", ok)


def prepare_cmd(source, output, *extra) -> list[str]:
    return [PY, "-m", "rexmoe_jax.data", "prepare", "--source", str(source), "--tokenizer", str(TOKENIZER),
            "--output", str(output), *extra]


def prepare_cases(env: Env) -> list[Case]:
    """1 and 6: the three data-loss cases, an existing output, '.', a full disk and Ctrl-C."""
    root = env.folder("prepare")
    source = root / "corpus"
    source.mkdir()
    shutil.copy(env.corpus, source / "kjv200.jsonl")
    (source / "README.txt").write_text("where this corpus came from\n")
    (root / "beside.txt").write_text("a file next to the corpus\n")
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work\n")
    cases = []
    for name, output, naming in (("1a. prepare --output a folder holding other files", root / "mine", "holds files"),
                                 ("1b. prepare --output the source folder itself", source, "holds the input"),
                                 ("1c. prepare --output the source's parent", root, "holds the input"),
                                 ("6b. prepare --output an existing file", root / "beside.txt", "is a file")):
        before = hashes(root)
        cases.append(refused(name, env.run(prepare_cmd(source, output)), naming, root, before))
    before = hashes(root)
    here = env.run(prepare_cmd("corpus", "."), cwd=root)
    cases.append(refused("6c. prepare --output . (the folder holding the source)", here, "holds the input", root,
                         before))
    earlier = root / "prepared"
    assert env.run(prepare_cmd(source / "kjv200.jsonl", earlier)).code == 0
    big = env.folder("prepare-big")
    (big / "kjv.txt").write_text("\n\n".join(_kjv()))
    before = hashes(root)
    full = env.run(prepare_cmd(big / "kjv.txt", earlier, "--txt-documents", "paragraph"),
                   preexec_fn=_file_size_limit(256 * 1024))
    cases.append(refused("6a. prepare, a full disk (256 KiB file-size limit), over an earlier corpus", full,
                         "file too large while writing", root, before, code=4))
    cases.append(ctrl_c_prepare(env, big / "kjv.txt", root, earlier))
    return cases


def _kjv() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from rexmoe_jax.data import read_embedded_documents

    return read_embedded_documents()


def ctrl_c_prepare(env: Env, source: pathlib.Path, root: pathlib.Path, earlier: pathlib.Path) -> Case:
    """SIGINT once the temporary folder holds tokens.bin; seconds are from the signal to the exit."""
    before = hashes(root)
    cmd = prepare_cmd(source, earlier, "--txt-documents", "paragraph")
    print(f"  $ {' '.join(cmd)[:200]}  (SIGINT while writing)", file=sys.stderr, flush=True)
    # SIGINT's default disposition, as from a terminal: a script run in the background inherits
    # SIGINT ignored, and a Python started so never raises KeyboardInterrupt.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env.vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    while not list(root.glob(".prepared.*.partial/tokens.bin")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    start = time.perf_counter()
    out, err = proc.communicate(timeout=120)
    result = Result(proc.returncode, out, err, time.perf_counter() - start)
    what, same = kept(before, hashes(root))
    return Case("6d. prepare, Ctrl-C while writing over an earlier corpus", result,
                f"quiet: {'yes' if not err else 'NO'}; {what}", result.code == 130 and not err and same)


def evaluate_over_the_log(env: Env) -> list[Case]:
    """2: evaluate --output W/metrics.jsonl; then plot still reads the run."""
    run = env.copy_base("eval-output")
    before = hashes(run)
    result = env.run(EVALUATE + ["--workdir", str(run), "--output", str(run / "metrics.jsonl")])
    case = refused("2. evaluate --output WORKDIR/metrics.jsonl", result, "is one of the files of the training run",
                   run, before)
    plotted = env.run([PY, "-m", "rexmoe_jax.plot", "--workdir", str(run), "--output", str(env.tmp / "pictures")])
    case.kept += f"; plot afterwards: exit {plotted.code}"
    case.ok = case.ok and plotted.code == 0
    return [case]


STUDY = """name = "robustness"
preset = "configs/tiny.py"
baseline = "base"
seeds = [0]
[budget]
steps = 30
checkpoint_every = 10
[base]
{base}
[[arm]]
name = "base"
set = {{ "model.reuse" = 1 }}
"""


def study_cores(env: Env) -> list[Case]:
    """3: --cores 50 on this machine; nothing may start."""
    root = env.folder("study")
    base = "\n".join(f'"{o.split("=")[0]}" = {json.dumps(_toml_value(o.split("=", 1)[1]))}'
                     for o in SMALL if not o.startswith("train."))
    (root / "s.toml").write_text(STUDY.format(base=base))
    before = hashes(root)
    result = env.run([PY, "-m", "rexmoe_jax.study", "run", str(root / "s.toml"), "--cores", "50",
                      "--runs", str(root / "runs"), "--results", str(root / "results"),
                      "--corpus", str(env.corpus)])
    case = refused("3. study run --cores 50 (cores this machine lacks)", result, "core 50 is not one", root, before)
    case.kept += "; no run folder, no train.py started"
    return [case]


def _toml_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def lm_eval_cases(env: Env) -> list[Case]:
    """4: missing workdir, config.json only, truncated config.json, a label out of range."""
    root = env.folder("lm-eval")
    (root / "config-only").mkdir()
    shutil.copy(env.base / "config.json", root / "config-only" / "config.json")
    (root / "truncated").mkdir()
    (root / "truncated" / "config.json").write_text((env.base / "config.json").read_text()[:100])
    (root / "t.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": 5}\n')
    cases = []
    for name, workdir, task, naming in (
            ("4a. lm_eval, a workdir that does not exist", root / "missing", None, "has no config.json"),
            ("4b. lm_eval, a workdir with config.json only", root / "config-only", None, "has no checkpoint yet"),
            ("4c. lm_eval, a truncated config.json", root / "truncated", None, "is not readable JSON"),
            ("4d. lm_eval, a task label out of range", env.base, root / "t.jsonl", "'label' must be the index")):
        before = hashes(root), hashes(env.base)
        result = env.run([PY, "-m", "rexmoe_jax.lm_eval", "--model", "rexmoe", "--model_args", f"workdir={workdir}",
                          "--tasks", str(task or ROOT / "examples/tasks/kjv_cloze.jsonl")])
        what, same = kept(before[0] | before[1], hashes(root) | hashes(env.base))
        cases.append(Case(name, result, f"names {naming!r}; {what}",
                          result.code == 2 and result.one_line_error and naming in result.message and same))
    return cases


TINY_RUN = ["data.seq_len=16", "data.batch_size=4", "train.steps=2", "train.checkpoint_every=1",
            "train.eval_every=2", "train.eval_batches=1", "train.sample_tokens=0", "mesh.num_devices=1"]


def unreadable_checkpoints(env: Env) -> list[Case]:
    """5: the tiny preset's model (large enough for orbax's concurrent reads), every checkpoint's
    largest array file truncated: train.py, train.py again, generate, train.py --start-over."""
    good = env.tmp / "tiny-run"
    trained = env.run([PY, "train.py", "--workdir", str(good), f"data.corpus={env.corpus}", *TINY_RUN])
    assert trained.code == 0, trained.stderr[-2000:]
    for step in checkpoints(good):
        largest = max((p for p in (good / "checkpoints" / step).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:100])
    reader = pathlib.Path(shutil.copytree(good, env.tmp / "tiny-run-read"))
    cmd = [PY, "train.py", "--workdir", str(good), f"data.corpus={env.corpus}", *TINY_RUN]
    first = env.run(cmd)
    names = describe_checkpoints(good)
    again = env.run(cmd)
    names_again = describe_checkpoints(good)
    before = hashes(reader)
    generated = env.run(GENERATE + ["--workdir", str(reader), "--prompt", "And God said"])
    over = env.run(cmd + ["--start-over"])
    what, same = kept(before, hashes(reader))
    return [
        Case("5a. every checkpoint unreadable: train.py", first, f"{names}; {len(first.stderr.splitlines())} "
             f"stderr line(s)", first.code == 2 and first.one_line_error and "--start-over" in first.message
             and "set aside as 2.corrupt and 1.corrupt" in first.message),
        Case("5b. the same command again", again, names_again,
             again.code == 2 and again.one_line_error and "set aside earlier" in again.message),
        Case("5c. generate on such a run", generated, what, generated.code == 2 and generated.one_line_error
             and "can be read" in generated.message and same),
        Case("5d. train.py --start-over", over, f"{describe_checkpoints(good)}; last logged step "
             f"{max(train_steps(good), default=None)}", over.code == 0 and over.tracebacks == 0
             and checkpoints(good) == ["1", "1.corrupt", "2", "2.corrupt"] and max(train_steps(good)) == 2),
    ]


def generate_cases(env: Env) -> list[Case]:
    """7, 10, 11a, 11b."""
    root = env.folder("generate")
    changed = env.copy_base("generate-changed")
    config = json.loads((changed / "config.json").read_text())
    config["train"]["steps"] = 40  # a later resume's setting: generate has nothing to note
    (changed / "config.json").write_text(json.dumps(config))
    big_vocab = env.copy_base("generate-tokenizer")
    made = env.run([PY, "-m", "rexmoe_jax.data", "train-tokenizer", "--source", str(env.corpus), "--vocab-size",
                    "5000", "--output", str(root / "tok5000.json")])
    assert made.code == 0, made.stderr
    config = json.loads((big_vocab / "config.json").read_text())
    config["data"]["tokenizer"] = str(root / "tok5000.json")
    (big_vocab / "config.json").write_text(json.dumps(config))
    cases = []
    for name, workdir, args, naming in (
            ("7a. generate --max-new-tokens 100000000", env.base, ["--max-new-tokens", "100000000"],
             "new tokens do not fit"),
            ("7b. generate --top-k 100000", env.base, ["--top-k", "100000"], "larger than the vocabulary"),
            ("10. generate, a 5,000-token tokenizer on a 4,096-token model", big_vocab, [], "has 5000 tokens"),
            ("11a. generate, one empty prompt among two", env.base, ["--prompt", ""], "--prompt number 2 of 2")):
        before = hashes(workdir)
        result = env.run(GENERATE + ["--workdir", str(workdir), "--prompt", "And God said", *args])
        cases.append(refused(name, result, naming, workdir, before))
    piped = env.run(GENERATE + ["--workdir", str(changed), "--prompt", "And God said", "--max-new-tokens", "4"])
    cases.append(Case("11b. generate on a run resumed with other settings: stdout", piped,
                      f"stdout: {piped.stdout.strip()[:60]!r}", piped.code == 0 and "note:" not in piped.stdout))
    return cases


def plot_cases(env: Env) -> list[Case]:
    """8 and 11f."""
    root = env.folder("plot")
    (root / "taken.png").write_text("a file of mine\n")
    run = env.copy_base("plot-run")
    before = hashes(root) | hashes(run)
    result = env.run([PY, "-m", "rexmoe_jax.plot", "--workdir", str(run), "--output", str(root / "taken.png")])
    what, same = kept(before, hashes(root) | hashes(run))
    cases = [Case("8a. plot --output an existing file", result, what,
                  result.code == 2 and result.one_line_error and same)]
    record = json.loads((run / "routing.jsonl").read_text().splitlines()[-1])
    del record["expert_load"]
    with open(run / "routing.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    before = hashes(run)
    result = env.run([PY, "-m", "rexmoe_jax.plot", "--workdir", str(run)])
    cases.append(refused("8b. plot, a routing.jsonl record without expert_load", result, "no 'expert_load'", run,
                         before))
    noisy = env.copy_base("plot-noisy")
    with open(noisy / "metrics.jsonl", "a") as f:
        f.write("garbage\n" * 40)
    result = env.run([PY, "-m", "rexmoe_jax.plot", "--workdir", str(noisy)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    cases.append(Case("11f. plot, 40 garbage lines in metrics.jsonl", result, f"{len(lines)} warning line(s)",
                      result.code == 0 and len(lines) == 1 and "40 lines" in lines[0]))
    return cases


LAUNCH = [PY, "-m", "rexmoe_jax.launch", "-n", "2", "--"]


def launch_cases(env: Env) -> list[Case]:
    """9: a missing and a non-executable command; train.py whose partner fails before joining."""
    root = env.folder("launch")
    (root / "script.sh").write_text("#!/bin/sh\necho hello\n")
    cases = [refused("9a. launch, a command that does not exist", env.run(LAUNCH + ["no-such-command"]),
                     "does not exist", root, hashes(root)),
             refused("9b. launch, a command that is not executable", env.run(LAUNCH + [str(root / "script.sh")]),
                     "is not executable", root, hashes(root))]
    waiting = env.run(LAUNCH + ["bash", "-c", f'if [ "$JAX_PROCESS_ID" = 1 ]; then sleep 3; exit 3; fi; exec {PY} '
                                "train.py --distributed --init-timeout 120 mesh.num_devices=1 --workdir "
                                f"{root / 'never'}"])
    cases.append(Case("9c. launch: process 1 fails before joining, process 0 waits to join", waiting,
                      f"ended {waiting.seconds:.0f} s after start (grace 60 s)",
                      waiting.code == 3 and waiting.seconds < 40 and waiting.tracebacks == 0
                      and "exit codes [-15, 3]" in waiting.stderr))
    return cases


def small_cases(env: Env) -> list[Case]:
    """11c, 11d, 11e."""
    root = env.folder("small")
    (root / "t.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": 7}\n')
    before = hashes(env.base)
    task = env.run(EVALUATE + ["--workdir", str(env.base), "--tasks", str(root / "t.jsonl"), "--output",
                               str(root / "e.json")])
    fewer = env.copy_base("fewer-steps")
    before_fewer = hashes(fewer)
    short = env.run(env.train(fewer, "train.steps=10"))
    mesh = env.run(env.train(root / "mesh-run", "mesh.expert=2"))
    return [
        refused("11c. task file, label 7 of 2 choices", task, "'label' must be the index of the right choice, 0 to 1, "
                "got 7", env.base, before),
        refused("11d. resume 30 steps done with train.steps=10", short, "past train.steps=10", fewer, before_fewer),
        Case("11e. a failed mesh check (expert=2 on 1 device)", mesh,
             f"workdir left behind: {(root / 'mesh-run').exists()}",
             mesh.code == 2 and mesh.one_line_error and not (root / "mesh-run").exists()),
    ]


def disagreeing_processes(env: Env) -> list[Case]:
    """Tests: two train.py processes of one run with different train.steps."""
    workdir = env.tmp / "disagree"
    result = env.run(LAUNCH + ["bash", "-c", f'exec {PY} train.py --distributed --simulate-devices 1 --workdir '
                               f'{workdir} {" ".join(SMALL)} data.corpus={env.corpus} mesh.num_devices=2 '
                               'train.steps=$((10 + JAX_PROCESS_ID))'])
    errors = sorted({line.split("] ", 1)[1] for line in result.stderr.splitlines() if "] error:" in line})
    ok = (result.code == 2 and len(errors) == 1 and "groups of processes that agree: [[0], [1]]" in errors[0]
          and result.tracebacks == 0)
    return [Case("MH. 2 processes, train.steps 10 and 11 (launcher's status)", result,
                 f"each process: {errors[0] if len(errors) == 1 else errors}", ok)]


def issue_26(env: Env) -> list[Case]:
    rows = []
    for build in (prepare_cases, evaluate_over_the_log, study_cores, lm_eval_cases, unreadable_checkpoints,
                  generate_cases, plot_cases, launch_cases, small_cases, disagreeing_processes):
        rows += guarded(build, env)
    return rows


# The table --------------------------------------------------------------------------------------


def _cell(text: str, width: int = 140) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= width else text[:width - 1] + "…"
    return text.replace("|", "\\|")


def table(cases: list[Case]) -> str:
    lines = ["| case | message (last stderr line) | exit | what was kept | tracebacks | s | ok |",
             "|---|---|---|---|---|---|---|"]
    for case in cases:
        r = case.result
        lines.append(f"| {_cell(case.name)} | {_cell(r.message)} | {r.code} | {_cell(case.kept, 400)} | "
                     f"{r.tracebacks} | {r.seconds:.1f} | {'yes' if case.ok else '**NO**'} |")
    return "\n".join(lines)


def write_corpus(path: pathlib.Path) -> None:
    """200 KJV chapters as JSON Lines, as the loop tests use: tokenized in a fraction of the time."""
    sys.path.insert(0, str(ROOT))
    from rexmoe_jax.data import read_embedded_documents

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_embedded_documents()[:200]))


def section(title: str) -> None:
    print(f"{title}:", file=sys.stderr, flush=True)


def guarded(build, *args) -> list[Case]:
    """The cases `build` returns; a failure of this script's own set-up becomes a failed row."""
    try:
        built = build(*args)
    except Exception as err:  # noqa: BLE001 - reported in the table, not hidden
        message = f"script error: {type(err).__name__}: {err}"
        return [Case(build.__name__, Result(-1, "", message, 0.0), message, False)]
    return built if isinstance(built, list) else [built]


def main(argv: list[str]) -> int:
    issues = set(argv) & {"15", "26"} or {"15", "26"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        env = Env(pathlib.Path(tmp))
        write_corpus(env.corpus)
        section("work damaged")
        rows = guarded(two_processes, env)
        if env.base is None or not checkpoints(env.base):
            print(table(rows))
            print("\nthe shared run could not be trained; no other case can run")
            return 1
        if "15" in issues:
            rows += issue_15(env)
        if "26" in issues:
            section("issue 26")
            rows += issue_26(env)
    print(table(rows))
    failed = [case.name for case in rows if not case.ok]
    print(f"\n{len(rows)} cases, {len(rows) - len(failed)} as the issues demand; "
          f"{time.perf_counter() - start:.0f} s in all")
    for name in failed:
        print(f"- not as demanded: {name}")
    for case in rows:  # What went wrong, for the one reading the progress stream.
        if not case.ok:
            print(f"--- stderr of {case.name}:\n" + "\n".join(case.result.stderr.splitlines()[:60]),
                  file=sys.stderr)
    return 1 if failed else 0


def issue_15(env: Env) -> list[Case]:
    damage = []
    for build in (missing_metadata, torn_line, full_disk, unwritable_log):
        damage += guarded(build, env)
    section("read-only tools")
    read_only = guarded(read_only_tools, env)
    full_evaluate = read_only[0].result
    section("noise and slowness")
    noise = guarded(fallback_noise, env) + guarded(sigterm_at_start, env)
    noise += guarded(evaluate_checks_first, env, full_evaluate)
    section("tracebacks and silent inputs")
    refusals = []
    for build in (bad_presets, bad_corpora, bad_arguments, silent_inputs):
        refusals += guarded(build, env)
    return damage + noise + refusals + read_only


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
