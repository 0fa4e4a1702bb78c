"""The pure train step: PSR from the step count, gradient accumulation (under layer and token
masks)."""

import jax
import numpy as np
import pytest

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


def test_document_masking_scores_each_document_as_if_alone():
    """data.document_masking: a row packs document A (7 tokens and the end token 9) and 9
    tokens of B. Each token's next-token loss is then the one it has in a row of its own
    document: the packed row's mean loss is the mean of A's row (A, predicting up to B's first
    token) and B's row, 8 predictions each. Without masking B's tokens see A, and it is not."""
    cfg, state, _ = setup("data.document_masking=true")
    model = trainer.build_model(cfg)
    eval_step = jax.jit(trainer.make_eval_step(cfg, model, eod_id=9))
    rng = np.random.default_rng(0)
    a, b = rng.integers(10, 64, 7), rng.integers(10, 64, 9)
    packed = np.concatenate([a, [9], b])[None].astype(np.int32)  # 17 tokens: 16 predictions
    alone = [np.concatenate([a, [9], b[:1]])[None], b[None]]  # 9 tokens each: 8 predictions
    expected = np.mean([float(eval_step(state.params, row.astype(np.int32))["loss"]) for row in alone])
    assert float(eval_step(state.params, packed)["loss"]) == pytest.approx(expected, rel=1e-5)
    unmasked = jax.jit(trainer.make_eval_step(apply_overrides(Config(), SMALL), model))
    assert abs(float(unmasked(state.params, packed)["loss"]) - expected) > 1e-4


def test_document_masking_without_the_end_token_id_is_refused():
    cfg, _, _ = setup("data.document_masking=true")
    with pytest.raises(ValueError, match="end-of-document id"):
        trainer.make_eval_step(cfg, trainer.build_model(cfg))(None, np.zeros((1, 5), np.int32))


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


def test_a_skipped_update_moves_optax_counts_with_the_step():
    """train.nonfinite=skip: a NaN weight makes the update non-finite. The weights and moments stay
    as they were (moments 0, as initialised), but optax's counts, which pick the learning rate it
    applies, advance with state.step (1), so the LR and PSR schedules read the same step."""
    _, state, step_fn = setup("train.nonfinite=skip")
    leaves, treedef = jax.tree.flatten(state.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.nan)
    state = state.replace(params=jax.tree.unflatten(treedef, leaves))
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 64)
    state, metrics = step_fn(state, tokens)
    assert not bool(metrics["finite"]) and int(state.step) == 1
    opt_leaves = jax.tree.leaves(state.opt_state)
    counts = [x for x in opt_leaves if np.issubdtype(x.dtype, np.integer)]
    moments = [x for x in opt_leaves if np.issubdtype(x.dtype, np.floating)]
    assert counts and [int(c) for c in counts] == [1] * len(counts)
    assert moments and all(not np.any(np.asarray(m)) for m in moments)
    assert np.isnan(np.asarray(jax.tree.leaves(state.params)[0]).flat[0])  # the old weights, kept


def test_token_masks_under_remat_and_accumulation_equal_the_plain_step():
    """psr.granularity=token with two micro-batches under full remat (what every paper preset
    runs). The number of micro-batches once sized the masks and became a traced value inside
    remat's trace, so the step did not compile. Recomputing the layers changes nothing: the same
    loss and weights as without remat."""
    tokens = jax.random.randint(jax.random.key(2), (4, 17), 0, 64)
    results = []
    for remat in ("none", "full"):
        _, state, step_fn = setup("psr.granularity=token", "optim.grad_accum=2", f"compute.remat={remat}",
                                  "psr.start_step=0")
        state, metrics = step_fn(state, tokens)  # step 0 of the 0 -> 6 ramp: N_t = 4 of 8, per token
        results.append((state.params, metrics))
    (plain, m_plain), (remat, m_remat) = results
    assert int(m_remat["psr_pool_size"]) < 8
    np.testing.assert_allclose(float(m_remat["loss"]), float(m_plain["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.e2e
@pytest.mark.parametrize("granularity", ["layer", "token"])
def test_gradient_accumulation_equals_one_big_batch(granularity):
    """Without the (nonlinear, per-batch) balancing loss, two micro-batches of 2 give the same
    update as one batch of 4, PSR masks included: per layer they are the step's, per token each
    micro-batch takes its own rows of the whole batch's masks (step 0 < t_s: 4 of 8 available)."""
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    results = []
    for accum in (1, 2):
        _, state, step_fn = setup(f"optim.grad_accum={accum}", "loss.load_balance=0",
                                  f"psr.granularity={granularity}")
        state, metrics = step_fn(state, tokens)
        results.append((state.params, metrics))
    (p1, m1), (p2, m2) = results
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
