"""Hugging Face in and out against transformers itself (PyTorch on CPU), and the imported and
widened runs trained by train.py: the end-to-end tier (-m e2e). transformers is the oracle for
import, this project's forward for export. No model is downloaded: each test makes its own."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS
from hf_models import kjv_lines, logits, make_run, random_params, sentencepiece_model, tiny_config, tokens
from optional import importorskip

from rexmoe_jax import loop
from rexmoe_jax.data import EMBEDDED_TOKENIZER
from rexmoe_jax.hf import __main__ as cli
from rexmoe_jax.hf.run_io import write_run
from rexmoe_jax.inference.generate import generate
from rexmoe_jax.inference.restore import restore

_WHY = ("needs PyTorch's CPU build (pip install torch --index-url https://download.pytorch.org/whl/cpu) "
        "and transformers (pip install -e '.[hf]')")
torch = importorskip("torch", reason=_WHY)
transformers = importorskip("transformers", reason=_WHY)
pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # float32 logits, the bound

CASES = {
    "r1": dict(reuse=1),
    "r2-se": dict(reuse=2, num_shared_experts=1),
    "r2-renorm": dict(reuse=2, renormalize_gates=True),
    "r4-se-renorm-tied": dict(reuse=4, num_shared_experts=2, renormalize_gates=True, tie_embeddings=True),
    # Away from the defaults, so that a field written or read under the wrong name shows.
    "r2-rope500-eps0.05-mha": dict(reuse=2, rope_base=500.0, norm_eps=0.05, num_kv_heads=4),
}


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_transformers_computes_the_exported_model(tmp_path, case):
    config = tiny_config(**CASES[case])
    params = random_params(config)
    make_run(tmp_path / "run", config, params)
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    ids = tokens(config, (2, 24))
    diff = np.abs(_hf_logits(model, ids) - logits(config, params, ids)).max()
    print(f"{case}: max |logit difference| {diff:.2e}")
    assert diff < TOLERANCE
    eod = json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"]
    prompt = ids[0, :6].tolist()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, 6:].tolist()
    ours = generate(config.model, params, [prompt], 20, jax.random.key(0), eod_id=eod)[0]
    assert theirs[: len(ours)] == ours and (len(ours) == 20 or theirs[len(ours)] == eod)


@pytest.mark.parametrize("sentencepiece", [None, "unigram", "bpe"])
def test_transformers_tokenizer_encodes_as_the_run_does(tmp_path, sentencepiece):
    """The embedded tokenizer.json, and SentencePiece models (which transformers would read as
    LLaMA-style BPE from a bare tokenizer.model: 24 ids for a Unigram model's 10)."""
    config = tiny_config()
    if sentencepiece is None:
        make_run(tmp_path / "run", config, random_params(config))
    else:
        config = tiny_config(vocab_size=600)
        model = sentencepiece_model(tmp_path / "sp", sentencepiece)
        write_run(tmp_path / "run", config, random_params(config), model)
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = restore(tmp_path / "run").tokenizer
    for text in ["And God said, Let there be light: and there was light.", " leading  and double spaces ",
                 "Numbers 12:3, Café, 日本"] + kjv_lines(7000, 20):
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text)), text
    assert theirs.eos_token_id == ours.eod_id


def _qwen2_moe(folder: pathlib.Path, *, shared_gate_zero: bool = True, **fields):
    """A random transformers Qwen2-MoE saved with save_pretrained, with the embedded tokenizer."""
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=4096,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=16,
        intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        **fields,
    )
    model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.normal_(1.0, 0.1)
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.zero_()
            if shared_gate_zero:
                layer.mlp.shared_expert_gate.weight.zero_()
    model.save_pretrained(folder)
    shutil.copyfile(EMBEDDED_TOKENIZER, folder / "tokenizer.json")
    return model


def test_import_of_a_transformers_qwen2_moe_matches_and_trains(tmp_path, capsys):
    _qwen2_moe(tmp_path / "gated", shared_gate_zero=False, shared_expert_intermediate_size=32)
    assert cli.main(["import", "--model", str(tmp_path / "gated"), "--workdir", str(tmp_path / "no")]) == 2
    assert (
        "shared_expert_gate.weight' is not zero" in capsys.readouterr().err and not (tmp_path / "no").exists()
    )

    model = _qwen2_moe(tmp_path / "hf", shared_expert_intermediate_size=32, norm_topk_prob=True)
    overrides = [
        "train.steps=12",
        "optim.learning_rate=0.01",
        "optim.warmup_steps=1",
        "data.seq_len=32",
        "data.batch_size=8",
        "train.log_every=1",
        "train.eval_every=12",
        "train.eval_batches=1",
        "train.sample_tokens=0",
    ]
    assert (
        cli.main(["import", "--model", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run"), *overrides])
        == 0
    )
    run = restore(tmp_path / "run")
    assert (run.config.model.num_shared_experts, run.config.model.renormalize_gates) == (2, True)
    ids = tokens(run.config, (2, 24))
    diff = np.abs(_hf_logits(model, ids) - logits(run.config, run.params, ids)).max()
    print(f"import qwen2_moe: max |logit difference| {diff:.2e}")
    assert diff < TOLERANCE
    loop.run(run.config, tmp_path / "run")
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_import_of_a_transformers_mixtral_matches(tmp_path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=4096,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(tmp_path / "hf")
    shutil.copyfile(EMBEDDED_TOKENIZER, tmp_path / "hf" / "tokenizer.json")
    assert cli.main(["import", "--model", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")]) == 0
    run = restore(tmp_path / "run")
    assert run.config.model.renormalize_gates
    ids = tokens(run.config, (2, 24))
    diff = np.abs(_hf_logits(model, ids) - logits(run.config, run.params, ids)).max()
    print(f"import mixtral: max |logit difference| {diff:.2e}")
    assert diff < TOLERANCE


def test_train_py_continues_a_widened_run(tmp_path):
    config = tiny_config(renormalize_gates=True)
    make_run(tmp_path / "r1", config, random_params(config))
    assert (
        cli.main(
            [
                "widen",
                "--workdir",
                str(tmp_path / "r1"),
                "--reuse",
                "2",
                "--output",
                str(tmp_path / "r2"),
                "psr.start_step=1",
                "psr.end_step=3",
            ]
        )
        == 0
    )
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            str(tmp_path / "r2" / "preset.py"),
            "--workdir",
            str(tmp_path / "r2"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS},
    )  # one device
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from step 0" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    pools = [r["psr_pool_size"] for r in records if "psr_pool_size" in r]
    assert pools == [4, 4, 6, 8]  # N_t: N up to t_s = 1, then linear to r*N at t_e = 3
    assert restore(tmp_path / "r2").step == 4
