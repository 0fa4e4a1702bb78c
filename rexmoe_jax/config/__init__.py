"""Typed, frozen configuration, in three jobs:

    sections.py    the dataclasses, one per concern, composed into `Config`; each validates
                   itself (types first, then values) when it is built
    presets.py     `load_preset`: a preset file's `get_config()`, loaded by path, and
                   `load_slices`: its settings per TPU slice
    overrides.py   `apply_overrides` and `parse_overrides` (`section.field=value`) and `from_dict`
                   (a run's config.json)

A run's config is a preset plus overrides. This package imports no jax (train.py reads the
config before jax is loaded).
"""

from rexmoe_jax.config.overrides import apply_overrides, from_dict, parse_overrides, read_json_config
from rexmoe_jax.config.presets import load_preset, load_slices
from rexmoe_jax.config.sections import (
    TRACKERS,
    ComputeConfig,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    PSRConfig,
    TrainConfig,
)

__all__ = ["TRACKERS", "ComputeConfig", "Config", "ConfigError", "DataConfig", "LossConfig", "MeshConfig",
           "ModelConfig", "OptimConfig", "PSRConfig", "TrainConfig", "apply_overrides", "from_dict", "load_preset",
           "load_slices", "parse_overrides", "read_json_config"]
