"""Hugging Face in and out without torch: the safetensors files, the layouts, export -> import
bitwise, the exported weights run through an independent NumPy Qwen2-MoE, widen, and the
command's one-line errors. The checks against transformers itself are test_hf_transformers.py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from hf_models import kjv_lines, logits, make_run, random_params, sentencepiece_model, tiny_config, tokens

from rexmoe_jax import loop, trainer
from rexmoe_jax.config import ConfigError
from rexmoe_jax.hf import __main__ as cli
from rexmoe_jax.hf import export, in_memory
from rexmoe_jax.hf.importer import imported_layers, read_hf_config
from rexmoe_jax.hf.regroup import flatten, group, ungroup
from rexmoe_jax.hf.run_io import write_run
from rexmoe_jax.hf.tensorfile import TensorFiles, TensorWriter
from rexmoe_jax.hf.widen import widened_config, widened_layers
from rexmoe_jax.inference.restore import read_config, restore


def _same(a: dict, b: dict) -> bool:
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def test_tensor_files_round_trip_in_shards(tmp_path):
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 4), np.float32),
        "c": np.full((7, 3), 2.5, np.float16),
    }
    writer = TensorWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in arrays.items()], max_shard_bytes=60)
    for name in ("c", "a", "empty", "b"):  # any order
        writer.put(name, arrays[name])
    writer.close()
    assert writer.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": writer.files[0],
        "b": writer.files[0],
        "empty": writer.files[0],
        "c": writer.files[1],
    }
    files = TensorFiles(tmp_path)
    for name, array in arrays.items():
        got = np.asarray(files.get(name))
        assert got.dtype == array.dtype and np.array_equal(got, array)
    # The byte layout by hand: 8-byte length, JSON header, then data at the declared offsets.
    raw = (tmp_path / writer.files[1]).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    assert header["c"] == {"dtype": "F16", "shape": [7, 3], "data_offsets": [0, 42]}
    assert np.array_equal(np.frombuffer(raw[8 + length :], np.float16), np.full(21, 2.5, np.float16))


def test_truncated_file_is_named(tmp_path):
    writer = TensorWriter(tmp_path, [("w", (4, 4), np.float32)], max_shard_bytes=1 << 20)
    writer.put("w", np.ones((4, 4), np.float32))
    writer.close()
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ConfigError, match="truncated: tensor 'w' ends at byte"):
        TensorFiles(tmp_path)


@pytest.mark.parametrize("reuse,layers", [(2, 4), (3, 4), (1, 3)])
def test_ungroup_then_group_is_identity(reuse, layers):
    config = tiny_config(reuse=reuse, num_layers=layers, num_shared_experts=1, router_bias=True)
    params = random_params(config)
    per_layer = ungroup(params, config.model)
    assert len(per_layer.routers) == layers and per_layer.experts["experts_gate"].shape[:2] == (layers, 4)
    assert _same(group(per_layer, config.model), params)


@pytest.mark.parametrize(
    "fields",
    [
        dict(reuse=1),
        dict(reuse=2, num_shared_experts=1, renormalize_gates=True),
        dict(reuse=4, tie_embeddings=True),
    ],
    ids=["r1", "r2-se-renorm", "r4-tied"],
)
def test_export_then_import_is_bitwise(tmp_path, fields):
    config = tiny_config(**fields)
    params = random_params(config)
    summary = export(config, in_memory(params), tmp_path / "hf", max_shard_bytes=400_000)  # several files
    assert len(summary["files"]) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = read_hf_config(tmp_path / "hf")
    assert (hf["num_experts"], hf["norm_topk_prob"], hf["rexmoe_reuse"]) == (
        4 * config.model.reuse,
        config.model.renormalize_gates,
        config.model.reuse,
    )
    files = TensorFiles(tmp_path / "hf")
    # Every layer of a group holds the group's whole pool.
    pool = [
        files.get(f"model.layers.{layer}.mlp.experts.{4 * config.model.reuse - 1}.up_proj.weight")
        for layer in range(4)
    ]
    assert all(
        np.array_equal(pool[layer], pool[layer // config.model.reuse * config.model.reuse])
        for layer in range(4)
    )
    assert _same(group(imported_layers(files, hf, config.model), config.model), params)


def _numpy_qwen2_moe(files: TensorFiles, hf: dict, tokens_S: np.ndarray) -> np.ndarray:
    """Qwen2-MoE's forward in float64 NumPy from the exported tensors, written from
    transformers' description of the model (q/k/v biases, the sigmoid-gated shared expert)."""
    cache = {}

    def w(name):
        if name not in cache:
            cache[name] = np.asarray(files.get(name), np.float64)
        return cache[name]

    d, heads, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    z, s = d // heads, len(tokens_S)
    norm = lambda x, scale: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + hf["rms_norm_eps"]) * scale
    silu = lambda x: x / (1 + np.exp(-x))
    inv = 1.0 / hf["rope_parameters"]["rope_theta"] ** (np.arange(0, z, 2) / z)
    angles = np.concatenate([np.arange(s)[:, None] * inv] * 2, -1)[:, None, :]

    def rope(x):  # (S, heads, Z)
        return x * np.cos(angles) + np.concatenate([-x[..., z // 2 :], x[..., : z // 2]], -1) * np.sin(angles)

    x = w("model.embed_tokens.weight")[tokens_S]
    for layer in range(hf["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = norm(x, w(p + "input_layernorm.weight"))
        q, k, v = (
            h @ w(p + f"self_attn.{n}_proj.weight").T + w(p + f"self_attn.{n}_proj.bias") for n in "qkv"
        )
        q, k, v = rope(q.reshape(s, heads, z)), rope(k.reshape(s, kv, z)), v.reshape(s, kv, z)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("shz,thz->hst", q, k) / np.sqrt(z) + np.triu(np.full((s, s), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        attn = np.einsum("hst,thz->shz", probs / probs.sum(-1, keepdims=True), v).reshape(s, d)
        x = x + attn @ w(p + "self_attn.o_proj.weight").T
        h = norm(x, w(p + "post_attention_layernorm.weight"))
        logits_router = h @ w(p + "mlp.gate.weight").T
        probs = np.exp(logits_router - logits_router.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.zeros_like(h)
        for t in range(s):
            chosen = np.argsort(-probs[t])[: hf["num_experts_per_tok"]]
            gates = probs[t, chosen] / (probs[t, chosen].sum() if hf["norm_topk_prob"] else 1.0)
            for e, gate in zip(chosen, gates):
                e_ = p + f"mlp.experts.{e}."
                out[t] += (
                    gate
                    * (silu(w(e_ + "gate_proj.weight") @ h[t]) * (w(e_ + "up_proj.weight") @ h[t]))
                    @ w(e_ + "down_proj.weight").T
                )
        if hf["shared_expert_intermediate_size"]:
            e_ = p + "mlp.shared_expert."
            shared = (silu(h @ w(e_ + "gate_proj.weight").T) * (h @ w(e_ + "up_proj.weight").T)) @ w(
                e_ + "down_proj.weight"
            ).T
            out += 1 / (1 + np.exp(-(h @ w(p + "mlp.shared_expert_gate.weight").T))) * shared
        x = x + out
    x = norm(x, w("model.norm.weight"))
    head = "model.embed_tokens.weight" if hf["tie_word_embeddings"] else "lm_head.weight"
    return x @ w(head).T


@pytest.mark.parametrize(
    "fields",
    [dict(reuse=2, num_shared_experts=1), dict(reuse=2, renormalize_gates=True)],
    ids=["r2-se", "r2-renorm"],
)
def test_exported_weights_compute_the_model(tmp_path, fields):
    config = tiny_config(**fields)
    params = random_params(config)
    export(config, in_memory(params), tmp_path / "hf")
    ids_1xS = tokens(config, (1, 10))
    expected = _numpy_qwen2_moe(TensorFiles(tmp_path / "hf"), read_hf_config(tmp_path / "hf"), ids_1xS[0])
    np.testing.assert_allclose(logits(config, params, ids_1xS)[0], expected, atol=1e-4)


@pytest.mark.e2e
def test_widen_keeps_the_logits_under_local_first_psr():
    """At N_t = N with local_first the widened layers choose their own experts; with
    renormalised gates the pool's softmax denominator cancels, so the logits stay the source's
    up to float rounding. With the paper's gating every gate shrinks: the function changes."""
    diffs = {}
    for renormalize in (True, False):
        source = tiny_config(renormalize_gates=renormalize)
        params = random_params(source)
        wide = widened_config(
            dataclasses.replace(source, train=dataclasses.replace(source.train, steps=100)), 2
        )
        assert (wide.psr.order, wide.psr.schedule, wide.psr.start_step) == ("local_first", "linear", 21)
        wide_params = group(widened_layers(ungroup(params, source.model), wide), wide.model)
        router = wide_params["groups"]["layers"]["moe"]["router"]  # (G, R, D, 2N)
        assert np.array_equal(router[0, 1, :, 4:], params["groups"]["layers"]["moe"]["router"][1, 0])
        ids = tokens(source)
        masked = logits(wide, wide_params, ids, psr=trainer.psr_inputs(wide, jax.numpy.int32(0)))
        diffs[renormalize] = np.abs(masked - logits(source, params, ids)).max()
    assert diffs[True] < 1e-5
    assert diffs[False] > 1e-3


@pytest.fixture(scope="module")
def run_r1(tmp_path_factory):
    config = tiny_config()
    folder = tmp_path_factory.mktemp("runs") / "r1"
    make_run(folder, config, random_params(config))
    return folder


def test_command_export_then_import_gives_the_run_back(tmp_path, run_r1, capsys):
    assert cli.main(["export", "--workdir", str(run_r1), "--output", str(tmp_path / "hf")]) == 0
    assert "exported step 0" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    assert cli.main(["import", "--model", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")]) == 0
    assert _same(jax.device_get(restore(tmp_path / "run").params), jax.device_get(restore(run_r1).params))


def test_import_keeps_the_exported_context_and_router_bias(tmp_path, capsys):
    """data.seq_len travels as max_position_embeddings and model.router_bias (zero) as
    rexmoe_router_bias: the imported run evaluates on the same windows and trains on as the run
    would; another model's max_position_embeddings (no rexmoe_reuse) leaves the default."""
    config = tiny_config(router_bias=True)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, seq_len=48))
    make_run(tmp_path / "run", config, random_params(config))
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    assert cli.main(["import", "--model", str(tmp_path / "hf"), "--workdir", str(tmp_path / "back")]) == 0
    back = read_config(tmp_path / "back")
    assert back.data.seq_len == 48 and back.model.router_bias is True
    back_params, run_params = restore(tmp_path / "back").params, restore(tmp_path / "run").params
    assert _same(jax.device_get(back_params), jax.device_get(run_params))
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    del hf["rexmoe_reuse"]  # as another project's model: its max_position_embeddings is a context length
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    assert cli.main(["import", "--model", str(tmp_path / "hf"), "--workdir", str(tmp_path / "again")]) == 0
    assert read_config(tmp_path / "again").data.seq_len == 128  # DataConfig's default, by hand
    capsys.readouterr()


@pytest.mark.parametrize("model_type,options", [
    # SentencePiece's default normalisation (nmt_nfkc), extra spaces removed
    pytest.param("unigram", {}, id="unigram"),
    pytest.param("unigram", dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                                 byte_fallback=True), id="unigram-identity-bytes", marks=pytest.mark.e2e),
    pytest.param("bpe", {}, id="bpe", marks=pytest.mark.e2e),
    # as the LLaMA-2 tokenizer is trained
    pytest.param("bpe", dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                             byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True),
                 id="bpe-llama-like"),
])
def test_a_sentencepiece_run_exports_a_tokenizer_json_that_encodes_as_sentencepiece(tmp_path, model_type,
                                                                                      options):
    import sentencepiece
    import tokenizers

    path = sentencepiece_model(tmp_path / "sp", model_type, **options)
    config = tiny_config(vocab_size=600)
    write_run(tmp_path / "run", config, random_params(config), path)
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    exported = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    # Text the export's own probe does not hold: later KJV lines, and a few harder ones.
    texts = kjv_lines(5000, 100) + ["  Two  spaces and ends ", "x\ty\n\nz", "Ünïcödé ＦＵＬＬ ﬁ 42.5%", "語 🙂",
                                    ""]
    for text in texts:
        ids = sp.encode(text)
        assert exported.encode(text, add_special_tokens=False).ids == ids, text
        assert exported.decode(ids) == sp.decode(ids), text
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast" and settings["eos_token"] == "</s>"


@pytest.mark.parametrize("model_type,options,message", [
    ("char", dict(vocab_size=70), "a SentencePiece CHAR model has no tokenizer.json equivalent here"),
    # A tokenizer.json normalises the text around an added token, SentencePiece around none.
    ("unigram", dict(user_defined_symbols=["<sep>"]), "written as tokenizer.json it encodes '<sep>'"),
], ids=["char", "user-defined-piece"])
def test_a_sentencepiece_model_without_a_tokenizer_json_form_is_refused(tmp_path, capsys, model_type, options,
                                                                        message):
    path = sentencepiece_model(tmp_path / "sp", model_type, **options)
    config = tiny_config(vocab_size=600)
    write_run(tmp_path / "run", config, random_params(config), path)
    _fails(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")], capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sp"]  # no --output, no partial folder


def _fails(argv, capsys, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, run_r1, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    _fails(
        ["import", "--model", str(tmp_path / "empty"), "--workdir", str(out)], capsys, "has no config.json"
    )
    assert cli.main(["export", "--workdir", str(run_r1), "--output", str(tmp_path / "hf")]) == 0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, message in (
        (dict(model_type="llama"), "model_type 'llama' is not supported"),
        (dict(moe_intermediate_size=8), "has shape [16, 32], but config.json implies [8, 32]"),
        (dict(rope_parameters={"rope_type": "yarn"}), "rope scaling 'yarn' is not supported"),
    ):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, **change}))
        _fails(["import", "--model", str(tmp_path / "hf"), "--workdir", str(out)], capsys, message)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _fails(["import", "--model", str(tmp_path / "hf"), "--workdir", str(out)], capsys, "is truncated")
    assert not out.exists()
    # An existing, non-empty --output is never written into.
    (out / "keep").mkdir(parents=True)
    _fails(["export", "--workdir", str(run_r1), "--output", str(out)], capsys, "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep"]
    _fails(
        ["widen", "--workdir", str(run_r1), "--reuse", "1", "--output", str(tmp_path / "w")],
        capsys,
        "widening needs r >= 2",
    )
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(reuse=3), "model.num_layers=4 is not divisible by model.reuse=3"),
        (dict(router_bias=True), "model.router_bias holds nonzero values"),
    ],
)
def test_what_qwen2_moe_cannot_express_is_refused(tmp_path, fields, message):
    config = tiny_config(**fields)
    params = random_params(config)
    if config.model.router_bias:
        bias = params["groups"]["layers"]["moe"]["router_bias"] = np.array(
            params["groups"]["layers"]["moe"]["router_bias"]
        )
        bias[0, 0, 1] = 0.5
    with pytest.raises(ConfigError, match=message):
        export(config, in_memory(params), tmp_path / "hf")
    assert not any(tmp_path.iterdir())


def test_import_refuses_integer_weights(tmp_path, run_r1, capsys):
    """model.norm.weight's dtype in the header turned F32 -> I32 (same length, same offsets): its
    bytes would be read as integers about 1e9 and cast to float; import names the tensor."""
    assert cli.main(["export", "--workdir", str(run_r1), "--output", str(tmp_path / "hf")]) == 0
    weights = tmp_path / "hf" / "model.safetensors"
    raw = weights.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["model.norm.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    weights.write_bytes(raw[:8] + text + raw[8 + size:])
    _fails(["import", "--model", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")], capsys,
           "tensor 'model.norm.weight' holds I32, not floating point weights")
    assert not (tmp_path / "run").exists()


def test_command_line_mistakes_and_failed_writes_are_one_line(tmp_path, run_r1, capsys):
    """The hf command keeps the contract of the others: argparse's mistakes and a bad
    --max-shard-gb exit 2, a write that fails exits 4, each with one line, nothing left behind."""
    _fails(["export", "--workdir", str(run_r1)], capsys, "the following arguments are required: --output")
    _fails(["exprt", "--workdir", str(run_r1)], capsys, "invalid choice: 'exprt'")
    _fails(["widen", "--workdir", str(run_r1), "--reuse", "two", "--output", str(tmp_path / "w")], capsys,
           "argument --reuse: invalid int value: 'two'")
    for size in ("0", "-1", "inf", "nan"):
        _fails(["export", "--workdir", str(run_r1), "--output", str(tmp_path / "hf"), "--max-shard-gb", size],
               capsys, f"--max-shard-gb must be a positive number of GB, got {float(size)}")
    (tmp_path / "file").write_text("not a folder")
    assert cli.main(["export", "--workdir", str(run_r1), "--output", str(tmp_path / "file" / "sub")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: not a directory") and "while writing" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.e2e
def test_export_skips_a_damaged_newest_checkpoint_as_evaluate_does(tmp_path, capsys):
    """Every array data file of checkpoint 4 cut to 10 bytes (its index and metadata intact):
    export says so in a note and exports checkpoint 2, the newest that restores."""
    config = tiny_config()
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_every=2),
                                 mesh=dataclasses.replace(config.mesh, num_devices=1))
    loop.run(config, tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "4" / "state"
    data_files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for data in data_files:
        data.write_bytes(data.read_bytes()[:10])
    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert "exported step 2 of" in captured.out
    assert "checkpoint 4" in captured.err and "newest readable" in captured.err


@pytest.mark.e2e
def test_an_imported_run_trains_on_without_a_note_about_its_data(tmp_path, run_r1, capsys):
    """A step-0 checkpoint written by import (or widen) records no training data: training on
    says it resumed, and nothing about the data differing from a run that never trained."""
    shutil.copytree(run_r1, tmp_path / "run")
    config = read_config(tmp_path / "run")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=2),
                                 mesh=dataclasses.replace(config.mesh, num_devices=1))
    capsys.readouterr()
    assert loop.run(config, tmp_path / "run")["step"] == 2
    out = capsys.readouterr().out
    assert "resumed from step 0" in out and "training data differ" not in out
