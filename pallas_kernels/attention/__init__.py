"""Causal grouped-query attention as a flash (blockwise, online-softmax) kernel; see api.py."""

from pallas_kernels.attention.api import BLOCK, applies, causal

__all__ = ["BLOCK", "applies", "causal"]
