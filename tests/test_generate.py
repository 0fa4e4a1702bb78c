"""KV-cache decoding against recomputing the whole sequence, sampling filters, end-of-text."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from files import hashes, one_error_line
from test_evaluate import CFG, params_for

from rexmoe_jax import sharding
from rexmoe_jax.config import ConfigError, MeshConfig, apply_overrides
from rexmoe_jax.data import EMBEDDED_TOKENIZER
from rexmoe_jax.inference import generate, restore
from rexmoe_jax.inference.api import LoadedModel
from rexmoe_jax.model.decoder import Decoder
from rexmoe_jax.model.dispatch import compute_for
from rexmoe_jax.tokenizer import load_tokenizer


@pytest.mark.parametrize("sampling", [pytest.param(generate.Sampling(), id="greedy"),
                                      pytest.param(generate.Sampling(1.0, 5, 0.9), id="sampled", marks=pytest.mark.e2e)])
def test_cached_decoding_equals_recomputing_the_sequence(sampling):
    cfg = dataclasses.replace(CFG.model, init_std=0.3)  # peaked logits: no near-ties for argmax
    params = params_for(dataclasses.replace(CFG, model=cfg))
    prompts = [[5, 17, 300, 42], [9], [100, 200]]
    key = jax.random.key(3)
    cached = generate.generate(cfg, params, prompts, 12, key, sampling=sampling)
    recomputed = generate.generate_uncached(cfg, params, prompts, 12, key, sampling=sampling)
    assert cached == recomputed and all(len(c) == 12 for c in cached)


@pytest.mark.parametrize("fields,dtype,tolerance", [
    pytest.param(dict(num_shared_experts=1, renormalize_gates=True), "float32", 1e-4,
                 id="shared-renormalised"),
    pytest.param(dict(router_bias=True), "float32", 1e-4, id="router-bias", marks=pytest.mark.e2e),
    pytest.param(dict(num_layers=3), "float32", 1e-4, id="smaller-last-group", marks=pytest.mark.e2e),
    pytest.param(dict(tie_embeddings=True, num_kv_heads=2), "float32", 1e-4, id="tied-mha",
                 marks=pytest.mark.e2e),
    pytest.param({}, "bfloat16", 5e-2, id="bfloat16"),
])
def test_cached_logits_equal_the_whole_sequences(fields, dtype, tolerance):
    """Logits, not only argmax tokens: a prompt pass over 4 tokens, then 6 single-token steps
    with the cache (the gather dispatch), against one uncached pass over all 10."""
    cfg = dataclasses.replace(CFG.model, init_std=0.3, **fields)
    compute = dataclasses.replace(generate.DEFAULT_COMPUTE, dtype=dtype)
    params = params_for(dataclasses.replace(CFG, model=cfg))
    rng = np.random.default_rng(0)
    def nonzero_bias(path, x):  # a nonzero router bias, where there is one
        return jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype) if "router_bias" in str(path[-1]) else x

    params = jax.tree_util.tree_map_with_path(nonzero_bias, params)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 10)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    whole, _ = jax.jit(Decoder(cfg, compute).apply)({"params": params}, tokens)
    prompt_model = Decoder(cfg, compute, decode=True)
    step_model = Decoder(cfg, compute_for(compute, "decode"), decode=True)
    prompt_pass = jax.jit(lambda v, t, p: prompt_model.apply(v, t, p, mutable=["cache"]))
    step = jax.jit(lambda v, t, p: step_model.apply(v, t, p, mutable=["cache"]))
    shapes = jax.eval_shape(lambda: prompt_model.init(jax.random.key(0), tokens)["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (logits, _), state = prompt_pass({"params": params, "cache": cache}, tokens[:, :4], positions[:, :4])
    steps = [logits]
    for i in range(4, 10):
        (logits, _), state = step({"params": params, "cache": state["cache"]}, tokens[:, i:i + 1],
                                  positions[:, i:i + 1])
        steps.append(logits)
    cached = np.concatenate([np.asarray(x, np.float32) for x in steps], axis=1)
    np.testing.assert_allclose(cached, np.asarray(whole, np.float32), atol=tolerance, rtol=0)


@pytest.mark.parametrize("compute", [
    pytest.param(generate.DEFAULT_COMPUTE, id="sort"),
    # A run trained with the capacity dispatch: the prompts' pass must still drop nothing, or a
    # prompt's text would depend on the other prompts (and the padding) in its batch.
    pytest.param(dataclasses.replace(generate.DEFAULT_COMPUTE, dispatch="capacity", capacity_factor=1.0),
                 id="capacity")])
def test_greedy_decoding_equals_the_numpy_reference_token_by_token(compute):
    """Prompts of different lengths decoded in one batch give, for each prompt alone, the argmax
    of the NumPy reference's last logits (dropless), appended one token at a time."""
    cfg = dataclasses.replace(CFG.model, init_std=0.3)
    params = params_for(dataclasses.replace(CFG, model=cfg))
    prompts = [[5, 17, 300, 42], [9], [100, 200]]
    decoded = generate.generate(cfg, params, prompts, 6, jax.random.key(0), compute=compute)
    host = jax.tree.map(np.asarray, params)
    for prompt, tokens in zip(prompts, decoded):
        sequence = list(prompt)
        for _ in range(6):
            logits, _ = numpy_reference.forward(host, cfg, np.asarray([sequence]))
            sequence.append(int(np.argmax(logits[0, -1])))
        assert tokens == sequence[len(prompt):], prompt


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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_a_prompt_longer_than_the_trained_length_is_generated_with_a_warning(capsys):
    tokenizer = load_tokenizer(EMBEDDED_TOKENIZER)
    model = LoadedModel(CFG, params_for(), tokenizer, step=0)
    prompt = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    assert len(tokenizer.encode(prompt)) > CFG.data.seq_len
    assert len(model.generate(prompt, max_new_tokens=2)) == 1
    err = capsys.readouterr().err
    assert f"runs past the {CFG.data.seq_len} positions the model was trained on" in err
    model.generate("And", max_new_tokens=2)
    assert capsys.readouterr().err == ""  # within the trained length: no warning


def _run_folder(tmp_path, cfg=CFG):
    """A run folder holding only config.json: enough for the checks made before restoring."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(cfg.to_json())
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_bytes_is_the_decoders_cache(dtype):
    """The formula against the cache the decoder really allocates (traced from shapes)."""
    compute = dataclasses.replace(generate.DEFAULT_COMPUTE, dtype=dtype)
    tokens = jnp.zeros((3, 11), jnp.int32)
    cache = jax.eval_shape(lambda: Decoder(CFG.model, compute, decode=True).init(jax.random.key(0), tokens)["cache"])
    allocated = sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
    assert generate.kv_cache_bytes(CFG.model, compute, 3, 11) == allocated


def test_requests_are_checked_against_the_model():
    model, compute = CFG.model, generate.DEFAULT_COMPUTE
    # By hand: keys and values of 2 layers x 1 KV head x head dim 16, float32, per position and prompt.
    per_position = 2 * 2 * 1 * 16 * 4
    free = 2 * per_position * 2 * 100  # half of it holds the cache of 2 prompts x 100 positions
    generate.check_request(model, compute, [[1, 2, 3], [4]], 97, free=free)
    with pytest.raises(ConfigError, match="98 new tokens do not fit.*at most 97 new tokens fit"):
        generate.check_request(model, compute, [[1, 2, 3], [4]], 98, free=free)
    with pytest.raises(ConfigError, match="prompt 2 of 3 is empty"):
        generate.check_request(model, compute, [[1], [], [2]], 4)
    with pytest.raises(ConfigError, match="prompt 1 of 1 holds token id 4096, outside the model's vocabulary"):
        generate.check_request(model, compute, [[5, 4096]], 4)
    with pytest.raises(ConfigError, match="top-k 4097 is larger than the vocabulary"):
        generate.check_request(model, compute, [[5]], 4, generate.Sampling(1.0, top_k=4097))
    generate.check_request(model, compute, [[5]], 4, generate.Sampling(1.0, top_k=4096))


def test_on_a_mesh_a_device_holds_the_cache_of_its_own_rows():
    """8 devices on the data axis: 1 or 8 prompts put one prompt's cache on each device, 9 put
    two (padded to 16 rows); the budget is checked against that, not the whole batch / 8."""
    model, compute = CFG.model, generate.DEFAULT_COMPUTE
    mesh = sharding.make_mesh(MeshConfig())
    assert sharding.batch_devices(mesh) == 8
    per_position = 2 * 2 * 1 * 16 * 4  # by hand, as above: one prompt, one position
    free = 2 * per_position * 100  # half holds one prompt's 100 positions
    for prompts in ([[1]], [[1]] * 8):
        generate.check_request(model, compute, prompts, 99, free=free, mesh=mesh)
        with pytest.raises(ConfigError, match="100 new tokens do not fit: the KV cache of 1 prompt"):
            generate.check_request(model, compute, prompts, 100, free=free, mesh=mesh)
    generate.check_request(model, compute, [[1]] * 9, 49, free=free, mesh=mesh)
    with pytest.raises(ConfigError, match="50 new tokens do not fit: the KV cache of 2 prompt"):
        generate.check_request(model, compute, [[1]] * 9, 50, free=free, mesh=mesh)


def test_generation_pads_its_rows_with_the_last_one():
    mesh = sharding.make_mesh(MeshConfig())
    rows = np.arange(9 * 2).reshape(9, 2)
    padded = sharding.pad_rows(rows, mesh)
    assert padded.shape == (16, 2)
    np.testing.assert_array_equal(padded[:9], rows)
    np.testing.assert_array_equal(padded[9:], np.tile([[16, 17]], (7, 1)))
    assert sharding.pad_rows(rows[:8], mesh).shape == (8, 2)
    assert sharding.pad_rows(rows, None).shape == (9, 2)


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "100000000"], "100000000 new tokens do not fit"),
    (["--top-k", "100000"], "top-k 100000 is larger than the vocabulary (model.vocab_size=4096)"),
    (["--prompt", ""], "--prompt number 2 of 2 is empty"),
    (["--temperature", "-1"], "invalid sampling"),
])
def test_generate_limits_are_one_line_before_the_checkpoint_is_read(tmp_path, capsys, monkeypatch, args, message):
    def restored(*_, **__):
        raise AssertionError("the checkpoint was read before the arguments were checked")

    monkeypatch.setattr(generate, "restore", restored)
    folder = _run_folder(tmp_path)
    before = hashes(tmp_path)
    assert generate.main(["--workdir", str(folder), "--prompt", "And God said", *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert hashes(tmp_path) == before


def test_a_tokenizer_past_the_models_vocabulary_is_refused(tmp_path, capsys):
    """A model of 300 tokens with the embedded 4,096-token tokenizer: generate names the prompt's
    id; loading the run names the tokenizer, before any checkpoint is read."""
    folder = _run_folder(tmp_path, apply_overrides(CFG, ["model.vocab_size=300"]))
    assert generate.main(["--workdir", str(folder), "--prompt", "Jerusalem", "--max-new-tokens", "2"]) == 2
    assert "outside the model's vocabulary (model.vocab_size=300)" in one_error_line(capsys.readouterr().err)
    with pytest.raises(ConfigError, match="has 4096 tokens but .* has model.vocab_size=300"):
        restore.restore(folder)
