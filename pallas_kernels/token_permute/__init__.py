"""Token permute and combine for MoE dispatch; see api.py for shapes and implementations."""

from pallas_kernels.token_permute.api import (
    Implementation,
    Interpret,
    combine,
    inverse_permutation,
    pallas_supported,
    permute,
)

__all__ = ["Implementation", "Interpret", "combine", "inverse_permutation", "pallas_supported", "permute"]
