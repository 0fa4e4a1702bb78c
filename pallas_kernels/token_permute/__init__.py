"""Token permute and combine for MoE dispatch; see api.py for shapes and implementations."""

from pallas_kernels.token_permute.api import (
    TPUS_WITHOUT_SUBLANE_GATHER,
    Implementation,
    Interpret,
    combine,
    inverse_permutation,
    permute,
)

__all__ = ["TPUS_WITHOUT_SUBLANE_GATHER", "Implementation", "Interpret", "combine", "inverse_permutation",
           "permute"]
