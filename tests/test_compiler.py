"""hal.compiler passes on generated models, checked numerically on onnxruntime CPU."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from attrs import evolve
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

import hal
from hal.backends.cpu import CPU_CAPABILITIES
from hal.backends.onnxruntime import runtime_limits
from hal.capabilities import Capabilities, OpsetRange
from hal.compiler import convert_opset, legalize_formats, lower_for, optimize
from hal.compiler.opset import default_opset, fit_ir_version
from hal.errors import LoweringError
from hal.model import MAX_GRAPH_DEPTH

RNG = np.random.default_rng(1234)


def _model(
    nodes: list[Any],
    inputs: list[Any],
    outputs: list[Any],
    inits: list[Any] = (),
    opset: int = 21,
) -> onnx.ModelProto:  # type: ignore[assignment]
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    # onnx's make_model stamps its newest IR version, which older onnxruntime builds (gpu 1.31,
    # cann 1.24) refuse: lower it as compiled.to() would for that runtime.
    model, _ = fit_ir_version(model, runtime_limits().max_ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Disable ORT's own folding so the comparison exercises our passes, not ORT's.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(model).run(None, feeds)


def _f32(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _vi(name: str, elem: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


# -- optimize ----------------------------------------------------------------------------------


class TestOptimize:
    def _foldable_model(self) -> onnx.ModelProto:
        w = nh.from_array(_f32((4, 4)), "w")
        b = nh.from_array(_f32((4,)), "b")
        unused = nh.from_array(_f32((100,)), "unused")
        nodes = [
            h.make_node("Constant", [], ["two"], value_float=2.0),
            h.make_node("Mul", ["w", "two"], ["w2"]),  # constant: folded
            h.make_node("Transpose", ["w2"], ["w2t"]),  # constant: folded
            h.make_node("Identity", ["x"], ["xi"]),  # removed
            h.make_node("MatMul", ["xi", "w2t"], ["mm"]),
            h.make_node("Add", ["mm", "b"], ["y"]),
            h.make_node("Relu", ["mm"], ["dead"]),  # reaches no output
            h.make_node("Identity", ["y"], ["z"]),  # graph output: kept
        ]
        return _model(
            nodes,
            [_vi("x", T.FLOAT, [3, 4])],
            [_vi("y", T.FLOAT, [3, 4]), _vi("z", T.FLOAT, [3, 4])],
            [w, b, unused],
        )

    def test_folds_removes_and_keeps_results(self) -> None:
        model = self._foldable_model()
        before = model.SerializeToString()
        out, steps = optimize(model)
        assert model.SerializeToString() == before, (
            "the input proto must not be modified"
        )
        ops = [n.op_type for n in out.graph.node]
        assert ops == ["MatMul", "Add", "Identity"]
        assert out.graph.node[0].input[0] == "x", (
            "readers of an Identity read its source"
        )
        assert {t.name for t in out.graph.initializer} == {"w2t", "b"}
        kinds = [s.kind for s in steps]
        assert kinds == [
            "fold-constants",
            "eliminate-identity",
            "remove-dead-nodes",
            "remove-unused-initializers",
        ]
        assert (
            "Mul 1" in steps[0].detail
            and "Transpose 1" in steps[0].detail
            and "Constant 1" in steps[0].detail
        )
        onnx.checker.check_model(out, full_check=True)
        x = _f32((3, 4))
        for a, b in zip(_ort(model, {"x": x}), _ort(out, {"x": x})):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    def test_deterministic(self) -> None:
        model = self._foldable_model()
        first, _ = optimize(model)
        second, _ = optimize(model)
        assert first.SerializeToString() == second.SerializeToString()

    def test_nothing_to_do_gives_no_steps(self) -> None:
        model = _model(
            [h.make_node("Relu", ["x"], ["y"])],
            [_vi("x", T.FLOAT, [2])],
            [_vi("y", T.FLOAT, [2])],
        )
        out, steps = optimize(model)
        assert steps == []
        assert [n.op_type for n in out.graph.node] == ["Relu"]

    def test_leaves_random_qdq_and_overridable_initializers(self) -> None:
        q = nh.from_array(
            np.array([1.0, -2.0, 448.0], np.float32).astype(ml_dtypes.float8_e4m3fn),
            "q",
        )
        scale = nh.from_array(np.array(0.5, np.float32), "scale")
        shape = nh.from_array(np.array([3], np.int64), "shape")
        # Also a graph input: callers may feed it, so it is not a constant.
        default = nh.from_array(np.ones(3, np.float32), "d")
        nodes = [
            h.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
            h.make_node("RandomNormal", [], ["noise"], shape=[3], seed=1.0),
            h.make_node("Cast", ["shape"], ["shape_f"], to=T.FLOAT),
            h.make_node("Mul", ["noise", "shape_f"], ["scaled"]),
            h.make_node("Add", ["w", "d"], ["y"]),
            h.make_node("Add", ["y", "scaled"], ["y2"]),
        ]
        model = _model(
            nodes,
            [_vi("d", T.FLOAT, [3])],
            [_vi("y", T.FLOAT, [3]), _vi("y2", T.FLOAT, [3])],
            [q, scale, shape, default],
        )
        out, _ = optimize(model)
        ops = [n.op_type for n in out.graph.node]
        assert "DequantizeLinear" in ops, (
            "DQ of quantized weights must stay for quantized kernels"
        )
        assert "RandomNormal" in ops
        assert "Cast" not in ops, "Cast of a plain constant is folded"
        assert "Add" in ops and ops.count("Add") == 2, (
            "an initializer that is a graph input is not a constant"
        )
        fed = np.full(3, 5.0, np.float32)
        got = _ort(out, {"d": fed})[0]
        np.testing.assert_array_equal(
            got, np.array([0.5, -1.0, 224.0], np.float32) + fed
        )

    def test_size_bound_keeps_expanding_nodes(self) -> None:
        scalar = nh.from_array(np.array([1.5], np.float32), "s")
        big = nh.from_array(
            np.array([1024, 1024 + 512], np.int64), "shape"
        )  # 6 MiB of float32
        nodes = [
            h.make_node("Expand", ["s", "shape"], ["e"]),
            h.make_node("Add", ["x", "e"], ["y"]),
        ]
        model = _model(
            nodes,
            [_vi("x", T.FLOAT, [1024, 1536])],
            [_vi("y", T.FLOAT, [1024, 1536])],
            [scalar, big],
        )
        out, steps = optimize(model)
        assert [n.op_type for n in out.graph.node] == ["Expand", "Add"]
        assert out.ByteSize() < 4096, (
            "a broadcast must not be materialized in the model"
        )
        assert not any(s.kind == "fold-constants" for s in steps)

    def test_subgraph_reads_keep_outer_producers(self) -> None:
        then_g = h.make_graph(
            [h.make_node("Neg", ["inner_src"], ["t"])],
            "then",
            [],
            [_vi("t", T.FLOAT, [2])],
        )
        else_g = h.make_graph(
            [h.make_node("Identity", ["x"], ["e"])],
            "else",
            [],
            [_vi("e", T.FLOAT, [2])],
        )
        nodes = [
            h.make_node("Relu", ["x"], ["relu"]),
            h.make_node(
                "Identity", ["relu"], ["inner_src"]
            ),  # read only inside the subgraph
            h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ]
        model = _model(
            nodes,
            [_vi("x", T.FLOAT, [2]), _vi("c", T.BOOL, [])],
            [_vi("y", T.FLOAT, [2])],
        )
        out, _ = optimize(model)
        assert [n.op_type for n in out.graph.node] == ["Relu", "Identity", "If"]
        x = np.array([-1.0, 2.0], np.float32)
        assert _ort(out, {"x": x, "c": np.array(True)})[0].tolist() == [0.0, -2.0]

    @pytest.mark.parametrize("seed", range(6))
    def test_generated_models_match(self, seed: int) -> None:
        """Random chains mixing constant and live branches: outputs equal before and after."""
        rng = np.random.default_rng(seed)
        inits = [
            nh.from_array(rng.standard_normal((4,)).astype(np.float32), f"c{i}")
            for i in range(4)
        ]
        live, const = ["x"], [f"c{i}" for i in range(4)]
        nodes = []
        ops = ["Add", "Mul", "Sub", "Max", "Min"]
        unary = ["Relu", "Neg", "Abs", "Identity", "Sigmoid", "Tanh"]
        for i in range(30):
            name = f"t{i}"
            if rng.random() < 0.3:
                nodes.append(
                    h.make_node(
                        str(rng.choice(unary)), [str(rng.choice(const + live))], [name]
                    )
                )
            else:
                a, b = rng.choice(const + live), rng.choice(const + live)
                nodes.append(
                    h.make_node(str(rng.choice(ops)), [str(a), str(b)], [name])
                )
            inputs = set(nodes[-1].input)
            (const if inputs <= set(const) else live).append(name)
        outputs = [_vi(live[-1], T.FLOAT, [4])]
        if len(live) > 3:
            outputs.append(_vi(live[len(live) // 2], T.FLOAT, [4]))
        model = _model(nodes, [_vi("x", T.FLOAT, [4])], outputs, inits)
        onnx.checker.check_model(model)
        out, _ = optimize(model)
        onnx.checker.check_model(out)
        assert len(out.graph.node) <= len(model.graph.node)
        x = rng.standard_normal(4).astype(np.float32)
        for a, b in zip(_ort(model, {"x": x}), _ort(out, {"x": x})):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# -- convert_opset -----------------------------------------------------------------------------


def _qdq_fp8(opset: int) -> onnx.ModelProto:
    scale = nh.from_array(np.array(0.25, np.float32), "scale")
    zero = h.make_tensor("zero", T.FLOAT8E4M3FN, [], [0])
    nodes = [
        h.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
        h.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"]),
    ]
    return _model(
        nodes,
        [_vi("x", T.FLOAT, [4, 8])],
        [_vi("y", T.FLOAT, [4, 8])],
        [scale, zero],
        opset=opset,
    )


def _conv_bn(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        nh.from_array((rng.random(4) + 0.5).astype(np.float32), "gamma"),
        nh.from_array(rng.random(4).astype(np.float32), "beta"),
        nh.from_array(rng.random(4).astype(np.float32), "mean"),
        nh.from_array((rng.random(4) + 0.5).astype(np.float32), "var"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node(
            "BatchNormalization",
            ["c", "gamma", "beta", "mean", "var"],
            ["bn"],
            epsilon=1e-5,
        ),
        h.make_node("Relu", ["bn"], ["y"]),
    ]
    model = _model(
        nodes,
        [_vi("x", T.FLOAT, [1, 3, 8, 8])],
        [_vi("y", T.FLOAT, [1, 4, 8, 8])],
        inits,
        opset=opset,
    )
    model.ir_version = 6
    return model


class TestConvertOpset:
    def test_qdq_opset28_down_to_25_runs_on_ort(self) -> None:
        model = _qdq_fp8(28)
        if runtime_limits().max_opset >= 28:  # older builds do not read opset 28 at all
            with pytest.raises(Exception, match="QuantizeLinear"):
                _ort(model, {"x": np.zeros((4, 8), np.float32)})  # why the conversion exists
        out, steps = convert_opset(model, CPU_CAPABILITIES.opsets)
        assert default_opset(out) == 25 and default_opset(model) == 28
        assert (
            len(steps) == 1
            and steps[0].kind == "convert-opset"
            and "28 -> 25" in steps[0].detail
        )
        x = _f32((4, 8)) * 100  # reaches fp8's saturation at 448 * 0.25
        expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
        np.testing.assert_array_equal(_ort(out, {"x": x})[0], expected)

    def test_conv_bn_opset11_up_to_17_identical_on_ort(self) -> None:
        model = _conv_bn(11)
        out, steps = convert_opset(model, OpsetRange(17, 25))
        assert default_opset(out) == 17
        assert "BatchNormalization" in steps[0].detail
        assert out.ir_version >= 8, "opset 17 needs IR 8"
        onnx.checker.check_model(out, full_check=True)
        x = _f32((1, 3, 8, 8))
        np.testing.assert_array_equal(_ort(model, {"x": x})[0], _ort(out, {"x": x})[0])

    def _cumprod(self, opset: int = 26) -> onnx.ModelProto:  # CumProd is new in opset 26
        return _model(
            [h.make_node("CumProd", ["x", "axis"], ["y"])],
            [_vi("x", T.FLOAT, [4])], [_vi("y", T.FLOAT, [4])],
            [h.make_tensor("axis", T.INT64, [], [0])], opset=opset,
        )

    def test_unconvertible_but_loadable_is_kept_as_is(self) -> None:
        model = self._cumprod()
        with pytest.raises(LoweringError, match="CumProd"):
            convert_opset(model, OpsetRange(7, 25))
        out, steps = convert_opset(model, OpsetRange(7, 25, max_loadable=26))
        assert out is model and [s.kind for s in steps] == ["convert-opset"]
        assert "kept at opset 26" in steps[0].detail and "reads up to 26" in steps[0].detail
        with pytest.raises(LoweringError, match="CumProd"):  # newer than the backend reads
            convert_opset(self._cumprod(27), OpsetRange(7, 25, max_loadable=26))

    @pytest.mark.skipif(runtime_limits().max_opset < 26, reason="this onnxruntime does not read opset 26")
    def test_opset26_operator_runs_on_ort_cpu(self) -> None:
        exe = hal.compile(self._cumprod()).to("ort:cpu", strict=True)
        assert "kept at opset 26" in exe.lowering[0].detail
        np.testing.assert_array_equal(exe.run({"x": np.array([1, 2, 3, 4], np.float32)})["y"], [1, 2, 6, 24])

    def test_in_range_is_untouched(self) -> None:
        model = _conv_bn(11)
        out, steps = convert_opset(model, OpsetRange(7, 25))
        assert out is model and steps == []

    def test_unchanged_schemas_only_rewrite_the_import(self) -> None:
        model = _model(
            [h.make_node("Relu", ["x"], ["r"]), h.make_node("Add", ["r", "x"], ["y"])],
            [_vi("x", T.FLOAT, [2])],
            [_vi("y", T.FLOAT, [2])],
            opset=28,
        )
        out, steps = convert_opset(model, OpsetRange(7, 25))
        assert default_opset(out) == 25
        assert "only the opset import" in steps[0].detail
        assert [n.op_type for n in out.graph.node] == ["Relu", "Add"]
        x = np.array([-1.0, 3.0], np.float32)
        assert _ort(out, {"x": x})[0].tolist() == [-1.0, 6.0]

    def test_impossible_conversion_raises_lowering_error(self) -> None:
        model = _qdq_fp8(28)  # fp8 QuantizeLinear cannot exist before opset 19
        with pytest.raises(LoweringError, match="opset 28 to 9"):
            convert_opset(model, OpsetRange(7, 9))


# -- legalize_formats --------------------------------------------------------------------------


def _bf16_matmul() -> onnx.ModelProto:
    nodes = [
        h.make_node("MatMul", ["a", "b"], ["m"]),
        h.make_node("MatMul", ["m", "b2"], ["y"]),
    ]
    return _model(
        nodes,
        [
            _vi("a", T.BFLOAT16, [3, 8]),
            _vi("b", T.BFLOAT16, [8, 8]),
            _vi("b2", T.BFLOAT16, [8, 5]),
        ],
        [_vi("y", T.BFLOAT16, [3, 5])],
    )


def _bf16_feeds() -> dict[str, np.ndarray]:
    return {
        "a": _f32((3, 8)).astype(ml_dtypes.bfloat16),
        "b": _f32((8, 8)).astype(ml_dtypes.bfloat16),
        "b2": _f32((8, 5)).astype(ml_dtypes.bfloat16),
    }


class TestLegalizeFormats:
    def test_bf16_matmul_runs_on_ort_cpu_and_matches(self) -> None:
        model = _bf16_matmul()
        with pytest.raises(Exception, match="MatMul"):
            _session(
                model
            )  # no bf16 MatMul kernel on onnxruntime CPU: why legalization exists
        out, steps = legalize_formats(model, CPU_CAPABILITIES)
        assert [s.detail for s in steps] == [
            "MatMul (2 nodes) computed in float32 instead of bfloat16: bfloat16 is storage-only on this device"
        ]
        feeds = _bf16_feeds()
        got = hal.compile(out).to("ort:cpu").run(feeds)["y"]
        assert got.dtype == ml_dtypes.bfloat16
        f = {k: v.astype(np.float32) for k, v in feeds.items()}
        m = (
            (f["a"] @ f["b"]).astype(ml_dtypes.bfloat16).astype(np.float32)
        )  # rounded after each node
        expected = (m @ f["b2"]).astype(ml_dtypes.bfloat16)
        np.testing.assert_allclose(
            got.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2
        )
        assert np.mean(got == expected) > 0.9

    def test_fp8_movement_reuses_exact_wide_copies(self) -> None:
        nodes = [
            h.make_node("Cast", ["x"], ["x8"], to=T.FLOAT8E4M3FN),
            h.make_node("Concat", ["x8", "x8"], ["c8"], axis=0),
            h.make_node("Transpose", ["c8"], ["t8"]),
            h.make_node("Add", ["t8", "t8"], ["y8"]),
            h.make_node("Cast", ["y8"], ["y"], to=T.FLOAT),
        ]
        model = _model(nodes, [_vi("x", T.FLOAT, [2, 3])], [_vi("y", T.FLOAT, [3, 4])])
        out, steps = legalize_formats(model, CPU_CAPABILITIES)
        details = " | ".join(s.detail for s in steps)
        assert (
            "Concat (1 node) moved in float32 instead of float8_e4m3fn (exact"
            in details
        )
        assert "Add (1 node) computed in float32 instead of float8_e4m3fn" in details
        casts = [n for n in out.graph.node if n.op_type == "Cast"]
        # x, x8 up, Add's result down (Concat's and Transpose's down-casts are not needed), y
        assert len(casts) == 4, onnx.printer.to_text(out.graph)
        x = np.array([[1.0, 2.5, -3.0], [100.0, 0.3, 7.0]], np.float32)
        x8 = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        expected = (
            (np.concatenate([x8, x8]).T * 2)
            .astype(ml_dtypes.float8_e4m3fn)
            .astype(np.float32)
        )
        np.testing.assert_array_equal(_ort(out, {"x": x})[0], expected)

    def test_movable_formats_keep_data_movement_narrow(self) -> None:
        nodes = [
            h.make_node("Transpose", ["x"], ["t"]),
            h.make_node("Add", ["t", "t"], ["y"]),
        ]
        model = _model(nodes, [_vi("x", T.FLOAT8E4M3FN, [2, 3])], [_vi("y", T.FLOAT8E4M3FN, [3, 2])])
        caps = evolve(CPU_CAPABILITIES, movable={"float8_e4m3fn"})
        out, steps = legalize_formats(model, caps)
        details = " | ".join(s.detail for s in steps)
        assert "Add (1 node) computed in float32" in details and "Transpose" not in details
        transpose = next(n for n in out.graph.node if n.op_type == "Transpose")
        assert list(transpose.input) == ["x"] and list(transpose.output) == ["t"]
        # Without the declaration the Transpose is moved through float32.
        _, steps = legalize_formats(model, CPU_CAPABILITIES)
        assert "Transpose (1 node) moved in float32" in " | ".join(s.detail for s in steps)

    def test_supported_model_is_returned_as_is(self) -> None:
        model = _model(
            [h.make_node("Add", ["x", "x"], ["y"])],
            [_vi("x", T.FLOAT16, [2])],
            [_vi("y", T.FLOAT16, [2])],
        )
        out, steps = legalize_formats(
            model, CPU_CAPABILITIES
        )  # float16 is emulated: fine
        assert out is model and steps == []

    def test_qdq_is_left_alone(self) -> None:
        model = _qdq_fp8(25)
        out, steps = legalize_formats(model, CPU_CAPABILITIES)
        assert out is model and steps == []

    def test_format_the_device_cannot_store_is_refused(self) -> None:
        model = _model(
            [h.make_node("Cast", ["w4"], ["y"], to=T.FLOAT)],
            [_vi("w4", T.FLOAT4E2M1, [4])],
            [_vi("y", T.FLOAT, [4])],
        )
        with pytest.raises(
            LoweringError, match=r"graph input 'w4' is float4_e2m1.*cannot even store"
        ):
            legalize_formats(model, CPU_CAPABILITIES)

    def test_float16_chosen_when_float32_is_missing(self) -> None:
        caps = Capabilities.from_levels(
            native=["float16", "int64"], storage=["float8_e5m2"]
        )
        model = _model(
            [h.make_node("Mul", ["x", "x"], ["y"])],
            [_vi("x", T.FLOAT8E5M2, [2])],
            [_vi("y", T.FLOAT8E5M2, [2])],
        )
        out, steps = legalize_formats(model, caps)
        assert "computed in float16 instead of float8_e5m2" in steps[0].detail
        assert [n.op_type for n in out.graph.node] == ["Cast", "Mul", "Cast"]
        assert out.graph.node[0].attribute[0].i == T.FLOAT16

    def test_no_wider_format_is_reported_not_rewritten(self) -> None:
        caps = Capabilities.from_levels(native=["float32"], storage=["bool"])
        model = _model(
            [h.make_node("Not", ["x"], ["y"])],
            [_vi("x", T.BOOL, [2])],
            [_vi("y", T.BOOL, [2])],
        )
        out, steps = legalize_formats(model, caps)
        assert [n.op_type for n in out.graph.node] == ["Not"]
        assert [s.kind for s in steps] == ["legalize-format-skipped"]

    def test_attribute_typed_outputs_are_widened(self) -> None:
        shape = nh.from_array(np.array([2, 3], np.int64), "shape")
        value = h.make_tensor("v", T.BFLOAT16, [1], [1.5])
        nodes = [
            h.make_node("ConstantOfShape", ["shape"], ["k"], value=value),
            h.make_node("Add", ["k", "x"], ["y"]),
        ]
        model = _model(
            nodes,
            [_vi("x", T.BFLOAT16, [2, 3])],
            [_vi("y", T.BFLOAT16, [2, 3])],
            [shape],
        )
        out, _ = legalize_formats(model, CPU_CAPABILITIES)
        onnx.checker.check_model(out, full_check=True)
        x = _f32((2, 3)).astype(ml_dtypes.bfloat16)
        got = hal.compile(out).to("ort:cpu").run({"x": x})["y"]
        np.testing.assert_array_equal(
            got, (x.astype(np.float32) + 1.5).astype(ml_dtypes.bfloat16)
        )

    def test_subgraph_bodies_are_legalized(self) -> None:
        then_g = h.make_graph(
            [h.make_node("MatMul", ["a", "a"], ["t"])],
            "then",
            [],
            [_vi("t", T.BFLOAT16, [2, 2])],
        )
        else_g = h.make_graph(
            [h.make_node("Add", ["a", "a"], ["e"])],
            "else",
            [],
            [_vi("e", T.BFLOAT16, [2, 2])],
        )
        nodes = [
            h.make_node("Relu", ["a0"], ["a"]),
            h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ]
        model = _model(
            nodes,
            [_vi("a0", T.BFLOAT16, [2, 2]), _vi("c", T.BOOL, [])],
            [_vi("y", T.BFLOAT16, [2, 2])],
        )
        out, steps = legalize_formats(model, CPU_CAPABILITIES)
        assert sorted(s.detail.split(" ")[0] for s in steps) == [
            "Add",
            "MatMul",
            "Relu",
        ]
        a = np.array([[1, -2], [3, 4]], np.float32)
        exe = hal.compile(out).to("ort:cpu")
        feeds = {"a0": a.astype(ml_dtypes.bfloat16)}
        relu = np.maximum(a, 0)
        got_then = exe.run({**feeds, "c": np.array(True)})["y"].astype(np.float32)
        got_else = exe.run({**feeds, "c": np.array(False)})["y"].astype(np.float32)
        np.testing.assert_array_equal(got_then, relu @ relu)
        np.testing.assert_array_equal(got_else, relu + relu)

    def test_unknown_output_type_is_an_error_not_a_guess(self) -> None:
        nodes = [
            h.make_node("Mystery", ["x"], ["t"], domain="com.example"),
            h.make_node("Cast", ["t"], ["y"], to=T.FLOAT),
        ]
        model = _model(nodes, [_vi("x", T.BFLOAT16, [2])], [_vi("y", T.FLOAT, [2])])
        model.opset_import.append(h.make_opsetid("com.example", 1))
        with pytest.raises(LoweringError, match=r"Mystery.*'t'.*unknown"):
            legalize_formats(model, CPU_CAPABILITIES)


class TestLowerFor:
    def test_opset28_bf16_and_qdq_model_runs_on_cpu(self) -> None:
        scale = nh.from_array(np.array(0.5, np.float32), "scale")
        nodes = [
            h.make_node(
                "QuantizeLinear", ["x", "scale"], ["q"], output_dtype=T.FLOAT8E4M3FN
            ),
            h.make_node("DequantizeLinear", ["q", "scale"], ["dq"]),
            h.make_node("Cast", ["dq"], ["dq16"], to=T.BFLOAT16),
            h.make_node("MatMul", ["dq16", "w"], ["y"]),
        ]
        model = _model(
            nodes,
            [_vi("x", T.FLOAT, [2, 4]), _vi("w", T.BFLOAT16, [4, 3])],
            [_vi("y", T.BFLOAT16, [2, 3])],
            [scale],
            opset=28,
        )
        out, steps = lower_for(model, CPU_CAPABILITIES)
        assert [s.kind for s in steps] == ["convert-opset", "legalize-format"]
        x = _f32((2, 4))
        w = _f32((4, 3)).astype(ml_dtypes.bfloat16)
        got = hal.compile(out).to("ort:cpu").run({"x": x, "w": w})["y"]
        xq = (x / 0.5).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * 0.5
        expected = (
            xq.astype(ml_dtypes.bfloat16).astype(np.float32) @ w.astype(np.float32)
        ).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got, expected)


class TestDomains:
    """An operator from a domain the device does not declare makes the verdict "cannot", from the
    device's Capabilities.opsets, before any backend is asked."""

    @staticmethod
    def _acme(*, function: bool = False, in_branch: bool = False) -> onnx.ModelProto:
        double = h.make_node("Double", ["x"], ["y"], domain="com.acme")
        if in_branch:
            branch = h.make_graph([double], "then", [], [_vi("y", T.FLOAT, [4])])
            neg = h.make_graph([h.make_node("Neg", ["x"], ["y"])], "else", [], [_vi("y", T.FLOAT, [4])])
            nodes = [h.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=neg)]
            inputs = [_vi("x", T.FLOAT, [4]), _vi("c", T.BOOL, [])]
        else:
            nodes, inputs = [double], [_vi("x", T.FLOAT, [4])]
        graph = h.make_graph(nodes, "acme", inputs, [_vi("y", T.FLOAT, [4])])
        functions = []
        if function:
            functions = [h.make_function("com.acme", "Double", ["x"], ["y"], [h.make_node("Add", ["x", "x"], ["y"])],
                                         [h.make_opsetid("", 17)])]
        return h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.acme", 1)],
                            functions=functions, ir_version=9)

    @pytest.mark.parametrize("in_branch", [False, True])
    def test_an_undeclared_domain_is_refused_naming_the_operators(self, in_branch: bool) -> None:
        with pytest.raises(LoweringError, match="com.acme.Double are from a domain the device does not declare") as info:
            lower_for(self._acme(in_branch=in_branch), CPU_CAPABILITIES)
        assert info.value.operators == ("com.acme.Double",)

    def test_a_declared_domain_is_lowered_as_is(self) -> None:
        caps = evolve(CPU_CAPABILITIES, opsets=evolve(CPU_CAPABILITIES.opsets, domains=("com.microsoft", "com.acme")))
        model = self._acme()
        assert lower_for(model, caps) == (model, [])

    def test_a_model_function_of_that_domain_is_the_models_own(self) -> None:
        model = self._acme(function=True)
        out, steps = lower_for(model, CPU_CAPABILITIES)
        assert steps == []
        x = np.arange(4, dtype=np.float32)
        np.testing.assert_array_equal(hal.compile(out).to("ort:cpu", fallback=None).run({"x": x})["y"], 2 * x)

    def test_onnx_ml_is_onnx_own(self) -> None:
        model = h.make_model(
            h.make_graph([h.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)], "ml",
                         [_vi("x", T.FLOAT, [4])], [_vi("y", T.FLOAT, [4])]),
            opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.ml", 3)], ir_version=9,
        )
        assert lower_for(model, CPU_CAPABILITIES)[1] == []

    def test_ort_cpu_declares_onnxruntime_contrib_operators_and_runs_them(self) -> None:
        cpu = next(d for d in hal.devices() if d.id == "ort:cpu")
        assert "com.microsoft" in cpu.capabilities.opsets.domains  # kept through fit_capabilities
        model = h.make_model(
            h.make_graph([h.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "gelu",
                         [_vi("x", T.FLOAT, [3])], [_vi("y", T.FLOAT, [3])]),
            opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)], ir_version=9,
        )
        y = hal.compile(model).to("ort:cpu", fallback=None).run({"x": np.array([-1, 0, 1], np.float32)})["y"]
        np.testing.assert_allclose(y, [-0.158655, 0, 0.841345], rtol=1e-5, atol=1e-6)

    def test_domains_survive_json(self) -> None:
        caps = evolve(CPU_CAPABILITIES, opsets=OpsetRange(7, 25, domains=["com.acme"]))
        back = Capabilities.from_json(caps.to_json())
        assert back.opsets.domains == ("com.acme",) and back == caps


class TestDeepGraphs:
    @staticmethod
    def _nested(depth: int) -> onnx.ModelProto:
        """If inside If, ``depth`` levels, built in place (copying would hit protobuf's depth limit)."""
        model = onnx.ModelProto(ir_version=9)
        model.opset_import.add(domain="", version=17)
        leaf = h.make_graph([h.make_node("Constant", [], ["y"], value=nh.from_array(np.ones(1, np.float32)))], "leaf", [],
                            [_vi("y", T.FLOAT, [1])])
        graph = model.graph
        graph.name = "top"
        graph.input.append(_vi("c", T.BOOL, []))
        for level in range(depth):
            graph.output.append(_vi("y", T.FLOAT, [1]))
            node = graph.node.add(op_type="If", input=["c"], output=["y"])
            node.attribute.add(name="else_branch", type=onnx.AttributeProto.GRAPH).g.CopyFrom(leaf)
            graph = node.attribute.add(name="then_branch", type=onnx.AttributeProto.GRAPH).g
            graph.name = f"level{level}"
        graph.CopyFrom(leaf)
        return model

    def test_a_thousand_levels_is_a_model_error_not_a_recursion_error(self) -> None:
        with pytest.raises(hal.errors.ModelError, match=f"more than {MAX_GRAPH_DEPTH} levels deep"):
            hal.compile(self._nested(1000))

    def test_the_deepest_accepted_nesting_compiles_and_runs(self) -> None:
        deepest = hal.compile(self._nested(MAX_GRAPH_DEPTH))
        # onnxruntime-cann 1.24 (py311-ascend) builds a session in time exponential in If nesting
        # (0.3 s at 16 levels, x1.7 per level: hours at 30); 1.31 and 1.32 take milliseconds.
        # The HAL's part (load, checks, lowering) is the same at every depth; the run goes as
        # deep as the installed onnxruntime can go in reasonable time.
        import onnxruntime

        version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
        compiled = deepest if version >= (1, 31) else hal.compile(self._nested(12))
        exe = compiled.to("ort:cpu", fallback=None)
        assert exe.run({"c": np.array(True)})["y"].tolist() == [1.0]


class TestFitIrVersion:
    """Older onnxruntime builds (gpu 1.31, cann 1.24) read at most IR 13; onnx 1.23 writes 14."""

    def _add(self, elem: int = T.FLOAT, ir: int = 14, opset: int = 21) -> onnx.ModelProto:
        model = _model(
            [h.make_node("Identity", ["x"], ["y"])], [_vi("x", elem, [2])], [_vi("y", elem, [2])], opset=opset
        )
        model.ir_version = ir
        return model

    def test_lowers_when_nothing_needs_the_newer_ir(self) -> None:
        model = self._add()
        out, steps = fit_ir_version(model, 13)
        assert out.ir_version == 13 and model.ir_version == 14, "the input proto is never modified"
        assert [s.kind for s in steps] == ["ir-version"]
        assert "14 -> 13" in steps[0].detail
        onnx.checker.check_model(out, full_check=True)

    def test_within_the_limit_is_untouched(self) -> None:
        model = self._add(ir=10)
        assert fit_ir_version(model, 13) == (model, [])
        assert fit_ir_version(model, None) == (model, [])

    @pytest.mark.parametrize(
        ("elem", "needs"), [(T.FLOAT6E2M3, 14), (T.INT2, 13), (T.FLOAT8E8M0, 12), (T.FLOAT4E2M1, 11)]
    )
    def test_refuses_types_the_older_ir_lacks(self, elem: int, needs: int) -> None:
        with pytest.raises(LoweringError, match=rf"IR version {needs} for {T.DataType.Name(elem)}"):
            fit_ir_version(self._add(elem), needs - 1)

    def test_refuses_opsets_the_older_ir_lacks(self) -> None:
        with pytest.raises(LoweringError, match="opset imports"):
            fit_ir_version(self._add(opset=21), 9)  # opset 21 needs IR 10

    def test_type_inside_a_subgraph_counts(self) -> None:
        then = h.make_graph(
            [h.make_node("Cast", ["x"], ["t"], to=T.FLOAT8E8M0), h.make_node("Cast", ["t"], ["o"], to=T.FLOAT)],
            "then", [], [_vi("o", T.FLOAT, [2])],
        )
        other = h.make_graph([h.make_node("Identity", ["x"], ["o2"])], "else", [], [_vi("o2", T.FLOAT, [2])])
        model = _model(
            [h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
            [_vi("c", T.BOOL, []), _vi("x", T.FLOAT, [2])], [_vi("y", T.FLOAT, [2])], opset=21,
        )
        model.ir_version = 14
        with pytest.raises(LoweringError, match="FLOAT8E8M0"):
            fit_ir_version(model, 11)

    def test_lower_for_applies_the_device_limit(self) -> None:
        caps = evolve(CPU_CAPABILITIES, opsets=OpsetRange(7, 25, max_ir_version=13))
        out, steps = lower_for(self._add(), caps)
        assert out.ir_version == 13 and [s.kind for s in steps] == ["ir-version"]

    def test_runtime_limits_are_what_onnxruntime_loads(self) -> None:
        limits = runtime_limits()
        assert limits.version == ort.__version__
        _session(self._add(ir=limits.max_ir_version))  # loads
        if limits.max_ir_version < onnx.IR_VERSION:
            with pytest.raises(Exception, match="IR version"):
                ort.InferenceSession(self._add(ir=limits.max_ir_version + 1).SerializeToString())
