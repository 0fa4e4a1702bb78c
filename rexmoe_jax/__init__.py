"""ReXMoE in JAX/Flax: cross-layer expert reuse with progressive scaling routing.

Names are imported on first use, so that `import rexmoe_jax.config` (and train.py's start-up)
does not pay for importing jax.
"""

import importlib

_PUBLIC = {
    "Config": "config", "ConfigError": "config", "DataConfig": "config", "LossConfig": "config",
    "MeshConfig": "config", "ModelConfig": "config", "OptimConfig": "config", "PSRConfig": "config",
    "TrainConfig": "config", "apply_overrides": "config", "load_preset": "config",
    "Decoder": "model", "PSRInputs": "model", "param_counts": "model",
}

__all__ = [
    "Config", "ConfigError", "DataConfig", "Decoder", "LossConfig", "MeshConfig", "ModelConfig",
    "OptimConfig", "PSRConfig", "PSRInputs", "TrainConfig", "apply_overrides", "load_preset", "param_counts",
]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"rexmoe_jax.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'rexmoe_jax' has no attribute {name!r}")
