"""The declared llvm-cpu format table holds: formats declared runnable run and give the right
numbers; formats declared none are refused with a CompileError."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from iree_helpers import make, to_strict
from onnx import TensorProto, helper

import hal
from hal.errors import CompileError
from hal.plugin import NumberFormat, Support
from hal_iree.backend import cpu_capabilities, host_cpu_flags

DEVICE = "iree:local-task"


@pytest.fixture(scope="module")
def caps():  # type: ignore[no-untyped-def]
    device = hal.device(DEVICE) if hasattr(hal, "device") else next(d for d in hal.devices() if d.id == DEVICE)
    return device.capabilities


def test_table_follows_the_host_cpu(caps) -> None:  # type: ignore[no-untyped-def]
    assert caps.formats == cpu_capabilities(host_cpu_flags()).formats
    with_bf16 = cpu_capabilities(frozenset({"avx512_bf16", "avx512fp16"}))
    assert with_bf16.support("bfloat16") is Support.NATIVE
    assert with_bf16.support("float16") is Support.NATIVE
    assert cpu_capabilities(frozenset()).support("bfloat16") is Support.EMULATED


def _binary(op: str, fmt: NumberFormat, a_shape: list[int], b_shape: list[int], out_shape: list[int]):  # type: ignore[no-untyped-def]
    t = fmt.onnx_type
    return make(
        [helper.make_node(op, ["a", "b"], ["y"])],
        [("a", t, a_shape), ("b", t, b_shape)],
        [("y", t, out_shape)],
        opset=21,
    )


@pytest.mark.parametrize(
    ("fmt", "rtol"),
    [
        (NumberFormat.FLOAT32, 1e-5),
        (NumberFormat.FLOAT16, 2e-2),
        (NumberFormat.BFLOAT16, 5e-2),
        (NumberFormat.INT32, 0),
        (NumberFormat.INT64, 0),
    ],
)
def test_declared_matmul_formats_compute(caps, fmt: NumberFormat, rtol: float) -> None:  # type: ignore[no-untyped-def]
    assert caps.support(fmt).at_least(Support.EMULATED)
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 4, (4, 16)) if not fmt.is_float else rng.standard_normal((4, 16))
    b = rng.integers(-3, 4, (16, 8)) if not fmt.is_float else rng.standard_normal((16, 8))
    a, b = a.astype(fmt.dtype), b.astype(fmt.dtype)
    y = to_strict(hal.compile(_binary("MatMul", fmt, [4, 16], [16, 8], [4, 8])), DEVICE).run({"a": a, "b": b})["y"]
    assert y.dtype == fmt.dtype
    want = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=rtol, atol=rtol * 4)


@pytest.mark.parametrize("fmt", [NumberFormat.FLOAT8_E4M3FN, NumberFormat.FLOAT8_E5M2, NumberFormat.INT8, NumberFormat.BOOL])
def test_declared_elementwise_formats_compute(caps, fmt: NumberFormat) -> None:  # type: ignore[no-untyped-def]
    assert caps.support(fmt).at_least(Support.EMULATED)
    rng = np.random.default_rng(1)
    if fmt is NumberFormat.BOOL:
        a, b = rng.random((4, 8)) > 0.5, rng.random((4, 8)) > 0.5
        model, want = _binary("Or", fmt, [4, 8], [4, 8], [4, 8]), None
    else:
        raw_a = rng.uniform(-4, 4, (4, 8)) if fmt.is_float else rng.integers(-50, 50, (4, 8))
        raw_b = rng.uniform(-4, 4, (4, 8)) if fmt.is_float else rng.integers(-50, 50, (4, 8))
        a, b = raw_a.astype(fmt.dtype), raw_b.astype(fmt.dtype)
        model = _binary("Add", fmt, [4, 8], [4, 8], [4, 8])
        # The exact sum rounded once to the format: what an up-casting implementation gives.
        want = (a.astype(np.float64) + b.astype(np.float64)).astype(fmt.dtype)
    y = to_strict(hal.compile(model), DEVICE).run({"a": a, "b": b})["y"]
    assert y.dtype == fmt.dtype
    if want is None:
        np.testing.assert_array_equal(y, a | b)
    else:
        np.testing.assert_array_equal(y.astype(np.float64), want.astype(np.float64))


@pytest.mark.parametrize("fmt", [NumberFormat.FLOAT4_E2M1, NumberFormat.INT4, NumberFormat.FLOAT8_E8M0])
def test_formats_declared_none_are_refused(caps, fmt: NumberFormat) -> None:  # type: ignore[no-untyped-def]
    assert caps.support(fmt) is Support.NONE
    model = make(
        [helper.make_node("Cast", ["x"], ["y"], to=fmt.onnx_type)],
        [("x", TensorProto.FLOAT, [4])],
        [("y", fmt.onnx_type, [4])],
        opset=25,
    )
    with pytest.raises(CompileError):
        to_strict(hal.compile(model), DEVICE)


def test_fp8_dtype_is_ml_dtypes() -> None:
    assert NumberFormat.FLOAT8_E4M3FN.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
