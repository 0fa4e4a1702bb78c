"""ReXMoE in JAX/Flax: cross-layer expert reuse with progressive scaling routing."""

from rexmoe_jax.config import (
                               Config,
                               ConfigError,
                               DataConfig,
                               LossConfig,
                               MeshConfig,
                               ModelConfig,
                               OptimConfig,
                               PSRConfig,
                               TrainConfig,
                               apply_overrides,
                               load_preset,
)
from rexmoe_jax.model import Decoder, PSRInputs, param_counts

__all__ = [
    "Config", "ConfigError", "DataConfig", "Decoder", "LossConfig", "MeshConfig", "ModelConfig",
    "OptimConfig", "PSRConfig", "PSRInputs", "TrainConfig", "apply_overrides", "load_preset",
    "param_counts",
]
