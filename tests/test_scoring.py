"""Packed scoring against one unpadded forward pass per request, and the rolling windows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional import importorskip
from test_evaluate import CFG, params_for

from rexmoe_jax.inference import scoring
from rexmoe_jax.model.decoder import Decoder

SEQ = CFG.data.seq_len
PEAKED = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, init_std=0.3))  # no argmax near-ties


@pytest.fixture(scope="module")
def params():
    return params_for(PEAKED)


def requests():
    """Questions sharing contexts (some too many choices for one row), one-token contexts and
    continuations, and contexts longer than a row, cut from the left."""
    rng = np.random.default_rng(0)
    out = []
    for length in (1, 2, 5, 9, 15, 30):
        context = rng.integers(1, 4096, length).tolist()
        choices = 5 if length == 9 else 3
        out += [(context, rng.integers(1, 4096, rng.integers(1, 5)).tolist()) for _ in range(choices)]
    return out + [([7], [8] * SEQ)]


def by_hand(config, params, requests):
    """Each request in its own row: its last seq_len + 1 tokens, then padding (which causal
    attention keeps from the tokens before it), and its own log-softmax."""
    seq = config.data.seq_len
    rows = np.zeros((len(requests), seq), np.int32)
    cut = [(list(c) + list(x))[-(seq + 1):] for c, x in requests]
    for row, ids in enumerate(cut):
        rows[row, :len(ids) - 1] = ids[:-1]
    params = jax.device_put(params, jax.devices()[0])  # the oracle runs on one device
    logits, _ = jax.jit(Decoder(config.model).apply)({"params": params}, jnp.asarray(rows))
    logp_all = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    logprob, greedy = [], []
    for logp, ids, (_, continuation) in zip(logp_all, cut, requests):
        logp = logp[len(ids) - 1 - len(continuation):]
        logprob.append(sum(logp[i, t] for i, t in enumerate(continuation)))
        greedy.append(all(np.argmax(logp[i]) == t for i, t in enumerate(continuation)))
    return np.asarray(logprob), np.asarray(greedy)


@pytest.mark.parametrize("implementation", scoring.IMPLEMENTATIONS)
def test_scores_equal_one_forward_pass_per_request(params, implementation):
    reqs = requests()
    expected, greedy = by_hand(PEAKED, params, reqs)
    scores = scoring.score(PEAKED, params, reqs, implementation)
    np.testing.assert_allclose(scores.logprob, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(scores.greedy, greedy)
    assert scores.scored == sum(len(x) for _, x in reqs)


def test_packing_computes_fewer_positions(params):
    reqs = requests()
    padded, packed = (scoring.score(PEAKED, params, reqs, i) for i in ("padded", "packed"))
    assert packed.computed <= padded.computed // 2 and packed.scored == padded.scored


def test_requests_that_cannot_be_scored():
    with pytest.raises(ValueError, match="non-empty"):
        scoring.cut([], [1], SEQ)
    with pytest.raises(ValueError, match="exceeds"):
        scoring.cut([1], [2] * (SEQ + 1), SEQ)


@pytest.mark.parametrize("stride", [None, 1, 5, SEQ])
def test_rolling_windows_score_every_token_once_with_the_context_that_fits(stride):
    tokens = list(range(100, 100 + 3 * SEQ + 5))
    windows = scoring.rolling_windows(tokens, 0, SEQ, stride)
    assert [t for _, x in windows for t in x] == tokens
    full = [0] + tokens
    for context, continuation in windows:
        joined = context + continuation
        assert len(joined) <= SEQ + 1 and all(len(x) <= (stride or SEQ) for _, x in windows)
        end = full.index(continuation[-1]) + 1
        assert joined == full[max(0, end - SEQ - 1):end]  # as much context as fits


def test_rolling_windows_are_lm_evals_at_the_default_stride():
    lm_utils = importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + 3 * SEQ + 5))
    theirs = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(tokens, 0, SEQ, 1)]
    assert [(list(c), list(x)) for c, x in theirs] == scoring.rolling_windows(tokens, 0, SEQ)


def test_rolling_loglikelihood_of_a_short_text_is_its_log_likelihood_after_end_of_text(params):
    text = list(range(200, 210))
    [rolled] = scoring.rolling_loglikelihood(PEAKED, params, [text], 0, stride=3)
    [whole] = scoring.score(PEAKED, params, [([0], text)]).logprob
    assert rolled == pytest.approx(whole, abs=1e-4)
    assert scoring.rolling_loglikelihood(PEAKED, params, [[]], 0).tolist() == [0.0]
