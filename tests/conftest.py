"""Shared test setup: implicit rank promotion raises, so broadcasting bugs cannot hide."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a test case with and without jax.jit."""
    return jax.jit if request.param else (lambda f, **_: f)
