"""hal.compiler.limits: what a device declares it cannot take is refused at lowering, naming
the model's need and the device's figure, so to() falls back or (strict) says why."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import hal
from hal.capabilities import Capabilities, Memory
from hal.compiler import lower_for
from hal.errors import LoweringError
from hal.model import analyze
from hal.testing.build import make_model

BASE = Capabilities.from_levels(native=["float32", "int64"])


def relu_then_softmax(batch="n"):
    return make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["y"])],
        [("x", TensorProto.FLOAT, [batch, 8])], [("y", TensorProto.FLOAT, [batch, 8])],
    )


def weights(n: int):
    """A MatMul with an n x n float32 weight."""
    w = numpy_helper.from_array(np.ones((n, n), np.float32), "w")
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                      [("x", TensorProto.FLOAT, [1, n])], [("y", TensorProto.FLOAT, [1, n])], initializers=[w])


class TestUnsupportedOperators:
    def test_refused_naming_the_operators(self):
        caps = attrs.evolve(BASE, unsupported_ops=["Softmax", "Gelu"])
        with pytest.raises(LoweringError, match="Softmax") as info:
            lower_for(relu_then_softmax(), caps)
        assert info.value.operators == ("Softmax",)
        lower_for(relu_then_softmax(), attrs.evolve(BASE, unsupported_ops=["Gelu"]))  # unused: fine

    def test_operators_inside_subgraphs_count(self):
        branch = helper.make_graph([helper.make_node("Softmax", ["x"], ["z"])], "b", [],
                                   [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
        model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                           [("c", TensorProto.BOOL, []), ("x", TensorProto.FLOAT, [2])], [("y", TensorProto.FLOAT, [2])])
        caps = attrs.evolve(Capabilities.from_levels(native=["float32", "bool"]), unsupported_ops=["Softmax"])
        with pytest.raises(LoweringError, match="Softmax"):
            lower_for(model, caps)

    def test_a_malformed_name_is_refused_when_declared(self):
        with pytest.raises(ValueError, match="domain:Op"):
            attrs.evolve(BASE, unsupported_ops=["ai.onnx:Softmax"])


class TestStaticShapes:
    def test_symbolic_input_refused_on_a_static_device(self):
        caps = attrs.evolve(BASE, dynamic_shapes=False)
        with pytest.raises(LoweringError, match=r"x\[0\]=n"):
            lower_for(relu_then_softmax("n"), caps)
        lower_for(relu_then_softmax(4), caps)

    def test_a_dynamic_device_takes_it(self):
        lower_for(relu_then_softmax("n"), BASE)


class TestMemory:
    def test_refused_with_both_figures(self):
        model = weights(256)
        need = analyze(model).estimated_memory_bytes
        assert need >= 256 * 256 * 4
        caps = attrs.evolve(BASE, memory=Memory(capacity_bytes=need - 1))
        with pytest.raises(LoweringError, match=rf"needs about {need:,} bytes.*has {need - 1:,} bytes"):
            lower_for(model, caps)
        with pytest.raises(LoweringError, match=r"needs about 0\.25 MiB.*has 0\.12 MiB"):
            lower_for(model, attrs.evolve(BASE, memory=Memory(capacity_bytes=2**17)))
        lower_for(model, attrs.evolve(BASE, memory=Memory(capacity_bytes=need)))

    def test_no_declared_capacity_no_check(self):
        lower_for(weights(256), attrs.evolve(BASE, memory=Memory()))


@pytest.fixture
def limited(evaluator_device):
    return lambda caps: evaluator_device("limited", caps)


class TestThroughTo:
    def test_an_unsupported_operator_falls_back_and_strict_refuses(self, limited):
        limited(attrs.evolve(BASE, unsupported_ops=["Softmax"]))
        compiled = hal.compile(relu_then_softmax(4))
        assert compiled.explain("limited:0").status == "cannot"
        exe = compiled.to("limited:0")
        assert exe.device.id == "ort:cpu"
        x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)
        e = np.exp(np.maximum(x, 0))
        np.testing.assert_allclose(exe.run({"x": x})["y"], e / e.sum(axis=1, keepdims=True), rtol=1e-6)
        with pytest.raises(LoweringError, match="Softmax"):
            compiled.to("limited:0", strict=True)

    def test_auto_skips_a_device_too_small(self, limited):
        model = weights(128)
        limited(attrs.evolve(BASE, memory=Memory(capacity_bytes=analyze(model).estimated_memory_bytes // 2)))
        compiled = hal.compile(model)
        verdict = compiled.explain("limited:0")
        assert verdict.status == "cannot" and "needs about" in verdict.reason
        assert compiled.to("auto").device.id != "limited:0"
