"""Optional packages in the tests: skipped where they are missing, except where CI installed them.

A user without libtpu, lm_eval or PyTorch gets those tests skipped, saying what to install. CI
names in REXMOE_TEST_REQUIRE (comma-separated top-level modules) what its leg installed; there a
failed import fails the test, since a skip would hide a broken environment."""

import importlib
import os

import pytest


def importorskip(name: str, reason: str | None = None):
    """pytest.importorskip(name), unless REXMOE_TEST_REQUIRE names its top-level package."""
    required = {n.strip() for n in os.environ.get("REXMOE_TEST_REQUIRE", "").split(",") if n.strip()}
    if name.split(".")[0] in required:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=reason)
