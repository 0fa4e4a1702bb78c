"""Shared test setup: implicit rank promotion raises, so broadcasting bugs cannot hide.

Compile time is most of the suite's time, so every process the suite starts (pytest's workers,
and the train.py, launcher and notebook processes the tests start, which inherit this
environment) shares one persistent compilation cache and compiles with XLA's backend
optimisations off: about half the CPU time per compilation, for programs whose run time is
milliseconds at the tests' sizes. Numerics are the same to the tests' tolerances."""

import os
import sys
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
CACHE = os.path.join(tempfile.gettempdir(), "rexmoe-jax-test-cache")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in flags:
    flags += " " + TEST_XLA_FLAGS
# Eight simulated CPU devices for the sharding tests; single-device code uses the first.
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = flags.strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a test case with and without jax.jit."""
    return jax.jit if request.param else (lambda f, **_: f)
