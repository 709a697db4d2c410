"""A profile is enforced by the core's lowering, end to end through ``compiled.to()``: formats,
unsupported operators, memory, dynamic shapes and opsets; and a simulated device computes what
``ort:cpu`` computes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

import hal
from hal.errors import LoweringError
from hal.plugin import StepKind
from hal.testing import models
from hal.testing.build import make_model


def _fp8_embedding() -> hal.Model:
    """An FP8 embedding table gathered by ids and dequantized: the Gather moves FP8 activations."""
    table = (np.arange(40, dtype=np.float32).reshape(10, 4) / 8).astype(ml_dtypes.float8_e4m3fn)
    weight = helper.make_tensor("table", TensorProto.FLOAT8E4M3FN, [10, 4], table.view(np.uint8).tobytes(), raw=True)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"]),
        helper.make_node("DequantizeLinear", ["rows", "scale"], ["y"]),
    ]
    proto = make_model(
        nodes, [("ids", TensorProto.INT64, [3])], [("y", TensorProto.FLOAT, [3, 4])],
        initializers=[weight, scale], opset=21,
    )
    return hal.load(proto)


def _relu(shape=(2, 8), opset=17) -> hal.Model:
    node = helper.make_node("Relu", ["x"], ["y"])
    return hal.load(make_model([node], [("x", TensorProto.FLOAT, shape)], [("y", TensorProto.FLOAT, shape)], opset=opset))


def _legalized(exe: hal.Executable) -> list[str]:
    return [s.detail for s in exe.lowering if s.kind is StepKind.LEGALIZE_FORMAT]


def _changed(exe: hal.Executable) -> list[str]:
    """What lowering changed in how the model computes (formats and FP8 weights)."""
    kinds = (StepKind.LEGALIZE_FORMAT, StepKind.LEGALIZE_SCALED, StepKind.REQUANTIZE)
    return [s.detail for s in exe.lowering if s.kind in kinds]


class TestFormats:
    def test_fp8_weights_stay_fp8_on_h100_and_are_lowered_for_910c(self, sim):
        sim(HAL_SIM_DEVICES="h100,ascend-910c")
        compiled = hal.compile(models.fp8_block_scaled_mlp())  # DeepSeek-V3's layout: 128x128 float32 scales
        x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
        h100 = compiled.to("sim:h100:0", strict=True)
        ascend = compiled.to("sim:ascend-910c:0", strict=True)
        assert _changed(h100) == []
        (step,) = _changed(ascend)
        assert "dequantized at compile time" in step and "float8_e4m3fn" in step
        want = compiled.to("ort:cpu", strict=True).run({"x": x})["y"]
        np.testing.assert_array_equal(h100.run({"x": x})["y"], want)
        # the weights are exactly what DequantizeLinear computes; the kernels summing them may differ
        np.testing.assert_allclose(ascend.run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)

    def test_fp8_activations_are_refused_where_the_chip_has_no_fp8(self, sim):
        sim(HAL_SIM_DEVICES="ascend-910c")
        with pytest.raises(LoweringError, match="float8_e4m3fn, which this device cannot even store"):
            hal.compile(_fp8_embedding()).to("sim:ascend-910c:0", strict=True)

    def test_a_format_the_chip_cannot_hold_is_refused(self, sim):
        sim(HAL_SIM_DEVICES="kunlunxin-p800")  # declares no bfloat16 at all
        node = helper.make_node("Identity", ["x"], ["y"])
        model = make_model([node], [("x", TensorProto.BFLOAT16, [2])], [("y", TensorProto.BFLOAT16, [2])])
        with pytest.raises(LoweringError, match="bfloat16, which this device cannot even store"):
            hal.compile(model).to("sim:kunlunxin-p800:0", strict=True)


class TestOperatorsMemoryShapes:
    def test_an_unsupported_operator_falls_back_and_strict_refuses(self, sim, profile_dir):
        directory = profile_dir(acme_x1='BASE\n[software]\nunsupported_ops = {value = ["Relu"], source = "unverified: test"}\n')
        sim(HAL_SIM_DEVICES="acme-x1", HAL_SIM_PROFILES=str(directory))
        compiled = hal.compile(_relu())
        with pytest.raises(LoweringError, match="Relu") as info:
            compiled.to("sim:acme-x1:0", strict=True)
        assert info.value.operators == ("Relu",)
        exe = compiled.to("sim:acme-x1:0")  # fallback allowed: another device runs it
        assert exe.device.id != "sim:acme-x1:0"
        assert any(s.kind is StepKind.FALLBACK for s in exe.lowering)

    def test_a_model_larger_than_the_memory_is_refused_with_both_figures(self, sim, profile_dir):
        # 2^-10 GiB = 1 MiB of device memory; the MLP's weights take 4 MiB
        directory = profile_dir(acme_x1='BASE\n[memory]\ncapacity_gib = {value = 0.0009765625, source = "unverified: test"}\n')
        sim(HAL_SIM_DEVICES="acme-x1", HAL_SIM_PROFILES=str(directory))
        with pytest.raises(LoweringError, match=r"needs about [\d.]+ MiB .* the device has 1.00 MiB"):
            hal.compile(models.mlp(batch=2, width=512, layers=4)).to("sim:acme-x1:0", strict=True)
        # a model that fits runs
        assert hal.compile(models.add()).to("sim:acme-x1:0", strict=True).device.id == "sim:acme-x1:0"

    def test_static_shapes_only(self, sim, profile_dir):
        directory = profile_dir(acme_x1='BASE\n[software]\ndynamic_shapes = {value = false, source = "unverified: test"}\n')
        sim(HAL_SIM_DEVICES="acme-x1", HAL_SIM_PROFILES=str(directory))
        with pytest.raises(LoweringError, match="batch"):
            hal.compile(_relu(shape=("batch", 8))).to("sim:acme-x1:0", strict=True)
        assert hal.compile(_relu()).to("sim:acme-x1:0", strict=True).run({"x": np.ones((2, 8), np.float32)})

    def test_the_opset_range_is_the_profiles(self, sim, profile_dir):
        directory = profile_dir(acme_x1='BASE\n[software]\nopsets = {value = [13, 17], source = "unverified: test"}\n')
        devices = {d.id: d for d in sim(HAL_SIM_DEVICES="acme-x1", HAL_SIM_PROFILES=str(directory))}
        opsets = devices["sim:acme-x1:0"].capabilities.opsets
        assert (opsets.min, opsets.max) == (13, 17)
        exe = hal.compile(_relu(opset=21)).to("sim:acme-x1:0", strict=True)
        assert any(s.kind is StepKind.CONVERT_OPSET and "17" in s.detail for s in exe.lowering)


class TestAnswers:
    @pytest.mark.parametrize("device", ["sim:h100:0", "sim:ascend-910c:0"])
    @pytest.mark.parametrize("name", ["mlp", "transformer_encoder"])
    def test_float32_models_answer_as_ort_cpu(self, sim, device, name):
        sim(HAL_SIM_DEVICES="h100,ascend-910c")
        model, feeds = models.zoo(small=True)[name]
        compiled = hal.compile(model)
        want = compiled.to("ort:cpu", strict=True, verify=False).run(feeds)
        got = compiled.to(device, strict=True, verify=False).run(feeds)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
