"""Grouped (ragged) matmul for expert FFNs; see api.py for shapes and implementations."""

from pallas_kernels.grouped_matmul.api import Implementation, alignment, grouped_matmul, resolve

__all__ = ["Implementation", "alignment", "grouped_matmul", "resolve"]
