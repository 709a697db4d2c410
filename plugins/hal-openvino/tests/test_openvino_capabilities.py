"""The declared format table holds in practice on this machine's openvino:CPU.

Levels are checked by behaviour: native/emulated formats compute (and, for bfloat16, the runtime
model shows whether OpenVINO really computes MatMul in bf16); storage formats convert and
dequantize but are refused for compute; none formats are refused outright.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from ov_models import make, vi

import hal
from hal.errors import CompileError
from hal.plugin import CompileOptions, LoweredModel, NumberFormat, backend, pack


def _matmul_precisions(exe) -> set[str]:
    ops = exe.runner.compiled.get_runtime_model().get_ops()
    return {
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in ops
        if op.get_rt_info()["layerType"].astype(str) in ("MatMul", "FullyConnected")
    }


def _matmul(fmt: NumberFormat):
    t = fmt.onnx_type
    return make([helper.make_node("MatMul", ["a", "b"], ["y"])], [vi("a", t, [4, 8]), vi("b", t, [8, 4])], [vi("y", t, [4, 4])])


def _narrow_types(cpu) -> set[str]:
    """OpenVINO type names of the narrower float types the device reports computing natively."""
    optimization = dict(cpu.details)["optimization_capabilities"].split(",")
    return {ov for cap, ov in (("BF16", "bf16"), ("FP16", "f16")) if cap in optimization}


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16", "int8", "int32"])
def test_compute_formats_compute(cpu, fmt):
    fmt = NumberFormat(fmt)
    level = cpu.capabilities.support(fmt)
    assert level in (hal.Support.NATIVE, hal.Support.EMULATED)
    rng = np.random.default_rng(0)
    if fmt.is_float:
        a, b = (rng.uniform(-2, 2, s).astype(np.float32).astype(fmt.dtype) for s in ((4, 8), (8, 4)))
    else:
        a, b = (rng.integers(-3, 3, s).astype(fmt.dtype) for s in ((4, 8), (8, 4)))
    # Checked against float64 here, with a tolerance that allows the reduced precision asked for.
    exe = hal.compile(_matmul(fmt)).to("openvino:CPU", reduced_precision=True, strict=True, verify=False)
    y = exe.run({"a": a, "b": b})["y"]
    assert y.dtype == fmt.dtype
    want = (a.astype(np.float64) @ b.astype(np.float64)).astype(fmt.dtype)
    np.testing.assert_allclose(y.astype(np.float64), want.astype(np.float64), rtol=2e-2, atol=2e-2)
    precisions = _matmul_precisions(exe)
    if fmt is NumberFormat.BFLOAT16:
        # native means OpenVINO computes the MatMul in bf16; emulated means it up-casts to f32.
        assert ("bf16" in precisions) == (level is hal.Support.NATIVE), precisions
    if fmt is NumberFormat.INT8:
        assert precisions == {"i8"}, precisions
    if fmt is NumberFormat.FLOAT32:
        # Reduced precision lets OpenVINO compute f32 in a narrower type the device has (bf16 on
        # AVX-512 BF16 and AMX CPUs); the runner reports what it chose, and the MatMul runs in it.
        chosen = exe.runner.inference_precision
        assert chosen in {"f32"} | _narrow_types(cpu), (chosen, dict(cpu.details))
        assert precisions == {chosen}, (precisions, chosen)
        # At the default (exact) precision it is f32 on every CPU.
        exact = hal.compile(_matmul(fmt)).to("openvino:CPU", strict=True)
        assert exact.runner.inference_precision == "f32"
        assert _matmul_precisions(exact) == {"f32"}


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0"])
def test_fp8_is_storage(cpu, fmt):
    fmt = NumberFormat(fmt)
    assert cpu.capabilities.support(fmt) is hal.Support.STORAGE
    # Converts: Cast there and back is exact for representable values, and raw fp8 I/O works.
    values = np.array([0.5, 1.0, 2.0, 4.0] if fmt is NumberFormat.FLOAT8_E8M0 else [-3.0, -0.5, 0.0, 1.75], np.float32)
    opset = 25 if fmt is NumberFormat.FLOAT8_E8M0 else 21
    cast = make(
        [helper.make_node("Cast", ["x"], ["c"], to=fmt.onnx_type), helper.make_node("Cast", ["c"], ["y"], to=1)],
        [vi("x", 1, [4])], [vi("y", 1, [4])], opset=opset,
    )
    np.testing.assert_array_equal(hal.compile(cast).to("openvino:CPU").run({"x": values})["y"], values)
    ident = make([helper.make_node("Identity", ["x"], ["y"])], [vi("x", fmt.onnx_type, [4])], [vi("y", fmt.onnx_type, [4])], opset=opset)
    raw = values.astype(fmt.dtype)
    out = hal.compile(ident).to("openvino:CPU").run({"x": raw})["y"]
    assert out.dtype == fmt.dtype and out.tobytes() == raw.tobytes()
    # Does not compute: OpenVINO itself refuses an elementwise Add in the format ...
    add = make([helper.make_node("Add", ["x", "x"], ["y"])], [vi("x", fmt.onnx_type, [4])], [vi("y", fmt.onnx_type, [4])], opset=opset)
    with pytest.raises(CompileError, match="openvino:CPU"):
        backend("openvino").prepare(LoweredModel.from_proto(add), cpu, CompileOptions())
    # ... so lowering computes it in float32 and rounds back, on OpenVINO (strict: no fallback).
    exe = hal.compile(add).to("openvino:CPU", strict=True)
    assert [s.kind for s in exe.lowering if s.kind not in ("verified", "unverified")] == ["legalize-format"]
    assert exe.verification.passed
    assert [p.device for p in exe.placement] == ["openvino:CPU"]
    out = exe.run({"x": raw})["y"]
    np.testing.assert_array_equal(out.astype(np.float32), (values + values).astype(fmt.dtype).astype(np.float32))


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0", "int4", "uint4"])
def test_movable_formats_move_exactly_without_widening(cpu, fmt):
    """Declared movable: Reshape, Transpose, Slice and Gather run in the narrow format itself."""
    fmt = NumberFormat(fmt)
    assert fmt in cpu.capabilities.movable
    t = fmt.onnx_type
    model = make(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
            helper.make_node("Slice", ["t", "starts", "ends"], ["s"]),
            helper.make_node("Gather", ["s", "idx"], ["y"], axis=1),
        ],
        [vi("x", t, [4, 6])], [vi("y", t, [5, 2])],
        [
            helper.make_tensor("shape", TensorProto.INT64, [2], [3, 8]),
            helper.make_tensor("starts", TensorProto.INT64, [1], [1]),
            helper.make_tensor("ends", TensorProto.INT64, [1], [6]),
            helper.make_tensor("idx", TensorProto.INT64, [2], [2, 0]),
        ],
        opset=23,
    )
    pool = [0.5, 1.0, 2.0, 4.0] if fmt is NumberFormat.FLOAT8_E8M0 else [-4, -1, 0, 1, 3, 6]
    x = np.array([pool[i % len(pool)] for i in range(24)], np.float32).reshape(4, 6)
    x = np.abs(x) if fmt is NumberFormat.UINT4 else x
    x = x.astype(fmt.dtype)
    exe = hal.compile(model).to("openvino:CPU", strict=True)
    assert not [s for s in exe.lowering if s.kind == "legalize-format"], exe.lowering
    want = x.reshape(3, 8).T[1:6][:, [2, 0]]
    got = exe.run({"x": x})["y"]
    assert got.dtype == fmt.dtype and got.tobytes() == np.ascontiguousarray(want).tobytes()


def test_fp8_cast_ignores_saturate(cpu):
    """Declared in the stability notes; if OpenVINO starts honouring saturate, update them."""
    assert any("saturate" in note for note in cpu.capabilities.stability.incompatibilities)
    cast = make(
        [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT8E4M3FN, saturate=1), helper.make_node("Cast", ["c"], ["y"], to=1)],
        [vi("x", 1, [1])], [vi("y", 1, [1])],
    )
    out = hal.compile(cast).to("openvino:CPU").run({"x": np.array([1000.0], np.float32)})["y"]
    assert np.isnan(out[0]), out  # ONNX says 448


@pytest.mark.parametrize("fmt", ["float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_none_formats_are_refused(cpu, fmt):
    fmt = NumberFormat(fmt)
    assert cpu.capabilities.support(fmt) is hal.Support.NONE
    cast = make(
        [helper.make_node("Cast", ["x"], ["c"], to=fmt.onnx_type), helper.make_node("Cast", ["c"], ["y"], to=1)],
        [vi("x", 1, [4])], [vi("y", 1, [4])],
    )
    with pytest.raises(CompileError):
        hal.compile(cast).to("openvino:CPU", strict=True)


def test_int64_small_values_round_trip(cpu):
    assert cpu.capabilities.support("int64") is hal.Support.STORAGE
    ident = make([helper.make_node("Identity", ["x"], ["y"])], [vi("x", TensorProto.INT64, [3])], [vi("y", TensorProto.INT64, [3])])
    x = np.array([-(2**31), 0, 2**31 - 1], np.int64)
    np.testing.assert_array_equal(hal.compile(ident).to("openvino:CPU").run({"x": x})["y"], x)


def _scaled_model(scaled, k: int = 256, n: int = 8, opset: int = 28):
    """x[2,k] @ DequantizeLinear(q[k,n], scale[k/block,n], block along k); returns model, x, reference."""
    rng = np.random.default_rng(1)
    elem, scale_fmt, block = scaled.element, scaled.scale, scaled.block[-1]
    q = rng.uniform(-3, 3, (k, n)).astype(np.float32).astype(elem.dtype)
    if scale_fmt is NumberFormat.FLOAT8_E8M0:
        scale = (2.0 ** rng.integers(-3, 3, (k // block, n))).astype(np.float32).astype(scale_fmt.dtype)
    else:
        scale = rng.uniform(0.1, 1.0, (k // block, n)).astype(scale_fmt.dtype)
    raw_q = pack(q, elem).tobytes() if elem.bits < 8 else q.view(np.uint8).tobytes()
    inits = [
        helper.make_tensor("q", elem.onnx_type, [k, n], raw_q, raw=True),
        helper.make_tensor("s", scale_fmt.onnx_type, list(scale.shape), scale.reshape(-1).view(np.uint8).tobytes(), raw=True),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=block)]
    if scale_fmt is not NumberFormat.FLOAT32:
        nodes.append(helper.make_node("Cast", ["w"], ["wf"], to=1))
    nodes.append(helper.make_node("MatMul", ["x", nodes[-1].output[0]], ["y"]))
    model = make(nodes, [vi("x", 1, [2, k])], [vi("y", 1, [2, n])], inits, opset=opset)
    x = rng.standard_normal((2, k)).astype(np.float32)
    w = q.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=0)
    return model, x, x.astype(np.float64) @ w


def test_declared_scaled_formats_run_exactly(cpu):
    """At the default precision block-dequantized weights give float32 answers: OpenVINO's CPU
    plugin would otherwise quantize the MatMul's activations to int8 on the fly (dynamic
    quantization, 6e-3 off relative to the largest output on VNNI CPUs). That CPU is not needed
    to check the setting: the compiled model reports it."""
    assert cpu.capabilities.scaled
    for scaled in cpu.capabilities.scaled:
        opset = 28 if scaled.scale is NumberFormat.FLOAT8_E8M0 or scaled.element is NumberFormat.FLOAT4_E2M1 else 21
        model, x, want = _scaled_model(scaled, opset=opset)
        # Checked against float64 numpy here (placement's own verification is not under test).
        exe = hal.compile(model).to("openvino:CPU", strict=True, verify=False)
        assert exe.runner.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0, scaled
        got = exe.run({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=str(scaled))


@pytest.mark.parametrize("fmt", ["int4", "uint4", "float4_e2m1"])
def test_four_bit_io_round_trips(cpu, fmt):
    """4-bit storage formats move in and out exactly (packed as ONNX packs them; odd sizes too)."""
    fmt = NumberFormat(fmt)
    assert cpu.capabilities.support(fmt) is hal.Support.STORAGE
    x = (np.arange(15) % 7).reshape(3, 5).astype(fmt.dtype)
    if fmt not in cpu.capabilities.movable:
        # float4: not movable and Cast to it is refused, so only the input direction exists.
        assert fmt is NumberFormat.FLOAT4_E2M1
        to_f32 = make([helper.make_node("Cast", ["x"], ["y"], to=1)], [vi("x", fmt.onnx_type, [3, 5])], [vi("y", 1, [3, 5])], opset=23)
        y = hal.compile(to_f32).to("openvino:CPU", strict=True).run({"x": x})["y"]
        np.testing.assert_array_equal(y, x.astype(np.float32))
        transpose = make([helper.make_node("Transpose", ["x"], ["y"])], [vi("x", fmt.onnx_type, [3, 5])], [vi("y", fmt.onnx_type, [5, 3])], opset=23)
        with pytest.raises(CompileError, match="Cast to float4_e2m1"):  # refused, never a wrong answer
            hal.compile(transpose).to("openvino:CPU", strict=True)
        return
    ident = make([helper.make_node("Identity", ["x"], ["y"])], [vi("x", fmt.onnx_type, [3, 5])], [vi("y", fmt.onnx_type, [3, 5])], opset=23)
    y = hal.compile(ident).to("openvino:CPU", strict=True).run({"x": x})["y"]
    assert y.dtype == fmt.dtype and y.tobytes() == x.tobytes()


def test_float64_compute_is_refused_at_exact_precision_and_accepted_when_reduced(cpu):
    """float64 is declared storage-only (the CPU plugin computes it in float32): at the default
    precision verification refuses the answer and says how to accept it; with
    reduced_precision=True it passes, held to the reduced-precision tolerance."""
    from hal.errors import VerificationError

    exp = make([helper.make_node("Exp", ["x"], ["y"])], [vi("x", TensorProto.DOUBLE, [64])], [vi("y", TensorProto.DOUBLE, [64])])
    x = np.linspace(-3.0, 3.0, 64)
    x.flags.writeable = False
    compiled = hal.compile(exp)
    level = cpu.capabilities.support("float64")
    if level.at_least(hal.Support.EMULATED):  # a future plugin that computes float64 as float64
        np.testing.assert_allclose(compiled.to("openvino:CPU", strict=True).run({"x": x})["y"], np.exp(x), rtol=1e-12)
        return
    with pytest.raises(VerificationError, match="reduced_precision=True") as refused:
        compiled.to("openvino:CPU", strict=True)
    assert "float64" in str(refused.value)
    exe = compiled.to("openvino:CPU", strict=True, reduced_precision=True)
    assert exe.verification.passed, exe.verification.summary()
    (check,) = exe.verification.checks
    tol = check.tolerance  # the reduced-precision tolerance the verdict held float64 to
    assert tol.rtol > 1e-6, tol
    got = exe.run({"x": x})["y"]
    assert got.dtype == np.float64
    want = np.exp(x)
    assert np.abs(got - want).max() <= tol.atol + tol.rtol * np.abs(want).max()
    assert np.abs(got - want).max() > 0  # computed narrower: the refusal above was about something real
