"""The host loop: batches in, metrics out (one step late, so the device never waits), evaluation,
logging and checkpoints at their cadences, resume, preemption and non-finite steps."""

from __future__ import annotations

import math
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import data as data_lib
from rexmoe_jax import generate as generate_lib
from rexmoe_jax import metrics as metrics_lib
from rexmoe_jax import trainer
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.model import layer_pool_sizes
from rexmoe_jax.optimizer import make_optimizer
from rexmoe_jax.preemption import StopRequest
from rexmoe_jax.runlog import RunLog, to_host

# Per-step values kept out of metrics.jsonl: the (L, pool) loads go to routing.jsonl at evals.
_NOT_LOGGED = ("expert_load", "finite")


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient and train.nonfinite is "stop"."""


def check_workdir(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as err:
        raise ConfigError(f"--workdir {str(workdir)!r} is not writable ({err.strerror}); "
                          "choose another folder") from None


def _first_nonfinite(record: dict) -> str:
    """Names the first non-finite value of a step: a scalar, else the first layer or group."""
    for name in ("loss", "lb_loss", "z_loss", "grad_norm", "param_norm"):
        if not math.isfinite(record[name]):
            culprit = f"{name}={record[name]}"
            break
    else:
        culprit = "a metric"
    for name, what in (("layer_z_loss", "layer"), ("layer_grad_norm", "layer"),
                       ("group_expert_grad_norm", "expert pool of group")):
        bad = [i for i, v in enumerate(record[name]) if not math.isfinite(v)]
        if bad:
            return f"{culprit}; first non-finite {name} at {what} {bad[0]}"
    return culprit


class _Throughput:
    def __init__(self, step: int, tokens_per_step: int):
        self.step, self.time, self.tokens_per_step = step, time.perf_counter(), tokens_per_step

    def __call__(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.tokens_per_step / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate


def evaluate(eval_step, params, batches: list[np.ndarray], pool_sizes: np.ndarray) -> tuple[dict, np.ndarray]:
    """Held-out loss over the fixed eval batches, its perplexity, routing metrics, and loads."""
    results = [eval_step(params, jnp.asarray(batch)) for batch in batches]
    loss = float(np.mean([float(r["loss"]) for r in results]))
    load = np.mean([np.asarray(r["expert_load"]) for r in results], axis=0)
    routing = metrics_lib.routing_metrics(jnp.asarray(load), pool_sizes)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
            "lbv_max": float(routing["lbv_max"]), "underused_share": float(routing["underused_share"])}, load


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=None if jax.process_index() == 0 else True)


def run(config: Config, workdir: pathlib.Path, stop: StopRequest | None = None) -> dict:
    """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the final
    evaluation (with a generated sample), or {"stopped_at": step} after a stop request."""
    stop = stop or StopRequest()
    check_workdir(workdir)
    corpus = data_lib.build_corpus(config.data, config.train.seed, config.model.vocab_size)
    eval_batches = corpus.eval_batches(config.data.batch_size, config.train.eval_batches)
    fingerprint = {"train_sequences": len(corpus.train), "train_tokens": corpus.train.num_tokens}

    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, config.train.steps)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
    abstract = jax.eval_shape(lambda: trainer.init_state(config, model, tx))
    restored = checkpointer.restore(abstract, config)
    (workdir / "config.json").write_text(config.to_json() + "\n")
    if restored is None:
        state, start, data_state = trainer.init_state(config, model, tx), 0, None
    else:
        state, meta = restored
        start, data_state = int(state.step), meta["data"]
        if meta.get("data_fingerprint") != fingerprint:
            print(f"note: the training data differ from the checkpoint's ({meta.get('data_fingerprint')} "
                  f"-> {fingerprint}); batches after step {start} differ from the original run", flush=True)
        print(f"resumed from step {start} in {checkpointer.directory}", flush=True)
    batches = data_lib.BatchIterator(corpus.train, config.data.batch_size, config.train.seed,
                                     host_index=jax.process_index(), host_count=jax.process_count(),
                                     state=data_state)
    train_step = jax.jit(trainer.make_train_step(config, model, tx), donate_argnums=0)
    eval_step = jax.jit(trainer.make_eval_step(config, model))
    pool_sizes = layer_pool_sizes(config.model)
    log = RunLog(workdir, start)
    total, train_cfg = config.train.steps, config.train
    if jax.process_index() == 0:
        print(f"training steps {start + 1}-{total} of {config.tokens_per_step:,} tokens "
              f"({len(corpus.train):,} training sequences, {len(eval_batches)} eval batches) in {workdir}",
              flush=True)

    def write_train(step, metrics):
        record = to_host({k: v for k, v in metrics.items() if k not in _NOT_LOGGED})
        record = {"step": step, **record, "tokens_per_sec": throughput(step)}
        if not all(math.isfinite(v) for k, v in record.items() if isinstance(v, float)) or not bool(
                metrics["finite"]):
            message = f"step {step}: non-finite values ({_first_nonfinite(record)})"
            if train_cfg.nonfinite == "stop":
                log.write(record)
                raise NonFiniteError(f"{message}; stopped, the last good checkpoint is kept "
                                     f"(steps {checkpointer.steps() or 'none'})")
            bar.write(f"{message}; the update was skipped")
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", n_t=record["psr_pool_size"],
                        tok_s=f"{record['tokens_per_sec']:.0f}")

    throughput = _Throughput(start, config.tokens_per_step)
    bar = _progress(total, start)
    pending, final_eval, step = None, None, start
    try:
        for step in range(start + 1, total + 1):
            state, metrics = train_step(state, jnp.asarray(next(batches)))
            if pending is not None:  # The previous log step's metrics: ready, as the device is ahead.
                write_train(*pending)
                pending = None
            if step % train_cfg.log_every == 0 or step == total:
                pending = (step, metrics)
            if step % train_cfg.eval_every == 0 or step == total:
                final_eval, load = evaluate(eval_step, state.params, eval_batches, pool_sizes)
                final_eval = {"step": step, **final_eval}
                log.write(final_eval)
                log.write_routing(step, load, pool_sizes)
                bar.write(f"step {step}: eval loss {final_eval['eval_loss']:.4f}, "
                          f"perplexity {final_eval['eval_ppl']:.2f}")
            bar.update(1)
            stopping = stop.requested(step)
            if stopping or step == total or (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0):
                if not bool(metrics["finite"]) and train_cfg.nonfinite == "stop":
                    write_train(step, metrics)  # Raises: a non-finite state is never saved.
                checkpointer.save(step, state, {"step": step, "config": config.to_dict(), "data": batches.state(),
                                                "data_fingerprint": fingerprint})
            if stopping:
                break
        if pending is not None:
            write_train(*pending)
    finally:
        bar.close()
        checkpointer.close()  # Waits for the last write: a stop returns only once it is on disk.
        log.close()
    if step < total:
        print(f"stopped by {stop.signal_name or 'request'} after step {step}; "
              f"checkpoint saved in {checkpointer.directory}; run the same command to resume", flush=True)
        return {"stopped_at": step}

    if final_eval is None:  # The run was already complete: evaluate what it left.
        final_eval, _ = evaluate(eval_step, state.params, eval_batches, pool_sizes)
        print(f"the run was already complete at step {start}", flush=True)
    result = dict(final_eval)
    if train_cfg.sample_tokens:
        prompt = corpus.tokenizer.encode(train_cfg.sample_prompt)
        key = jax.random.fold_in(jax.random.key(train_cfg.seed), trainer._SAMPLE_STREAM)
        new = generate_lib.generate(model, state.params, prompt, train_cfg.sample_tokens, key,
                                    eod_id=corpus.tokenizer.eod_id)
        result["sample"] = train_cfg.sample_prompt + corpus.tokenizer.decode(new)
    return result
