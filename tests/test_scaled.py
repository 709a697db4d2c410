"""hal.compiler.scaled: FP8 weights fitted to each device from its declared formats and scaling,
every change recorded, exact where it says so (checked bit for bit against the original model's
answers on ort:cpu), lossy only where the device leaves no choice."""

from __future__ import annotations

import attrs
import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import hal
import hal.quantize
from hal.capabilities import Capabilities, E8M0Encoding, NumberFormat, ScaledFormat, Support
from hal.compiler import lower_for
from hal.errors import LoweringError
from hal.lowering import StepKind
from hal.testing import models
from hal.testing.build import make_model

FLOATS = ["float32", "float16", "bfloat16", "int64"]
NO_FP8 = Capabilities.from_levels(native=FLOATS)
HOPPER = Capabilities.from_levels(
    native=[*FLOATS, "float8_e4m3fn", "float8_e5m2"], storage=["float8_e8m0"],
    scaled=[ScaledFormat("float8_e4m3fn", "float32", (1, 32)), ScaledFormat("float8_e4m3fn", "float32", (128, 128))],
)
MX_ONLY = Capabilities.from_levels(
    native=[*FLOATS, "float8_e4m3fn", "float8_e5m2", "float8_e8m0"],
    scaled=[ScaledFormat("float8_e4m3fn", "float8_e8m0", (1, 32))], opsets=hal.OpsetRange(7, 25),
)
FNUZ_ONLY = Capabilities.from_levels(
    native=[*FLOATS, "float8_e4m3fnuz", "float8_e5m2fnuz"],
    scaled=[ScaledFormat("float8_e4m3fnuz", "float32", (1, 32))],
)


def quantized(scale="float32", keep_e8m0=False, block=(1, 32), fmt="e4m3fn"):
    model = models.mlp(batch=4, width=64, layers=2)
    return hal.quantize.fp8(model, format=fmt, scale=scale, block=block, keep_e8m0=keep_e8m0).proto


def outputs(proto, x):
    """The model's answer on ort:cpu (lowered for it as the HAL does)."""
    return hal.compile(proto).to("ort:cpu", strict=True, verify=False).run({"x": x})["y"]


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)


def fp8_initializers(proto):
    return [t for t in proto.graph.initializer if NumberFormat.from_onnx(t.data_type).value.startswith("float8")]


class TestNoFp8:
    def test_weights_dequantized_at_compile_time_exactly(self, x):
        model = quantized()
        lowered, steps = lower_for(model, NO_FP8)
        assert not fp8_initializers(lowered)
        (step,) = [s for s in steps if s.kind is StepKind.LEGALIZE_SCALED]
        assert "dequantized at compile time" in step.detail and "float8_e4m3fn" in step.detail
        np.testing.assert_array_equal(outputs(lowered, x), outputs(model, x))

    def test_power_of_two_scales_store_narrow_when_exact(self, x):
        model = quantized(scale="ue8m0")
        lowered, steps = lower_for(model, NO_FP8)
        types = {NumberFormat.from_onnx(t.data_type) for t in lowered.graph.initializer if "dequantized" in t.name}
        assert types == {NumberFormat("bfloat16")}  # fp8 x 2^k fits bfloat16's 8-bit mantissa
        np.testing.assert_array_equal(outputs(lowered, x), outputs(model, x))
        float_scales = quantized(scale="float32")
        wide, _ = lower_for(float_scales, attrs.evolve(NO_FP8))
        assert {NumberFormat.from_onnx(t.data_type) for t in wide.graph.initializer if "dequantized" in t.name} == {
            NumberFormat("float32")}

    def test_the_memory_it_costs_is_checked(self):
        model = quantized()
        lowered, _ = lower_for(model, NO_FP8)
        need = hal.model.analyze(lowered).estimated_memory_bytes
        assert need > hal.model.analyze(model).estimated_memory_bytes
        small = attrs.evolve(NO_FP8, memory=hal.Memory(capacity_bytes=need - 1))
        with pytest.raises(LoweringError, match="needs about"):
            lower_for(model, small)

    def test_external_weights_are_refused_not_read(self, tmp_path):
        import onnx

        model = quantized()
        path = tmp_path / "q.onnx"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="q.data",
                        size_threshold=0)
        loaded = hal.load(path)
        with pytest.raises(LoweringError, match="external data"):
            lower_for(loaded.proto, NO_FP8)


class TestScales:
    def test_e8m0_scales_become_float32_where_not_declared(self, x):
        model = quantized(scale="ue8m0", keep_e8m0=True)
        lowered, steps = lower_for(model, HOPPER)
        assert not [t for t in lowered.graph.initializer if t.data_type == TensorProto.FLOAT8E8M0]
        assert any("converted to float32 (exact)" in s.detail for s in steps)
        assert fp8_initializers(lowered)  # the FP8 weights themselves are kept

    def test_ort_cpu_runs_e8m0_scales_it_has_no_kernel_for(self, x):
        model = quantized(scale="ue8m0", keep_e8m0=True)
        exe = hal.compile(model).to("ort:cpu", strict=True)
        float_scales = quantized(scale="ue8m0", keep_e8m0=False)  # same values, float32 powers of two
        np.testing.assert_array_equal(exe.run({"x": x})["y"], outputs(float_scales, x))
        assert any(s.kind is StepKind.LEGALIZE_SCALED for s in exe.lowering)

    def test_native_scales_are_kept(self):
        model = quantized()
        lowered, steps = lower_for(model, HOPPER)
        assert lowered is model and not steps

    def test_float_scales_requantized_for_an_mx_only_device_only_when_allowed(self, x):
        model = quantized()
        kept, steps = lower_for(model, MX_ONLY)  # the default exact precision: dequantized as written
        assert kept is model and not steps
        lowered, steps = lower_for(model, MX_ONLY, reduced_precision=True)
        (step,) = [s for s in steps if s.kind is StepKind.REQUANTIZE]
        assert "lossy" in step.detail and "SQNR" in step.detail
        # opset 21: the UE8M0 values travel as float32 powers of two (a FLOAT8E8M0 scale needs opset 24)
        scales = [numpy_helper.to_array(t) for t in lowered.graph.initializer if t.name.endswith("__ue8m0")
                  and t.data_type == TensorProto.FLOAT]
        assert scales and all(np.array_equal(np.exp2(np.round(np.log2(s))), s) for s in scales)
        e8m0 = quantized(scale="ue8m0", keep_e8m0=True)  # opset 24: already what the device takes
        assert lower_for(e8m0, MX_ONLY, reduced_precision=True)[0] is e8m0
        # the requantized model is close to the original, not equal
        got, want = outputs(lowered, x), outputs(model, x)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < err < 0.2


class TestCannEncoding:
    CANN = attrs.evolve(MX_ONLY, e8m0_encoding=E8M0Encoding.CANN_ZERO)

    def test_bytes_kept_when_no_scale_is_2_pow_minus_127(self):
        model = quantized(scale="ue8m0", keep_e8m0=True)
        lowered, steps = lower_for(model, self.CANN)
        assert any("re-encoded" in s.detail for s in steps)
        before = {t.name: t.raw_data for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E8M0}
        after = [t.raw_data for t in lowered.graph.initializer if t.data_type == TensorProto.FLOAT8E8M0]
        assert sorted(after) == sorted(before.values())

    def test_a_zero_byte_goes_to_float_scales_or_is_refused(self):
        w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [2, 32], np.full(64, 0x38, np.uint8).tobytes(), raw=True)
        s = helper.make_tensor("s", TensorProto.FLOAT8E8M0, [2, 1], bytes([0x00, 0x7F]), raw=True)
        model = make_model(
            [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=1, block_size=32, output_dtype=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "wf"], ["y"])],
            [("x", TensorProto.FLOAT, [1, 2])], [("y", TensorProto.FLOAT, [1, 32])], initializers=[w, s], opset=24, ir_version=11,
        )
        with pytest.raises(LoweringError, match="cannot hold"):
            lower_for(model, self.CANN)
        takes_float = attrs.evolve(self.CANN, scaled=[*self.CANN.scaled, ScaledFormat("float8_e4m3fn", "float32", (1, 32))])
        lowered, steps = lower_for(model, takes_float)
        assert any("converted to float32" in s.detail for s in steps)


class TestFnuz:
    def test_converted_exactly_with_scales_doubled(self, x):
        model = quantized()
        lowered, steps = lower_for(model, FNUZ_ONLY)
        assert {NumberFormat.from_onnx(t.data_type) for t in fp8_initializers(lowered)} == {NumberFormat("float8_e4m3fnuz")}
        assert any("converted to float8_e4m3fnuz" in s.detail for s in steps)
        np.testing.assert_array_equal(outputs(lowered, x), outputs(model, x))

    def test_edge_values_never_wrap(self):
        values = np.array([448, -448, 0, -0.0, 2**-9, np.nan], np.float32).astype(ml_dtypes.float8_e4m3fn)
        w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [6], values.view(np.uint8).tobytes(), raw=True)
        s = numpy_helper.from_array(np.array(1.0, np.float32), "s")
        model = make_model([helper.make_node("DequantizeLinear", ["w", "s"], ["y"])], [], [("y", TensorProto.FLOAT, [6])],
                           initializers=[w, s], opset=21, ir_version=10)
        lowered, _ = lower_for(model, FNUZ_ONLY)
        (q,) = fp8_initializers(lowered)
        fnuz = np.frombuffer(q.raw_data, np.uint8).view(ml_dtypes.float8_e4m3fnuz).astype(np.float32)
        np.testing.assert_array_equal(fnuz[:5] * 2, [448, -448, 0, 0, 2**-9])
        assert np.frombuffer(q.raw_data, np.uint8)[3] == 0x00  # -0 is +0, not 0x80 (NaN in FNUZ)
        assert np.frombuffer(q.raw_data, np.uint8)[5] == 0x80  # NaN is FNUZ's NaN

    def test_a_device_with_neither_dequantizes(self):
        lowered, _ = lower_for(quantized(fmt="e5m2"), Capabilities.from_levels(native=[*FLOATS, "float8_e4m3fnuz"]))
        assert not fp8_initializers(lowered)


class TestUndeclaredDequantize:
    """A device that emulates FP8 and declares no scaled format (IREE's llvm-cpu: its importer
    has no per-axis or blocked DequantizeLinear) gets the dequantization as Cast and Mul."""

    EMULATES = Capabilities.from_levels(native=FLOATS, emulated=["float8_e4m3fn", "float8_e5m2"])

    @pytest.mark.parametrize(("block", "scale", "keep"), [((1, 32), "float32", False), ("channel", "float32", False),
                                                          ((1, 32), "ue8m0", True), ((1, 32), "ue8m0", False)])
    def test_per_axis_and_block_scales_become_cast_and_mul_exactly(self, x, block, scale, keep):
        model = quantized(scale=scale, keep_e8m0=keep, block=block)
        lowered, steps = lower_for(model, self.EMULATES)
        assert not [n for n in lowered.graph.node if n.op_type == "DequantizeLinear"]
        assert {NumberFormat.from_onnx(t.data_type) for t in fp8_initializers(lowered)} == {NumberFormat("float8_e4m3fn")}
        (step,) = [s for s in steps if s.kind is StepKind.LEGALIZE_SCALED]
        assert "Cast and Mul" in step.detail and ("UE8M0" in step.detail) == keep
        np.testing.assert_array_equal(outputs(lowered, x), outputs(model, x))

    def test_a_block_that_does_not_divide_the_axis_is_dequantized_at_compile_time(self, x):
        model = quantized(block=(1, 48))  # 64 = 48 + a partial block of 16
        lowered, steps = lower_for(model, self.EMULATES)
        assert not fp8_initializers(lowered)
        assert any("dequantized at compile time" in s.detail for s in steps)
        np.testing.assert_array_equal(outputs(lowered, x), outputs(model, x))

    def test_kept_where_declared_native_or_scaled_or_per_tensor(self):
        model = quantized()
        declared = attrs.evolve(self.EMULATES, scaled=[ScaledFormat("float8_e4m3fn", "float32", (1, 32))])
        assert lower_for(model, declared)[0] is model
        native = Capabilities.from_levels(native=[*FLOATS, "float8_e4m3fn"])
        assert lower_for(model, native)[0] is model
        w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [2, 2], np.full(4, 0x38, np.uint8).tobytes(), raw=True)
        per_tensor = make_model(
            [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"]), helper.make_node("MatMul", ["x", "wf"], ["y"])],
            [("x", TensorProto.FLOAT, [1, 2])], [("y", TensorProto.FLOAT, [1, 2])],
            initializers=[w, numpy_helper.from_array(np.array(0.5, np.float32), "s")], opset=21, ir_version=10,
        )
        assert lower_for(per_tensor, self.EMULATES)[0] is per_tensor


class TestThroughTo:
    def test_requantized_device_verified_against_the_requantized_model(self, evaluator_device, x):
        """An MX-only accelerator (ONNX's reference evaluator) is verified, not refused, although its
        lowering changed the weights: the loss is the lowering's and is in its step."""
        evaluator_device("mx", MX_ONLY)
        compiled = hal.compile(quantized())
        exact = compiled.to("mx:0", strict=True)
        assert not [s for s in exact.lowering if s.kind is StepKind.REQUANTIZE]
        exe = compiled.to("mx:0", strict=True, reduced_precision=True)
        assert exe.verification is not None and exe.verification.passed
        kinds = [s.kind for s in exe.lowering]
        assert StepKind.REQUANTIZE in kinds and StepKind.VERIFIED in kinds
