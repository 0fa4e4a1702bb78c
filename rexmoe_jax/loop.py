"""The host loop: batches in, metrics out (one step late, so the device never waits), evaluation
and logging at their cadences, and the final perplexity and text sample."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import data as data_lib
from rexmoe_jax import generate as generate_lib
from rexmoe_jax import metrics as metrics_lib
from rexmoe_jax import trainer
from rexmoe_jax.config import Config
from rexmoe_jax.model import layer_pool_sizes
from rexmoe_jax.optimizer import make_optimizer


class MetricsLog:
    """Appends one JSON object per line to workdir/metrics.jsonl."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _scalars(metrics: dict) -> dict:
    """Host copies of the log-line values; arrays of per-layer values become lists."""
    out = {}
    for name, value in metrics.items():
        if name == "expert_load":
            continue
        value = np.asarray(value)
        out[name] = value.item() if value.ndim == 0 else value.round(4).tolist()
    return out


def evaluate(eval_step, params, batches: list[np.ndarray], pool_sizes: np.ndarray) -> dict:
    """Held-out loss averaged over the fixed eval batches, its perplexity and routing metrics."""
    results = [eval_step(params, jnp.asarray(batch)) for batch in batches]
    loss = float(np.mean([float(r["loss"]) for r in results]))
    load = np.mean([np.asarray(r["expert_load"]) for r in results], axis=0)
    routing = metrics_lib.routing_metrics(jnp.asarray(load), pool_sizes)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
            "lbv_max": float(routing["lbv_max"]), "underused_share": float(routing["underused_share"])}


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=None)


def run(config: Config, workdir: pathlib.Path) -> dict:
    """Trains `config` in `workdir`; returns the final evaluation with the generated sample."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json() + "\n")
    corpus = data_lib.build_corpus(config.data, config.train.seed)
    if corpus.tokenizer.vocab_size > config.model.vocab_size:
        raise SystemExit(f"error: the tokenizer has {corpus.tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={config.model.vocab_size}; raise model.vocab_size")
    source = data_lib.BatchSource(corpus.train, config.data.batch_size, config.train.seed)
    eval_batches = corpus.eval_batches(config.data.batch_size, config.train.eval_batches)

    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, config.train.steps)
    state = trainer.init_state(config, model, tx)
    train_step = jax.jit(trainer.make_train_step(config, model, tx), donate_argnums=0)
    eval_step = jax.jit(trainer.make_eval_step(config, model))
    pool_sizes = layer_pool_sizes(config.model)
    log = MetricsLog(workdir / "metrics.jsonl")

    start = int(state.step)
    tokens_per_step = config.tokens_per_step
    print(f"training {config.train.steps} steps of {tokens_per_step:,} tokens "
          f"({len(corpus.train):,} training sequences, {len(eval_batches)} eval batches) in {workdir}",
          flush=True)
    bar = _progress(config.train.steps, start)
    pending, last_time, last_step, final_eval = None, time.perf_counter(), start, None
    for step in range(start, config.train.steps):
        state, step_metrics = train_step(state, jnp.asarray(source.batch(step)))
        done = step + 1
        if pending is not None:  # Fetch the previous log step's metrics: the device is ahead.
            pending_step, pending_metrics = pending
            now = time.perf_counter()
            record = {"step": pending_step, **_scalars(pending_metrics),
                      "tokens_per_sec": (pending_step - last_step) * tokens_per_step / (now - last_time)}
            last_time, last_step = now, pending_step
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", n_t=record["psr_pool_size"],
                            tok_s=f"{record['tokens_per_sec']:.0f}")
            pending = None
        if done % config.train.log_every == 0 or done == config.train.steps:
            pending = (done, step_metrics)
        if done % config.train.eval_every == 0 or done == config.train.steps:
            final_eval = {"step": done, **evaluate(eval_step, state.params, eval_batches, pool_sizes)}
            log.write(final_eval)
            bar.write(f"step {done}: eval loss {final_eval['eval_loss']:.4f}, "
                      f"perplexity {final_eval['eval_ppl']:.2f}")
        bar.update(1)
    if pending is not None:
        pending_step, pending_metrics = pending
        now = time.perf_counter()
        log.write({"step": pending_step, **_scalars(pending_metrics),
                   "tokens_per_sec": (pending_step - last_step) * tokens_per_step / (now - last_time)})
    bar.close()

    result = dict(final_eval or {})
    if config.train.sample_tokens:
        prompt = corpus.tokenizer.encode(config.train.sample_prompt)
        key = jax.random.fold_in(jax.random.key(config.train.seed), trainer._SAMPLE_STREAM)
        new = generate_lib.generate(model, state.params, prompt, config.train.sample_tokens, key,
                                    eod_id=corpus.tokenizer.eod_id)
        result["sample"] = config.train.sample_prompt + corpus.tokenizer.decode(new)
    return result
