"""hal.estimate: the roofline estimate, checked against FLOPs and bytes worked out by hand from the
model's shapes, and Executable.estimate on a device that declares its figures."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import hal
from hal.capabilities import Capabilities, Memory
from hal.errors import DeviceError
from hal.estimate import estimate
from hal.testing.build import make_model


def caps(peak_tflops=None, bandwidth_gbps=None, launch_us=None) -> Capabilities:
    return Capabilities.from_levels(
        native=["float32", "float16", "bfloat16", "float8_e4m3fn"],
        peak_tflops=peak_tflops or {},
        memory=Memory(bandwidth_gbps=bandwidth_gbps),
        launch_overhead_us=launch_us,
    )


def matmul(m="m", k=64, n=32, dtype=TensorProto.FLOAT):
    w = numpy_helper.from_array(np.ones((k, n), np.float32), "w")
    if dtype != TensorProto.FLOAT:
        w = helper.make_tensor("w", dtype, [k, n], np.zeros(k * n, np.uint16).tobytes(), raw=True)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", dtype, [m, k])], [("y", dtype, [m, n])],
                      initializers=[w])


class TestEstimate:
    def test_matmul_flops_bytes_and_time_follow_the_roofline(self):
        m, k, n = 8, 64, 32
        peak, bandwidth, launch = 2.0, 50.0, 3.0
        est = estimate(matmul(m, k, n), caps({"float32": peak}, bandwidth, launch))
        (node,) = est.nodes
        assert node.flops == 2 * m * k * n
        assert node.bytes == 4 * (m * k + k * n + m * n)
        expected = max(node.flops / (peak * 1e12), node.bytes / (bandwidth * 1e9)) + launch * 1e-6
        assert est.seconds == pytest.approx(expected)
        assert est.kind == "estimated" and str(est).startswith("estimated ")

    def test_the_bound_follows_which_term_dominates(self):
        model = matmul(512, 512, 512)  # 268 MFLOP over 3 MiB: arithmetic intensity ~85 FLOP/byte
        slow_compute = estimate(model, caps({"float32": 0.001}, 1000.0))
        slow_memory = estimate(model, caps({"float32": 1000.0}, 0.001))
        assert slow_compute.nodes[0].bound == "compute"
        assert slow_memory.nodes[0].bound == "memory"
        tiny = estimate(matmul(1, 4, 4), caps({"float32": 1000.0}, 1000.0, launch_us=10.0))
        assert tiny.nodes[0].bound == "launch"

    def test_symbolic_dimensions_take_the_given_shapes_or_count_as_one_and_say_so(self):
        model, c = matmul("batch"), caps({"float32": 1.0}, 10.0)
        guessed = estimate(model, c)
        assert any("x" in a and "taken as 1" in a for a in guessed.assumptions)
        four = estimate(model, c, {"x": (4, 64)})
        assert four.flops == 4 * guessed.flops
        assert not any("taken as 1" in a for a in four.assumptions)

    def test_each_format_uses_its_own_peak_and_a_missing_one_is_an_assumption(self):
        half = estimate(matmul(64, dtype=TensorProto.FLOAT16), caps({"float32": 1.0, "float16": 4.0}, 1e6))
        single = estimate(matmul(64), caps({"float32": 1.0, "float16": 4.0}, 1e6))
        assert half.nodes[0].format == "float16" and single.nodes[0].format == "float32"
        # same FLOPs, a peak four times higher, both compute-bound with this bandwidth
        assert single.seconds == pytest.approx(4 * half.seconds)
        missing = estimate(matmul(64, dtype=TensorProto.FLOAT16), caps({"float32": 1.0, "bfloat16": 2.0}, 1e6))
        assert missing.nodes[0].seconds == pytest.approx(missing.nodes[0].flops / 1e12)  # the lowest peak
        assert any("float16" in a and "lowest declared peak" in a for a in missing.assumptions)

    def test_views_cost_nothing_and_elementwise_moves_bytes(self):
        model = make_model(
            [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
            [("x", TensorProto.FLOAT, [16, 16])], [("y", TensorProto.FLOAT, [256])],
            initializers=[numpy_helper.from_array(np.array([256], np.int64), "s")],
        )
        est = estimate(model, caps({"float32": 1.0}, 1.0))
        view, relu = est.nodes
        assert view.bound == "view" and view.seconds == 0
        assert relu.bytes == 2 * 256 * 4 and relu.flops == 256 and relu.bound == "memory"

    def test_a_weight_only_quantized_matmul_reads_the_narrow_weights(self):
        k, n = 128, 64
        w8 = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, [k, n], np.zeros(k * n, np.uint8).tobytes(), raw=True)
        scale = numpy_helper.from_array(np.ones((k // 32, n), np.float32), "s")
        model = make_model(
            [helper.make_node("DequantizeLinear", ["w8", "s"], ["w"], axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "w"], ["y"])],
            [("x", TensorProto.FLOAT, [4, k])], [("y", TensorProto.FLOAT, [4, n])], initializers=[w8, scale], opset=21,
        )
        est = estimate(model, caps({"float32": 1.0}, 1.0))
        dq, mm = est.nodes
        assert dq.bound == "fused" and dq.seconds == 0
        assert mm.bytes == 4 * 4 * k + k * n + 4 * 4 * n  # fp8 weights: one byte each

    def test_conv_and_gemm_flops(self):
        conv = make_model(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
            [("x", TensorProto.FLOAT, [2, 3, 8, 8])], [("y", TensorProto.FLOAT, [2, 16, 8, 8])],
            initializers=[numpy_helper.from_array(np.ones((16, 3, 3, 3), np.float32), "w")],
        )
        assert estimate(conv, caps({"float32": 1.0})).flops == 2 * (2 * 16 * 8 * 8) * (3 * 3 * 3)
        gemm = make_model(
            [helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1)],
            [("a", TensorProto.FLOAT, [5, 3])], [("y", TensorProto.FLOAT, [3, 7])],
            initializers=[numpy_helper.from_array(np.ones((5, 7), np.float32), "b"),
                          numpy_helper.from_array(np.ones(7, np.float32), "c")],
        )
        assert estimate(gemm, caps({"float32": 1.0})).flops == 2 * 3 * 7 * 5 + 3 * 7

    def test_a_device_declaring_nothing_cannot_be_estimated(self):
        with pytest.raises(DeviceError, match="neither peak throughput"):
            estimate(matmul(), caps())
        launches = estimate(matmul(), caps(launch_us=4.0))  # launches alone are still an estimate
        assert launches.seconds == pytest.approx(4e-6)

    def test_missing_figures_are_named(self):
        only_peak = estimate(matmul(4), caps({"float32": 1.0}))
        assert any("no memory bandwidth" in a for a in only_peak.assumptions)
        assert any("no launch overhead" in a for a in only_peak.assumptions)


ROOFLINE = Capabilities.from_levels(native=["float32", "int64"], peak_tflops={"float32": 10.0},
                                   memory=Memory(bandwidth_gbps=100.0), launch_overhead_us=5.0)


@pytest.fixture
def roofline(evaluator_device):
    return evaluator_device("roofline", ROOFLINE)


class TestExecutableEstimate:
    def test_estimate_of_the_lowered_model_for_the_feeds_shapes(self, roofline):
        exe = hal.compile(matmul("batch")).to("roofline:0")
        x = np.ones((16, 64), np.float32)
        exe.run({"x": x})
        est = exe.estimate({"x": x})
        assert est.flops == 2 * 16 * 64 * 32
        assert exe.estimate({"x": (16, 64)}) is est  # remembered per shape
        assert exe.estimate({"x": (32, 64)}).flops == 2 * est.flops

    def test_a_device_without_figures_refuses(self):
        exe = hal.compile(matmul(4)).to("ort:cpu")
        with pytest.raises(DeviceError, match="declares neither"):
            exe.estimate()
