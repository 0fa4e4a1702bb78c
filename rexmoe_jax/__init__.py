"""ReXMoE in JAX/Flax: cross-layer expert reuse with progressive scaling routing.

Names are imported on first use, so that `import rexmoe_jax.config` (and train.py's start-up)
does not pay for importing jax.
"""

import importlib

# The public names and the module each lives in ("module.attribute" where the names differ).
_PUBLIC = {
    "ComputeConfig": "config", "Config": "config", "ConfigError": "config", "DataConfig": "config",
    "LossConfig": "config", "MeshConfig": "config", "ModelConfig": "config", "OptimConfig": "config",
    "PSRConfig": "config", "TrainConfig": "config", "apply_overrides": "config", "load_preset": "config",
    "Decoder": "model", "PSRInputs": "model", "param_counts": "model",
    "train": "loop.run", "load": "inference", "LoadedModel": "inference", "Sampling": "generate",
}

__all__ = sorted(_PUBLIC)  # noqa: PLE0605 - one list of names: _PUBLIC's keys


def __getattr__(name):
    if name in _PUBLIC:
        module, _, attribute = _PUBLIC[name].partition(".")
        return getattr(importlib.import_module(f"rexmoe_jax.{module}"), attribute or name)
    raise AttributeError(f"module 'rexmoe_jax' has no attribute {name!r}")
