"""The host loop: batches in, metrics out (one step late, so the device never waits), evaluation,
logging and checkpoints at their cadences, resume, preemption and non-finite steps."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import data as data_lib
from rexmoe_jax import sharding, trackers, trainer
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.cli import NONFINITE, CommandError
from rexmoe_jax.config import Config, ConfigError, MeshConfig, from_dict
from rexmoe_jax.inference import generate as generate_lib
from rexmoe_jax.inference.evaluation import eval_set_scalars, held_out
from rexmoe_jax.model import metrics as metrics_lib
from rexmoe_jax.optimizer import learning_rate_schedule, make_optimizer
from rexmoe_jax.reuse import layer_pool_sizes
from rexmoe_jax.runlog import RunLog, check_fresh_start, proof_step, to_host
from rexmoe_jax.runtime import distributed
from rexmoe_jax.runtime.preemption import StopRequest
from rexmoe_jax.runtime.workdir import (
    LOCK_FILE,
    WriteError,
    checkpoint_source,
    failure_reason,
    has_checkpoints,
    locked,
)

# Fields of a log line that depend on the machine's speed, not on the run (tests leave them out).
TIMED = ("tokens_per_sec", "tflops_per_device", "mfu")
# Per-step values kept out of metrics.jsonl: the (L, pool) loads and router biases go to
# routing.jsonl at evals.
_NOT_LOGGED = ("expert_load", "router_bias", "finite")


class NonFiniteError(CommandError, RuntimeError):
    """A step produced a non-finite loss, gradient or weight and train.nonfinite is "stop"."""

    exit_status = NONFINITE


class _StoppedDuringStartup(Exception):
    """A stop request arrived before the first step: nothing new to compile, run or save."""


def _check_stop(stop: StopRequest) -> None:
    """One process ends a start-up that a stop request interrupts. Several go on: a request on
    one of them is not seen by the others, which would wait for it at the next barrier, so it
    waits for the vote of the first steps (distributed.StopVote), where all stop together."""
    if stop.requested(0) and jax.process_count() == 1:
        raise _StoppedDuringStartup


def _intact(steps: list[int]) -> str:
    if not steps:
        return "no checkpoint was written before it"
    names = f"{', '.join(map(str, steps[:-1]))} and {steps[-1]}" if len(steps) > 1 else str(steps[0])
    return f"checkpoint{'s' if len(steps) > 1 else ''} {names} {'are' if len(steps) > 1 else 'is'} intact"


def _first_nonfinite(record: dict) -> str:
    """Names the first non-finite value of a step: a scalar, and the first layer or group."""
    culprit = next((f"{name}={record[name]}" for name in ("loss", "lb_loss", "z_loss", "grad_norm", "param_norm")
                    if not math.isfinite(record[name])), "a metric")
    for name, what in (("layer_z_loss", "layer"), ("layer_grad_norm", "layer"),
                       ("group_expert_grad_norm", "expert pool of group")):
        bad = [i for i, v in enumerate(record[name]) if not math.isfinite(v)]
        if bad:
            return f"{culprit}; first non-finite {name} at {what} {bad[0]}"
    return culprit


class _Throughput:
    """Tokens per second of the steps since the last log line, and the model FLOPs that makes
    per device: TFLOP/s and MFU against the device's peak for the compute dtype
    (metrics.device_peak_flops, or train.peak_flops; MFU is null where neither knows it, as on
    a CPU). Training alone is timed: the clock starts once the session's first step (and its
    compilation) is done, so a line of that step alone has null figures, and the time spent
    evaluating, saving and syncing logs (`paused`, once the device has caught up) is left out."""

    def __init__(self, config: Config, mesh):
        self.step, self.time, self.paused, self.tokens_per_step = None, None, 0.0, config.tokens_per_step
        active = trainer.summary(config)["params_active"]
        self.flops_per_token = metrics_lib.flops_per_token(config.model, config.data.seq_len, active)
        self.devices = int(mesh.devices.size)
        self.peak = config.train.peak_flops or metrics_lib.device_peak_flops(mesh.devices.flat[0],
                                                                             config.compute.dtype)

    def start(self, step: int, state) -> None:
        """The clock starts once `step` (the session's first, with its compilation) is done."""
        jax.block_until_ready(state)
        self.step, self.time, self.paused = step, time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused_for(self, state):
        """Leaves out what runs inside (an evaluation, a save) from the training time, once the
        steps already queued (`state`) are done."""
        jax.block_until_ready(state)
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - begun

    def __call__(self, step: int) -> dict[str, float | None]:
        if self.time is None or step <= self.step:
            return {"tokens_per_sec": None, "tflops_per_device": None, "mfu": None}
        now = time.perf_counter()
        rate = (step - self.step) * self.tokens_per_step / max(now - self.time - self.paused, 1e-9)
        self.step, self.time, self.paused = step, now, 0.0
        tflops, mfu = metrics_lib.utilisation(self.flops_per_token, rate, self.devices, self.peak)
        return {"tokens_per_sec": rate, "tflops_per_device": tflops, "mfu": mfu}


class _Profiler:
    """A jax.profiler trace of the steps train.profile_steps names, into WORKDIR/profile, on
    train.profile_process (-1: every process). Steps are asynchronous: the trace stops once
    the last step's state is ready."""

    def __init__(self, config: Config, workdir: pathlib.Path):
        process = config.train.profile_process
        self.window = config.train.profile_window if process in (-1, jax.process_index()) else None
        self.folder, self.active = workdir / "profile", False

    def before(self, step: int) -> None:
        if self.window and not self.active and self.window[0] <= step <= self.window[1]:
            jax.profiler.start_trace(str(self.folder))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step >= self.window[1]:
            self.stop(state)

    def stop(self, state=None) -> None:
        """Ends the trace; after the window's last step `state` is waited for, and on the way
        out of a failed run (whose state may have been donated) nothing is."""
        if self.active:
            if state is not None:
                jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False


@dataclasses.dataclass
class _Session:
    """Everything a run holds between steps."""

    config: Config
    corpus: data_lib.Corpus
    eval_batches: list[np.ndarray]
    eval_sets: dict[str, list[np.ndarray]]  # data.eval_sets: name -> its batches
    mesh: jax.sharding.Mesh
    model: object
    checkpointer: Checkpointer
    state: trainer.TrainState
    start: int
    batches: data_lib.BatchIterator
    train_step: object
    eval_step: object
    fingerprint: dict
    rows: np.ndarray  # this process's rows of a global micro-batch, in the order put_batch takes them
    vote: distributed.StopVote

    def put_global(self, rows: np.ndarray) -> jax.Array:
        """A global micro-batch that every process holds (of the eval batches) -> the sharded one."""
        return sharding.put_batch(rows[self.rows], self.mesh)


def jitted_steps(config: Config, model, tx, mesh, shardings, eod_id: int | None = None):
    """The train and eval steps, jitted with explicit shardings (the state donated); `eod_id`:
    the tokenizer's end-of-document id (data.document_masking needs it)."""
    replicated = sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)
    train_step = jax.jit(trainer.make_train_step(config, model, tx, eod_id), in_shardings=(shardings, batch),
                         out_shardings=(shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(trainer.make_eval_step(config, model, eod_id), in_shardings=(shardings.params, batch),
                        out_shardings=replicated)
    return train_step, eval_step


def _open(config: Config, workdir: pathlib.Path, stop: StopRequest, start_over: bool,
          source: pathlib.Path | None) -> _Session:
    """Checks the inputs, then builds or restores the state; raises ConfigError on bad input.
    A stop request is honoured between the slow parts, before anything is compiled or written.
    `start_over`: train from step 0 when every checkpoint is unreadable (checkpoint.py).
    `source` (train.py --from): where a run with no checkpoint of its own starts (`run`)."""
    _check_stop(stop)
    trackers.check_installed(config.train)
    mesh = sharding.make_mesh(config.mesh)
    sharding.validate(config, mesh)
    corpus = data_lib.build_corpus(config.data, config.train.seed, config.model.vocab_size)
    _check_stop(stop)
    eval_batches = corpus.eval_batches(config.data.batch_size, config.train.eval_batches)
    eval_sets = {name: data_lib.eval_set(name, path, config.data, corpus.tokenizer, config.model.vocab_size,
                                         config.train.eval_batches, config.train.seed)
                 for name, path in config.data.eval_set_paths.items()}
    fingerprint = {"train_sequences": len(corpus.train), "train_tokens": corpus.train.num_tokens}

    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, config.train.steps)
    shardings = trainer.state_shardings(config, model, tx, mesh)
    abstract = trainer.abstract_state(config, model, tx, shardings)
    # Looked at before the barrier: past it, process 0 may tidy the checkpoints folder.
    fresh = not has_checkpoints(workdir)  # a new run, or one whose checkpoints are gone
    if fresh and source is None:
        check_fresh_start(workdir, config.to_json(), proof_step(config.train.checkpoint_every,
                                                                config.train.steps), start_over)
    distributed.barrier("opened")  # orbax's collectives come next; see distributed.barrier
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, keep_every=config.train.keep_every)
    restored = checkpointer.restore(abstract, config, start_over=start_over)  # onto this mesh, whatever saved it
    branched = restored is None and source is not None
    if branched:  # the source is looked at only now: once the run has checkpoints it may be gone
        restored, source_dir = _from_source(source, abstract, config)
        if fresh:
            check_fresh_start(workdir, config.to_json(), proof_step(
                config.train.checkpoint_every, config.train.steps, int(restored[0].step)), start_over,
                start="from --from's checkpoint")
    elif source is not None and jax.process_index() == 0:
        print(f"note: {workdir} has checkpoints of its own: resuming it (--from {source} only starts "
              "a new run)", flush=True)
    _check_stop(stop)
    if restored is None:
        state, start, data_state = trainer.init_state(config, model, tx, shardings), 0, None
    else:
        state, meta = restored
        start = int(state.step)
        before = from_dict(meta["config"]) if meta["config"] else config  # the checkpoint's run's config
        # Where the data stream stands: sequences read, whatever the batch size was and is now.
        data_state = data_lib.BatchIterator.state_at(data_lib.position(meta["data"], before.data.batch_size))
    # Every process must take the same steps: same config, same resumed step (a shared workdir).
    fields = {f"config's {section}.{name}": value
              for section, values in config.to_dict().items() for name, value in values.items()}
    distributed.check_same(mesh, {**fields, "resumed step": start})
    if start > config.train.steps:
        where, other = ((source_dir, "an earlier checkpoint to --from") if branched
                        else (checkpointer.directory, "another --workdir"))
        raise ConfigError(f"checkpoint {start} in {where} is past train.steps={config.train.steps}: nothing "
                          f"to train; give train.steps >= {start} or {other}")
    if jax.process_index() == 0:  # After the checks: a refused start leaves config.json as it was.
        try:
            (workdir / "config.json").write_text(config.to_json() + "\n")
        except OSError as err:
            raise WriteError(f"{failure_reason(err)} while writing {workdir / 'config.json'}") from None
    if restored is not None:
        resuming = f"starting from step {start} of {source_dir.parent}" if branched else \
            f"resuming step {start}"
        if meta["changed_settings"]:  # after the checks: a refused start notes nothing
            print(f"note: {resuming} with changed settings: {'; '.join(meta['changed_settings'])}",
                  flush=True)
            rates = _rates_at(before, config, start)
            if rates is not None:
                print(f"note: the learning rate for step {start + 1} is {rates[1]:.4g}; the checkpoint's "
                      f"optim and train.steps gave {rates[0]:.4g} (docs/operations.md)", flush=True)
        if before.train.seed != config.train.seed:
            print(f"note: train.seed {before.train.seed} -> {config.train.seed} draws another held-out set: "
                  "documents held out until now may be trained on, and the evaluations are not comparable",
                  flush=True)
        saved = meta.get("data_fingerprint")  # None: an import's or widen's, or an older checkpoint
        if saved is not None and saved != fingerprint:  # its place in other data means nothing here
            data_state = None
            print(f"note: the training data differ from the checkpoint's ({saved} -> {fingerprint}); "
                  f"they are read from their start after step {start}", flush=True)
        if branched:
            print(f"started from checkpoint {start} in {source_dir}, which is left as it was",
                  flush=True)
        else:
            print(f"resumed from step {start} in {checkpointer.directory}", flush=True)
    blocks, count = sharding.process_rows(mesh, config.data.batch_size)
    batches = data_lib.BatchIterator(corpus.train, config.data.batch_size, config.train.seed,
                                     blocks=blocks, block_count=count, state=data_state)
    train_step, eval_step = jitted_steps(config, model, tx, mesh, shardings, corpus.tokenizer.eod_id)
    vote = distributed.StopVote(mesh)
    if jax.process_count() > 1:
        train_step, eval_step = _compile_ahead(train_step, eval_step, abstract, mesh, (
            (config.data.batch_size, config.data.seq_len + 1),
            (config.micro_batch_rows, config.data.seq_len + 1)))
    share = config.micro_batch_rows // count
    rows = np.concatenate([np.arange(block * share, (block + 1) * share) for block in blocks])
    return _Session(config, corpus, eval_batches, eval_sets, mesh, model, checkpointer, state, start, batches,
                    train_step, eval_step, fingerprint, rows, vote)


def _from_source(source: pathlib.Path, abstract, config: Config) -> tuple[tuple, pathlib.Path]:
    """The checkpoint train.py --from names, restored (read only) onto `abstract` under `config`
    as resuming would, and the checkpoints folder it is in."""
    run, step = checkpoint_source(source)
    reader = Checkpointer(run, config.train.keep_checkpoints, read_only=True,
                          fix="give --from a run of this model, or leave --from out")
    try:
        restored = reader.restore(abstract, config, step=step)
    finally:
        reader.close()
    if restored is None:
        raise ConfigError(f"--from {str(source)!r}: {reader.directory} holds no checkpoint; give a run that "
                          "has saved one")
    return restored, reader.directory


def _rates_at(before: Config, config: Config, step: int) -> tuple[float, float] | None:
    """(`before`'s, `config`'s) learning rate for optax's count `step`, when they differ."""
    rates = tuple(float(learning_rate_schedule(c.optim, c.train.steps)(step)) for c in (before, config))
    return None if math.isclose(*rates, rel_tol=1e-6) else rates


def _compile_ahead(train_step, eval_step, abstract, mesh, batch_shapes):
    """Several processes: the steps compiled before the first one runs, then a barrier, so that
    no process starts a step's collectives while another is still compiling (distributed.barrier)."""
    train_batch, eval_batch = (jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
                               for shape in batch_shapes)
    with sharding.activate(mesh):
        train_step = train_step.lower(abstract, train_batch).compile()
        eval_step = eval_step.lower(abstract.params, eval_batch).compile()
    distributed.barrier("compiled")
    return train_step, eval_step


def evaluate(session: _Session, params) -> tuple[dict, np.ndarray]:
    """Held-out loss over the fixed eval batches, its perplexity, routing metrics, and loads:
    evaluation.held_out, the function the evaluate command uses too; and the loss and
    perplexity of each of data.eval_sets, as eval_loss/NAME and eval_ppl/NAME."""
    with sharding.activate(session.mesh):
        scalars, load = held_out(session.eval_step, params, session.eval_batches, session.config.model,
                                 session.put_global, session.config.micro_batch_rows)
        scalars.update(eval_set_scalars(session.eval_step, params, session.eval_sets, session.config.model,
                                        session.put_global, session.config.micro_batch_rows))
    return scalars, load


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=None if jax.process_index() == 0 else True)


def _write_evaluation(log: RunLog, bar, evaluation: dict, load: np.ndarray, pool_sizes: np.ndarray,
                      bias: np.ndarray | None) -> None:
    log.write(evaluation)
    log.write_routing(evaluation["step"], load, pool_sizes, bias)
    others = "".join(f"; {key.split('/', 1)[1]} {evaluation[key]:.4f}" for key in evaluation
                     if key.startswith("eval_loss/"))
    bar.write(f"step {evaluation['step']}: eval loss {evaluation['eval_loss']:.4f}, "
              f"perplexity {evaluation['eval_ppl']:.2f}{others}")


def _train(s: _Session, workdir: pathlib.Path, stop: StopRequest) -> tuple[int, dict | None]:
    """Steps from s.start to the end or a stop request; returns (last step, last evaluation)."""
    cfg, total = s.config.train, s.config.train.steps
    log, bar = RunLog(workdir, s.start, s.config), _progress(total, s.start)
    throughput, profiler = _Throughput(s.config, s.mesh), _Profiler(s.config, workdir)
    pool_sizes = layer_pool_sizes(s.config.model)

    flags = []  # (step, its device-side "finite" flag) of the steps not yet looked at

    def nonfinite_steps(step: int) -> list[int]:
        """The steps up to `step` not looked at before whose update was not finite."""
        seen = [(k, flag) for k, flag in flags if k <= step]
        flags[:] = flags[len(seen):]
        return [k for k, flag in seen if not bool(flag)]

    def write_train(step, metrics):
        record = to_host({k: v for k, v in metrics.items() if k not in _NOT_LOGGED})
        record = {"step": step, **record, **throughput(step)}
        bad = nonfinite_steps(step)  # every step's flag, not the logged steps' alone
        logged_bad = not all(math.isfinite(v) for v in record.values() if isinstance(v, float))
        if logged_bad and step not in bad:
            bad.append(step)
        log.write(record)
        if bad:
            report_nonfinite(bad, record if logged_bad or step in bad else None)
        bar.set_postfix(loss=f"{record['loss']:.3f}", n_t=record["psr_pool_size"],
                        tok_s=f"{record['tokens_per_sec'] or 0:.0f}")

    def report_nonfinite(bad: list[int], record: dict | None):
        """Stops (train.nonfinite=stop) or notes the skipped updates; `record`: a logged step's
        line, where a non-finite value shows, to name the first."""
        values = "non-finite values"
        if record is not None:
            seen = f"at step {record['step']}: " if bad[0] != record["step"] else ""
            values += f" ({seen}{_first_nonfinite(record)})"
        message = f"step {bad[0]}: {values}"
        if cfg.nonfinite == "stop":
            raise NonFiniteError(f"{message}; stopped, the last good checkpoint is kept "
                                 f"(steps {s.checkpointer.settle() or 'none'})")
        skipped = f"steps {', '.join(map(str, bad))}" if len(bad) > 1 else f"step {bad[0]}"
        bar.write(f"{message}; the update of {skipped} was skipped")

    pending, last_eval, step = None, None, s.start
    try:
        for step in range(s.start + 1, total + 1):
            profiler.before(step)
            with sharding.activate(s.mesh):
                s.state, metrics = s.train_step(s.state, sharding.put_batch(next(s.batches), s.mesh))
            profiler.after(step, s.state)
            flags.append((step, metrics["finite"]))
            if step == s.start + 1:
                throughput.start(step, s.state)
            s.checkpointer.check()  # A save that failed in the background stops the run here.
            if pending is not None:  # The previous log step's metrics: ready, as the device is ahead.
                write_train(*pending)
                pending = None
            if cfg.logs_at(step):
                pending = (step, metrics)
            bar.update(1)
            stopping = s.vote(stop.requested(step))  # the same on every process
            saving = stopping or step == total or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if saving:
                if cfg.nonfinite == "stop" and not all(bool(flag) for _, flag in flags):
                    write_train(step, metrics)  # Raises: a non-finite state is never saved.
                with throughput.paused_for(s.state):
                    s.checkpointer.save(step, s.state, {"step": step, "config": s.config.to_dict(),
                                                        "data": s.batches.state(),
                                                        "data_fingerprint": s.fingerprint})
            if cfg.evaluates_at(step):  # After the save: a failed evaluation or log line loses no step.
                with throughput.paused_for(s.state):
                    evaluation, load = evaluate(s, s.state.params)
                    last_eval = evaluation = {"step": step, **evaluation}
                    bias = np.asarray(metrics["router_bias"]) if "router_bias" in metrics else None
                    _write_evaluation(log, bar, evaluation, load, pool_sizes, bias)
            if saving:
                with throughput.paused_for(s.state):
                    log.sync()
            if stopping:
                break
        if pending is not None:
            write_train(*pending)
        if unlogged := nonfinite_steps(step):  # skipped after the last log line
            report_nonfinite(unlogged, None)
        s.checkpointer.close()  # Waits for the last write: a stop returns only once it is on disk.
    except WriteError as err:
        raise WriteError(f"{err}; {_intact(s.checkpointer.settle())}") from None
    except BaseException:  # anything else (an evaluation that failed): a save under way lands first
        s.checkpointer.settle()
        raise
    finally:
        profiler.stop()
        bar.close()
        s.checkpointer.close()
        log.close()
    return step, last_eval


def _stop_cause(stop: StopRequest, vote: distributed.StopVote) -> str:
    others = [str(p) for p in vote.requested_by if p != jax.process_index()]
    if stop.signal_name or not others:
        return stop.signal_name or "request"
    return f"a stop request on process {', '.join(others)}"


def run(config: Config, workdir: str | pathlib.Path, stop: StopRequest | None = None, *,
        start_over: bool = False, source: str | pathlib.Path | None = None) -> dict:
    """Trains `config` in `workdir` (a path or a string), resuming from its newest checkpoint,
    holding the workdir's lock throughout. Returns the final evaluation (with a generated
    sample), or {"stopped_at": step} after a stop request (step None when it came during
    start-up). When every checkpoint is unreadable it raises ConfigError, unless `start_over`
    (then it trains from step 0).

    `source` (train.py --from), a run folder or one of its checkpoints (RUN/checkpoints/STEP):
    a workdir with no checkpoint starts from that checkpoint (the newest readable one of a
    folder) instead of step 0: its weights, optimizer state, step and place in the data, under
    `config`, which must be compatible with the source's as on resuming. The source is only
    read. Once the workdir has checkpoints of its own, it resumes from those."""
    workdir = pathlib.Path(workdir)
    with contextlib.ExitStack() as stack:
        with distributed.refused_together("lock"):  # only process 0 takes it; each checks it can write
            stack.enter_context(locked(workdir, writer=jax.process_index() == 0))
        distributed.check_shared(workdir / LOCK_FILE)
        return _run(config, workdir, stop or StopRequest(), start_over,
                    None if source is None else pathlib.Path(source))


def _run(config: Config, workdir: pathlib.Path, stop: StopRequest, start_over: bool,
         source: pathlib.Path | None) -> dict:
    try:
        session = _open(config, workdir, stop, start_over, source)
    except _StoppedDuringStartup:
        print(f"stopped by {stop.signal_name or 'request'} during start-up, before compiling; nothing new "
              "to save", flush=True)
        return {"stopped_at": None}
    if jax.process_index() == 0 and session.start == config.train.steps:
        print(f"the run is already complete at step {session.start} (train.steps): evaluating its last "
              "checkpoint; a larger train.steps trains on", flush=True)
    elif jax.process_index() == 0:
        print(f"training steps {session.start + 1}-{config.train.steps} of {config.tokens_per_step:,} tokens "
              f"({len(session.corpus.train):,} training sequences, {len(session.eval_batches)} eval batches) "
              f"on {session.mesh.devices.size} device(s), mesh {dict(session.mesh.shape)}, in {workdir}", flush=True)
    step, last_eval = _train(session, workdir, stop)
    if step < config.train.steps:
        print(f"stopped by {_stop_cause(stop, session.vote)} after step {step}; checkpoint saved in "
              f"{session.checkpointer.directory}; run the same command to resume", flush=True)
        return {"stopped_at": step}
    if last_eval is None:  # The run was already complete: evaluate what it left.
        last_eval, _ = evaluate(session, session.state.params)
    result = dict(last_eval, step=step)
    train = config.train
    if train.sample_tokens:
        result["sample"] = _sample(session)
    return result


def _sample(s: _Session) -> str:
    """The end-of-run sample, decoded on one device of this process from a whole copy of the
    weights: one prompt does not split over a mesh, and with several processes the global
    device 0 is not this process's. Every process decodes the same; process 0 prints it."""
    params = s.state.params
    if s.mesh.devices.size > 1:
        params = jax.jit(lambda p: p, out_shardings=sharding.replicated(s.mesh))(params)
        params = jax.tree.map(lambda a: a.addressable_data(0), params)
    device = next(iter(jax.tree.leaves(params)[0].devices()))
    train, tokenizer = s.config.train, s.corpus.tokenizer
    key = jax.random.fold_in(jax.random.key(train.seed), trainer.SAMPLE_STREAM)
    with sharding.activate(sharding.make_mesh(MeshConfig(), [device])):
        [new] = generate_lib.generate(s.config.model, params, [tokenizer.encode(train.sample_prompt)],
                                      train.sample_tokens, jax.device_put(key, device),
                                      sampling=generate_lib.Sampling(temperature=0.8, top_k=40),
                                      eod_id=tokenizer.eod_id, compute=s.config.compute)
    return train.sample_prompt + tokenizer.decode(new)
