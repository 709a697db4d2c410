"""Shared fixtures. Installed plugins are kept out of core tests unless a test opts in."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hal import _plugins
from hal.testing.build import make_model


@pytest.fixture
def add_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [("x", TensorProto.FLOAT, [2, 3]), ("y", TensorProto.FLOAT, [2, 3])],
        [("z", TensorProto.FLOAT, [2, 3])],
    )


@pytest.fixture
def linear_model() -> onnx.ModelProto:
    """y = x @ w + b with a symbolic batch dimension."""
    rng = np.random.default_rng(1)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal(32).astype(np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        [("x", TensorProto.FLOAT, ["batch", 8])],
        [("y", TensorProto.FLOAT, ["batch", 4])],
        initializers=[w, b],
    )


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry built from scratch for this test, with HAL_* variables it sets, then reset."""
    monkeypatch.delenv("HAL_DISABLE_PLUGINS", raising=False)
    monkeypatch.setenv("HAL_LOAD_PLUGINS", "")
    _plugins.reset_registry()
    yield _plugins.registry
    _plugins.reset_registry()
