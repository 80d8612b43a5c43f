"""The property tests run under one profile (tests/conftest.py) that a loaded machine cannot
fail: no deadline, no health check about time. A test's own settings may choose how many
examples, nothing that would replace the profile's (issue #20 item 10: a health check failed
`./dev test` on two busy cores)."""

from __future__ import annotations

import importlib
from pathlib import Path

import hypothesis
import pytest

TESTS = Path(__file__).parents[1]
MODULES = sorted(
    ".".join(p.relative_to(TESTS.parent).with_suffix("").parts)
    for p in TESTS.rglob("test_*.py")
    if p != Path(__file__) and "@given(" in p.read_text()
)


def test_the_profile_is_loaded():
    default = hypothesis.settings.default
    assert default is not None and default.deadline is None
    assert hypothesis.HealthCheck.too_slow in default.suppress_health_check


@pytest.mark.parametrize("module", MODULES)
def test_every_property_test_keeps_the_profile(module):
    default = hypothesis.settings.default
    assert default is not None
    found = [
        (name, test._hypothesis_internal_use_settings)
        for name, test in vars(importlib.import_module(module)).items()
        if name.startswith("test_") and hasattr(test, "_hypothesis_internal_use_settings")
    ]
    assert found, module
    for name, chosen in found:
        assert chosen.deadline is None, name
        assert hypothesis.HealthCheck.too_slow in chosen.suppress_health_check, name
        assert set(chosen.suppress_health_check) >= set(default.suppress_health_check), name
