"""KV-cache decoding against recomputing the whole sequence, sampling filters, end-of-text."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from test_evaluate import CFG, params_for

from rexmoe_jax import generate


@pytest.mark.parametrize("sampling", [generate.Sampling(), generate.Sampling(1.0, 5, 0.9)], ids=["greedy", "sampled"])
def test_cached_decoding_equals_recomputing_the_sequence(sampling):
    cfg = dataclasses.replace(CFG.model, init_std=0.3)  # peaked logits: no near-ties for argmax
    params = params_for(dataclasses.replace(CFG, model=cfg))
    prompts = [[5, 17, 300, 42], [9], [100, 200]]
    key = jax.random.key(3)
    cached = generate.generate(cfg, params, prompts, 12, key, sampling=sampling)
    recomputed = generate.generate_uncached(cfg, params, prompts, 12, key, sampling=sampling)
    assert cached == recomputed and all(len(c) == 12 for c in cached)


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda s: {int(generate.sample_next(logits, k, s)[0]) for k in keys}
    assert draw(generate.Sampling(1.0, top_k=2)) == {0, 1}
    assert draw(generate.Sampling(1.0, top_p=0.7)) == {0, 1}  # 0.5 + 0.3 reach 0.7
    assert draw(generate.Sampling(1.0)) == {0, 1, 2, 3}
    assert draw(generate.Sampling()) == {0}
    with pytest.raises(ValueError):
        generate.Sampling(top_p=0)


def test_stop_at_end_of_text():
    cfg = dataclasses.replace(CFG.model, init_std=0.3)
    params = params_for(dataclasses.replace(CFG, model=cfg))
    free = generate.generate(cfg, params, [[5, 6]], 10, jax.random.key(0))[0]
    stop = free[3]
    cut = generate.generate(cfg, params, [[5, 6]], 10, jax.random.key(0), eod_id=stop)[0]
    assert cut == free[:free.index(stop)]
