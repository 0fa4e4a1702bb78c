"""The train step (PSR from the step count, gradient accumulation) and short training runs."""

import json
import math

import jax
import numpy as np
import pytest

import train
from rexmoe_jax import trainer
from rexmoe_jax.config import Config, apply_overrides
from rexmoe_jax.optimizer import make_optimizer

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.expert_ffn=16", "model.num_experts=4", "model.top_k=2",
         "model.reuse=2", "psr.schedule=linear", "psr.start_step=2", "psr.end_step=6",
         "data.seq_len=16", "data.batch_size=4", "train.steps=10", "optim.warmup_steps=2"]


def setup(*extra):
    cfg = apply_overrides(Config(), SMALL + list(extra))
    model = trainer.build_model(cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    return cfg, trainer.init_state(cfg, model, tx), jax.jit(trainer.make_train_step(cfg, model, tx))


def test_psr_pool_follows_the_optimizer_step():
    """N_t comes from state.step inside the jitted step: 4 until t_s = 2, 8 from t_e = 6 on."""
    _, state, step_fn = setup()
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 64)
    sizes = []
    for _ in range(8):
        state, metrics = step_fn(state, tokens)
        sizes.append(int(metrics["psr_pool_size"]))
    assert sizes == [4, 4, 4, 5, 6, 7, 8, 8]
    assert int(state.step) == 8


def test_gradient_accumulation_equals_one_big_batch():
    """Without the (nonlinear, per-batch) balancing loss, two micro-batches of 2 give the same
    update as one batch of 4."""
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    results = []
    for accum in (1, 2):
        _, state, step_fn = setup(f"optim.grad_accum={accum}", "loss.load_balance=0")
        state, metrics = step_fn(state, tokens)
        results.append((state.params, metrics))
    (p1, m1), (p2, m2) = results
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_short_training_run_logs_and_learns(tmp_path, capsys):
    """The main job on the embedded corpus: metrics.jsonl has the contract's keys, the loss
    falls well below its start, and the run ends with a perplexity and a sample."""
    workdir = tmp_path / "run"
    args = ["--workdir", str(workdir), "model.d_model=64", "model.num_layers=2", "model.expert_ffn=64",
            "data.seq_len=64", "data.batch_size=8", "train.steps=60", "train.log_every=10",
            "train.eval_every=30", "train.eval_batches=2", "psr.start_step=10", "psr.end_step=40",
            "train.sample_tokens=8", "mesh.num_devices=1"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity:" in out and "sample: And God said" in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in eval_records] == [30, 60]
    for key in ("step", "loss", "lr", "psr_pool_size", "lb_loss", "z_loss", "grad_norm", "tokens_per_sec"):
        assert all(key in r for r in train_records), key
    for key in ("step", "eval_loss", "eval_ppl", "lbv_max"):
        assert all(key in r for r in eval_records), key
    assert train_records[0]["psr_pool_size"] == 8 and train_records[-1]["psr_pool_size"] == 16
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0
    assert train_records[0]["loss"] < math.log(4096) + 0.5  # starts near uniform
    assert eval_records[-1]["eval_ppl"] == pytest.approx(math.exp(eval_records[-1]["eval_loss"]))
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 64
