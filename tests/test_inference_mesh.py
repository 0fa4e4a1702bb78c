"""Inference on a mesh: a run restored for inference reads its parameters only, in the dtype asked
for, sharded over 8 simulated devices; evaluation, scoring, routing and greedy generation there
equal one device's."""

import gc
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS
from hf_models import make_run, random_params, tiny_config

from rexmoe_jax import loop, trainer
from rexmoe_jax.config import Config, ConfigError, apply_overrides
from rexmoe_jax.inference import evaluate, restore
from rexmoe_jax.inference.api import load
from rexmoe_jax.runtime import distributed

CFG = apply_overrides(Config(), ["model.vocab_size=4096", "model.d_model=32", "model.num_layers=4",
                                 "model.num_heads=2", "model.num_kv_heads=2", "model.expert_ffn=16",
                                 "model.num_experts=4", "model.top_k=2", "model.reuse=2", "data.seq_len=16",
                                 "data.batch_size=8", "train.steps=4", "train.eval_every=4", "train.eval_batches=2",
                                 "train.sample_tokens=0", "mesh.num_devices=1", "train.checkpoint_every=4"])
MESH = ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2"]  # 8 devices; experts and widths split
PROMPTS = ["And God said", "In the", "Let there be light"]  # 3 prompts: repeated to divide over 2 x 2
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("inference") / "run"
    loop.run(CFG, workdir)
    return workdir


@pytest.fixture(scope="module")
def one_and_eight(workdir):
    return load(workdir, ["mesh.num_devices=1"]), load(workdir, MESH)


@pytest.mark.e2e
def test_parameters_are_sharded_by_the_training_rules(one_and_eight):
    one, eight = one_and_eight
    assert dict(eight.mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    up = eight.params["groups"]["experts_up"]  # (groups, pool, D, F): pool over expert, F over tensor
    assert up.sharding.spec[1] == "expert" and up.sharding.spec[3] == "tensor"
    assert {tuple(s.data.shape) for s in up.addressable_shards} == {(2, 4, 32, 8)}
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.e2e
def test_greedy_generation_scores_and_routing_equal_one_device(one_and_eight):
    one, eight = one_and_eight
    assert eight.generate(PROMPTS, 6) == one.generate(PROMPTS, 6)
    pairs = [("In the beginning", " God created"), ("", "And the earth"), ("He said", " unto them")]
    np.testing.assert_allclose(eight.log_likelihoods(pairs), one.log_likelihoods(pairs), rtol=1e-5)
    text = ["And the evening and the morning were the first day. " * 3]
    np.testing.assert_allclose(eight.perplexity(text), one.perplexity(text), rtol=1e-5)
    np.testing.assert_allclose(eight.routing(text)["activation_ratio"], one.routing(text)["activation_ratio"],
                               atol=1e-6)


@pytest.mark.e2e
def test_scoring_and_generation_on_a_mesh_drop_nothing_where_training_could(tmp_path):
    """A run trained with compute.capacity_factor=0.5, which caps the rows each expert device
    receives in the "fixed" exchange (CPU's): scores and greedy text on the mesh still equal one
    device's, since scoring and a generation's prompt pass drop nothing."""
    config = apply_overrides(tiny_config(reuse=2), ["compute.capacity_factor=0.5", "mesh.num_devices=1"])
    make_run(tmp_path / "run", config, random_params(config))
    one, eight = load(tmp_path / "run", ["mesh.num_devices=1"]), load(tmp_path / "run", MESH)
    pairs = [("In the beginning", " God created the heaven and the earth"),
             ("And", " the earth was without form")]
    np.testing.assert_allclose(eight.log_likelihoods(pairs), one.log_likelihoods(pairs), rtol=1e-5)
    assert eight.generate(PROMPTS, 6) == one.generate(PROMPTS, 6)


@pytest.mark.e2e
def test_evaluation_on_the_mesh_equals_one_device(workdir, tmp_path):
    one = evaluate.evaluate_run(workdir, [], [], mesh=["mesh.num_devices=1"])
    eight = evaluate.evaluate_run(workdir, [], [], mesh=MESH)
    assert eight["tokens"] == one["tokens"] == 2 * 8 * 16
    assert eight["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    np.testing.assert_allclose(eight["routing"]["held-out"]["activation_ratio"],
                               one["routing"]["held-out"]["activation_ratio"], atol=1e-6)
    # and training's own last evaluation, on one device, says the same
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert eight["eval_loss"] == pytest.approx([r for r in logged if "eval_loss" in r][-1]["eval_loss"], rel=1e-5)


def _live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.e2e
def test_a_restore_for_inference_reads_the_parameters_only(workdir):
    """The arrays a restore creates add up to the parameters alone: no optimizer moment (each
    the parameters' size) is ever made."""
    params_bytes = 4 * sum(int(np.prod(s.shape)) for s in jax.tree.leaves(trainer.abstract_params(CFG)))
    before = _live_bytes()
    run = restore.restore(workdir, mesh=restore.inference_mesh(CFG, MESH))
    grown = _live_bytes() - before
    assert sum(x.nbytes for x in jax.tree.leaves(run.params)) == params_bytes
    assert params_bytes <= grown < params_bytes * 1.01 and run.step == 4
    half = restore.restore(workdir, mesh=restore.inference_mesh(CFG, MESH), dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(half.params)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_the_default_mesh_is_the_runs_own_or_every_device_on_data():
    # trained on one device (mesh.num_devices=1): served on all, the data axis taking them
    assert dict(restore.inference_mesh(CFG).shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    spread = apply_overrides(CFG, ["mesh.num_devices=0", "mesh.expert=2"])
    assert dict(restore.inference_mesh(spread).shape) == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
    too_wide = apply_overrides(CFG, ["mesh.num_devices=0", "mesh.data=16"])  # 16 devices: not here
    assert dict(restore.inference_mesh(too_wide).shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("overrides,message", [
    (["model.d_model=64"], "'model.d_model=64': only mesh.*= settings choose where a trained model runs"),
    (["mesh.tensor=4"], "model.expert_ffn=16, model.num_kv_heads=2 and model.vocab_size=4096 must "
                        "divide over mesh.tensor=4"),
])
def test_a_mesh_that_cannot_hold_the_model_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        restore.inference_mesh(CFG, overrides)
    assert str(err.value) == message


@pytest.mark.e2e
def test_two_processes_generate_and_evaluate_as_one_device(workdir, one_and_eight, tmp_path):
    """python -m rexmoe_jax.launch -n 2 -- generate / evaluate --distributed, 4 devices per
    process, the mesh over both: process 0 prints one device's greedy text and writes its loss."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4")
    launch = [sys.executable, "-m", "rexmoe_jax.launch", "-n", "2", "--", sys.executable, "-m"]
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    generated = subprocess.run([*launch, "rexmoe_jax.generate", "--workdir", str(workdir), *prompts,
                                "--temperature", "0", "--max-new-tokens", "6", "--distributed", *MESH],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert generated.returncode == 0, generated.stdout[-2000:] + generated.stderr[-2000:]
    printed = "\n".join(line[len("[0] "):] for line in generated.stdout.splitlines() if line.startswith("[0] "))
    others = [line for line in generated.stdout.splitlines() if line.startswith("[1] ")]
    assert not any(prompt in line for line in others for prompt in PROMPTS)  # process 0 prints
    for prompt, text in zip(PROMPTS, one_and_eight[0].generate(PROMPTS, 6)):
        assert f"{prompt}{text}" in printed
    output = tmp_path / "eval.json"
    evaluated = subprocess.run([*launch, "rexmoe_jax.evaluate", "--workdir", str(workdir), "--output", str(output),
                                "--distributed", *MESH], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    alone = evaluate.evaluate_run(workdir, [], [], mesh=["mesh.num_devices=1"])
    assert json.loads(output.read_text())["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
