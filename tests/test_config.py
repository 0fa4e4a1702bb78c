"""Config validation, overrides, presets and the exact round trip through config.json."""

import dataclasses
import json
import pathlib

import pytest

from rexmoe_jax.config import (
    ComputeConfig,
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    PSRConfig,
    apply_overrides,
    from_dict,
    load_preset,
    load_slices,
)


@pytest.mark.parametrize("overrides,field", [
    (["model.top_k=9"], "model.top_k"),
    (["model.reuse=0"], "model.reuse"),
    (["model.reuse=5"], "model.reuse"),
    (["model.num_kv_heads=3"], "model.num_heads"),
    (["psr.start_step=50", "psr.end_step=50"], "psr.start_step"),
    (["psr.schedule=linear", "psr.initial_experts=1"], "model.top_k"),
    (["model.bogus=1"], "model.bogus"),
    (["bogus.x=1"], "bogus.x"),
    (["model.reuse=two"], "model.reuse"),
    (["compute.dtype=float16"], "compute.dtype"),
    (["model.renormalize_gates=maybe"], "model.renormalize_gates"),
    (["train.steps"], "train.steps"),
    (["optim.learning_rate=nan"], "optim.learning_rate"),
    (["optim.schedule=step"], "optim.schedule"),
    (["data.eval_sets=code"], "data.eval_sets: 'code' is not NAME=PATH"),
    (["data.eval_sets=a b=x.txt"], "data.eval_sets: 'a b=x.txt' is not NAME=PATH"),
    (["data.eval_sets=code=a.txt,code=b.txt"], "data.eval_sets names 'code' twice"),
    (["train.checkpoint_every=10", "train.keep_every=25"], "train.keep_every=25 keeps checkpoints at its"),
    (["train.keep_every=100"], "saved only at the end: give a multiple of train.checkpoint_every"),
    (["optim.schedule=wsd", "optim.decay_fraction=0"], "optim.decay_fraction"),
    (["train.sample_prompt="], "train.sample_prompt"),  # an empty prompt cannot be continued
    # capacity on an expert axis is the fixed exchange's cap; the ragged one would ignore it
    (["compute.dispatch=capacity", "compute.expert_exchange=ragged"], "compute.expert_exchange=fixed"),
    # the flash kernel masks by index, not by document
    (["data.document_masking=true", "compute.attention=flash"], "data.document_masking needs attention"),
])
def test_invalid_overrides_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(Config(), overrides)


def test_overrides_parse_types():
    cfg = apply_overrides(Config(), ["model.reuse=4", "model.num_layers=8", "psr.schedule=stepwise",
                                     "optim.learning_rate=1e-3", "model.renormalize_gates=true",
                                     "train.sample_prompt=In the beginning"])
    assert cfg.model.reuse == 4 and cfg.psr.schedule == "stepwise"
    assert cfg.optim.learning_rate == 1e-3 and cfg.model.renormalize_gates is True
    assert cfg.train.sample_prompt == "In the beginning"
    assert cfg.model.pool_size == 4 * cfg.model.num_experts and cfg.model.num_groups == 2


def test_configs_are_frozen_and_round_trip():
    cfg = apply_overrides(Config(), ["model.reuse=2", "psr.schedule=linear", "psr.end_step=5"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.reuse = 3
    assert from_dict(json.loads(cfg.to_json())) == cfg


def test_derived_values_are_properties():
    cfg = ModelConfig(num_layers=32, reuse=3, num_experts=64, top_k=6)
    assert (cfg.pool_size, cfg.num_groups, cfg.group_sizes[-1]) == (192, 11, 2)
    assert "pool_size" not in {f.name for f in dataclasses.fields(cfg)}


def test_psr_config_rejects_bad_ramp():
    with pytest.raises(ConfigError, match="psr.start_step"):
        PSRConfig(start_step=10, end_step=5)


def test_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_preset(bad)


@pytest.mark.parametrize("source,message", [
    ("def get_config(:\n", r"line 1: invalid syntax"),
    ("def get_config():\n    raise ValueError('boom')\n", r"failed: ValueError: boom"),
    ("import not_a_module_anywhere\n", r"failed: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("def get_config():\n    return {'model': {}}\n", r"returned dict, not Config"),
    ("from rexmoe_jax.config import Config, ModelConfig\n"
     "def get_config():\n    return Config(model=ModelConfig(d_model='big'))\n", r"failed: model.d_model='big': expected int, got str"),
    ("from rexmoe_jax.config import Config, TrainConfig\n"
     "def get_config():\n    return Config(train=TrainConfig(sample_prompt=3))\n",
     r"train.sample_prompt=3: expected str, got int"),
])
def test_a_broken_preset_is_one_line_naming_the_file(tmp_path, source, message):
    path = tmp_path / "preset.py"
    path.write_text(source)
    with pytest.raises(ConfigError, match=message) as err:
        load_preset(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ConfigError, match="optim.grad_accum=3"):
        apply_overrides(Config(), ["data.batch_size=16", "optim.grad_accum=3"])


PRESETS = sorted((pathlib.Path(__file__).resolve().parent.parent / "configs").glob("*.py"))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.stem not in ("__init__", "recipe")],
                         ids=lambda p: p.stem)
def test_every_preset_round_trips_exactly(preset):
    cfg = load_preset(preset)
    assert from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("prompt", ["In the beginning ", "  leading", "a=b=c", "line\nbreak", "tab\t",
                                    "quote \" and ' and \\", "ünïcödé — 語", "", "1e3", "true", " "])
def test_awkward_strings_survive_overrides_and_json(prompt):
    cfg = apply_overrides(Config(), [f"train.sample_prompt={prompt}", "data.corpus= a b ", "train.sample_tokens=0"])
    assert cfg.train.sample_prompt == prompt and cfg.data.corpus == " a b "
    assert from_dict(json.loads(cfg.to_json())) == cfg


def test_from_dict_checks_types_and_reads_the_old_layout():
    with pytest.raises(ConfigError, match=r"model\.reuse"):
        from_dict({"model": {"reuse": "2"}})
    with pytest.raises(ConfigError, match=r"model\.renormalize_gates"):
        from_dict({"model": {"renormalize_gates": 1}})
    with pytest.raises(ConfigError, match=r"model\.bogus"):
        from_dict({"model": {"bogus": 1}})
    # A config.json written before the compute section kept these fields under "model".
    old = from_dict({"model": {"reuse": 1, "dtype": "bfloat16", "dispatch": "capacity"}})
    assert (old.compute.dtype, old.compute.dispatch) == ("bfloat16", "capacity")
    assert from_dict({"optim": {"learning_rate": 1}}).optim.learning_rate == 1.0


def test_state_layout_is_the_architecture_and_clipping():
    """What a checkpoint depends on follows from the sections: every model field, whether
    clipping is on, and nothing else."""
    base = Config()
    assert ComputeConfig(dtype="bfloat16", dispatch="dense").state_layout() == base.compute.state_layout()
    assert dataclasses.replace(base.model, init_std=0.01).state_layout() != base.model.state_layout()
    assert OptimConfig(clip_norm=0.5).state_layout() == base.optim.state_layout()
    assert OptimConfig(clip_norm=0).state_layout() != base.optim.state_layout()
    for section in ("psr", "loss", "data", "mesh", "train"):
        assert getattr(base, section).state_layout() == ()


def test_a_presets_slices_are_read_and_checked(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("from rexmoe_jax.config import Config\nSLICES = {'v5p-8': ['mesh.expert=4']}\n"
                      "def get_config():\n    return Config()\n")
    assert load_slices(preset) == {"v5p-8": ("mesh.expert=4",)}
    preset.write_text("SLICES = {'v5p-8': 'mesh.expert=4'}\n")  # a string, not a list of them
    with pytest.raises(ConfigError, match="must map slice names to lists"):
        load_slices(preset)
    preset.write_text("def get_config():\n    return None\n")
    assert load_slices(preset) == {}
