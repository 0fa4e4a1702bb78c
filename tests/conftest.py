"""Shared test setup: implicit rank promotion raises, so broadcasting bugs cannot hide.

Compile time is most of the suite's time, so every process the suite starts (pytest's workers,
and the train.py, launcher and notebook processes the tests start, which inherit this
environment) shares one persistent compilation cache and compiles with XLA's backend
optimisations off (about half the CPU time per compilation, for programs whose run time is
milliseconds at the tests' sizes) and, on jaxlib 0.10, with XLA:CPU's older emitters, which
compile in under half the time again (the whole suite from cold: 4 min 31 s with them against
6 min 17 s without, 2-core AMD EPYC). Numerics are the same to the tests' tolerances."""

import os
import sys
import tempfile
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rexmoe_jax.runtime.distributed import CPU_DEVICES_XLA_FLAGS, with_xla_flags  # imports no jax

# XLA:CPU ends a process (LOG(FATAL), "Termination timeout ... of 40 seconds exceeded") when a
# collective's participant is 40 s late, which 8 simulated devices per process, two pytest
# workers and their train.py processes on 2 cores can make one: 300 s here (the flag exists on
# jaxlib 0.10 and 0.12), so that late is not taken for stuck. A participant that never comes,
# XLA:CPU's own deadlock of stops 39 and 40 (see CPU_DEVICES_XLA_FLAGS), is what that flag
# avoids; every process the tests start gets it.
TEST_XLA_FLAGS = " ".join(("--xla_backend_optimization_level=0",
                           "--xla_cpu_collective_call_terminate_timeout_seconds=300", *CPU_DEVICES_XLA_FLAGS))
CACHE = os.path.join(tempfile.gettempdir(), "rexmoe-jax-test-cache")


def _jaxlib_version() -> tuple[int, int]:
    """(major, minor) of the installed jaxlib, read without importing jax (XLA reads its flags
    once, when jax starts). A jaxlib without package metadata counts as a new one."""
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
    except metadata.PackageNotFoundError:
        return (99, 0)
    return int(major), int(minor)


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Eight simulated CPU devices for the sharding tests; single-device code uses the first.
added = (*TEST_XLA_FLAGS.split(), "--xla_force_host_platform_device_count=8")
# jaxlib 0.10 keeps XLA:CPU's older elemental emitters beside the MLIR fusion emitters, and they
# compile the suite's programs in under half the time (a small train step: 1.2 s against 2.8 s).
# jaxlib 0.11 and later have only the fusion emitters and abort on the flag.
if _jaxlib_version() < (0, 11):
    added += ("--xla_cpu_use_fusion_emitters=false",)
os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""), added)  # a flag set already stays

import jax
import pytest
from optional import importorskip

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a test case with and without jax.jit."""
    return jax.jit if request.param else (lambda f, **_: f)


@pytest.fixture
def tpu_devices():
    """name -> the devices of that TPU slice as the TPU compiler describes them (libtpu, from
    this CPU machine: for lowering and compiling, never running); skipped without libtpu."""
    importorskip("libtpu", reason="compiling for a TPU needs libtpu: pip install -e '.[tpu]'")
    from rexmoe_jax import sharding, targets

    return lambda name: sharding.target_devices(targets.parse(name))
