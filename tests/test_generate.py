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


def test_new_token_count_is_checked_before_anything_is_loaded(tmp_path, capsys):
    assert generate.main(["--workdir", str(tmp_path / "none"), "--prompt", "x", "--max-new-tokens", "-3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --max-new-tokens must be >= 1, got -3"]
    with pytest.raises(ValueError, match="new tokens must be >= 1, got 0"):
        generate.generate(CFG.model, params_for(), [[1, 2]], 0, jax.random.key(0))


def test_a_prompt_longer_than_the_trained_length_is_generated_with_a_warning(capsys):
    from rexmoe_jax.data import EMBEDDED_TOKENIZER
    from rexmoe_jax.inference import LoadedModel
    from rexmoe_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_TOKENIZER)
    model = LoadedModel(CFG, params_for(), tokenizer, step=0)
    prompt = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    assert len(tokenizer.encode(prompt)) > CFG.data.seq_len
    assert len(model.generate(prompt, max_new_tokens=2)) == 1
    err = capsys.readouterr().err
    assert f"runs past the {CFG.data.seq_len} positions the model was trained on" in err
    model.generate("And", max_new_tokens=2)
    assert capsys.readouterr().err == ""  # within the trained length: no warning
