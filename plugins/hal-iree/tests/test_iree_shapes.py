"""Dynamic dimensions: IREE does not broadcast them, so hal-iree checks output shapes per input
shape signature (hal_iree._shapes) and refuses instead of answering wrong."""

from __future__ import annotations

import numpy as np
import pytest
from iree_helpers import make, to_strict
from onnx import TensorProto, helper

import hal
from hal.errors import RunError
from hal_iree._shapes import ShapeOracle

DEVICE = "iree:local-task"
F = TensorProto.FLOAT


@pytest.fixture(scope="module")
def sub_exe() -> hal.Executable:
    model = make([helper.make_node("Sub", ["a", "b"], ["y"])], [("a", F, ["n"]), ("b", F, ["m"])], [("y", F, ["k"])])
    return to_strict(hal.compile(model), DEVICE, verify=False)


def test_equal_sizes_answer_right(sub_exe) -> None:  # type: ignore[no-untyped-def]
    a, b = np.arange(4, dtype=np.float32), np.ones(4, np.float32)
    np.testing.assert_array_equal(sub_exe.run({"a": a, "b": b})["y"], a - b)


def test_sizes_that_do_not_broadcast_are_refused_before_iree_runs(sub_exe) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RunError, match=r"input shapes a\[3\], b\[4\] do not fit the model"):
        sub_exe.run({"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)})


def test_a_broadcast_iree_cannot_do_is_refused_not_answered(sub_exe) -> None:  # type: ignore[no-untyped-def]
    """Without the check IREE answers one element for a[1] - b[4] (seen: [0.5] for numpy's four)."""
    with pytest.raises(RunError, match=r"shape \(1,\) where the model gives \(4,\).*does not broadcast"):
        sub_exe.run({"a": np.ones(1, np.float32), "b": np.arange(4, dtype=np.float32)})
    # The refusal is per call: the next run with fitting shapes answers.
    a = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(sub_exe.run({"a": a, "b": a})["y"], np.zeros(4, np.float32))


def test_weights_and_shape_constants_take_part_in_inference() -> None:
    """A dynamic batch through MatMul (a weight over the oracle's size bound, seen as an input of
    its shape) and Reshape (a small shape constant, kept): the oracle agrees with IREE."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    shape = np.array([-1, 8, 8], np.int64)
    model = make(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        [("x", F, ["batch", 64])], [("y", F, ["batch", 8, 8])], {"w": w, "shape": shape},
    )
    oracle = ShapeOracle(model, ["x"], ["y"])
    assert "w" not in {t.name for t in oracle._model.graph.initializer}  # noqa: SLF001 - the weight is not copied
    assert oracle.before({"x": np.zeros((5, 64), np.float32)}) == ((5, 8, 8),)
    exe = to_strict(hal.compile(model), DEVICE, verify=False)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_allclose(exe.run({"x": x})["y"], (x @ w).reshape(-1, 8, 8), rtol=1e-4, atol=1e-4)


def test_static_models_need_no_oracle() -> None:
    static = make([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [4])], [("y", F, [4])])
    dynamic = make([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["n"])], [("y", F, ["n"])])
    assert not ShapeOracle.needed(static) and ShapeOracle.needed(dynamic)
