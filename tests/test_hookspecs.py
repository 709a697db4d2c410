"""Meta-tests that keep the plugin contract honest: every hook documented, in the README, tested."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from hal import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("hal_")]


def test_there_are_hooks():
    assert "hal_register_backends" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_that_names_its_parameters(hook):
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    assert len(doc) > 80
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_signature_is_in_the_readme(hook):
    fn = getattr(hookspecs, hook)
    signature = f"{hook}({', '.join(inspect.signature(fn).parameters)})"
    assert signature in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_hookspecs.py"]
    assert any(f"def {hook}(" in p.read_text() for p in tests)
