"""Shared test setup: implicit rank promotion raises, so broadcasting bugs cannot hide."""

import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices for the sharding tests; single-device code uses the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Runs that build the same program (resume tests, repeated small models) compile it once.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "rexmoe-jax-test-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a test case with and without jax.jit."""
    return jax.jit if request.param else (lambda f, **_: f)
