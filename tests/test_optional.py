"""The suite's rule for optional packages (tests/optional.py): a skip where nobody installed
them, a failure where CI says it did."""

import pytest
from optional import importorskip

MISSING = "rexmoe_jax_no_such_package"


def test_a_missing_package_skips_unless_required(monkeypatch):
    monkeypatch.delenv("REXMOE_TEST_REQUIRE", raising=False)
    with pytest.raises(pytest.skip.Exception):
        importorskip(f"{MISSING}.sub")
    monkeypatch.setenv("REXMOE_TEST_REQUIRE", f"libtpu, {MISSING}")
    with pytest.raises(ModuleNotFoundError):
        importorskip(f"{MISSING}.sub")
    assert importorskip("json").dumps([1]) == "[1]"  # present: the module itself either way
