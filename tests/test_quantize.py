"""FP8 quantization (issue 12): hal.fp8's conversions against ml_dtypes and onnx's reference,
hal.quantize.fp8 / requantize / accuracy / save, and `hal quantize`.

Expectations come from ml_dtypes, onnx's own reference functions and ReferenceEvaluator, or are
derived in the test from the definitions; none is a number the code printed.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import hal
import hal.quantize as hq
from hal import fp8
from hal.cli import main
from hal.errors import InputError, ModelError, SettingError
from hal.testing import models
from hal.testing.build import make_model

FORMATS = ["e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz"]
ONNX_FP8 = {
    "e4m3fn": TensorProto.FLOAT8E4M3FN,
    "e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ,
    "e5m2": TensorProto.FLOAT8E5M2,
    "e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ,
}
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
has_e8m0_reference = pytest.mark.skipif(
    not hasattr(onnx.numpy_helper, "to_float8e8m0"), reason="this onnx has no float8e8m0 reference"
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bytes, or both NaN (each format has one or two NaN patterns)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    return bool(np.all((a.view(np.uint8) == b.view(np.uint8)) | (np.isnan(fa) & np.isnan(fb))))


def float32_from_bits(bits: list[int]) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


SPECIALS = float32_from_bits(
    [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 1, 0x807FFFFF, 0x00400000, 0x7F7FFFFF, 0xFF7FFFFF]
)


# -- hal.fp8: FP8 element conversions ----------------------------------------------------------


class TestCast:
    @pytest.mark.parametrize("fmt", FORMATS)
    @HYPOTHESIS
    @given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
    def test_saturate_is_onnx_reference(self, fmt, bits):
        x = float32_from_bits(bits)
        dtype = fp8.dtype_of(fmt)
        assert same_bits(fp8.saturate_cast(x, fmt), onnx.numpy_helper.saturate_cast(x, dtype))

    @pytest.mark.parametrize("fmt", FORMATS)
    @HYPOTHESIS
    @given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
    def test_no_saturate_is_ml_dtypes(self, fmt, bits):
        x = float32_from_bits(bits)
        assert same_bits(fp8.cast(x, fmt, saturate=False), x.astype(fp8.dtype_of(fmt)))

    @pytest.mark.parametrize("fmt", FORMATS)
    @HYPOTHESIS
    @given(x=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=32))
    def test_float64_rounds_once(self, fmt, x):
        values = np.array(x, dtype=np.float64)
        dtype = fp8.dtype_of(fmt)
        top = float(ml_dtypes.finfo(dtype).max)
        assert same_bits(fp8.saturate_cast(values, fmt), np.clip(values, -top, top).astype(dtype))

    def test_float64_is_not_rounded_through_float32(self):
        # Just above the midpoint of 1 and 1.125: float32 rounds it onto the midpoint (then to 1).
        x = np.array([1.0 + 2.0**-4 + 2.0**-40])
        assert fp8.saturate_cast(x, "e4m3fn").astype(np.float32)[0] == 1.125

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_onnx_cast_node(self, fmt):
        rng = np.random.default_rng(0)
        x = np.concatenate([SPECIALS, rng.standard_normal(500).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 500)])
        x = x.astype(np.float32)
        node = helper.make_node("Cast", ["x"], ["y"], to=ONNX_FP8[fmt], saturate=1)
        model = make_model([node], [("x", TensorProto.FLOAT, [x.size])], [("y", ONNX_FP8[fmt], [x.size])], opset=21)
        (want,) = ReferenceEvaluator(model).run(None, {"x": x})
        assert same_bits(fp8.saturate_cast(x, fmt), want)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_semantics(self, fmt):
        dtype = fp8.dtype_of(fmt)
        info = ml_dtypes.finfo(dtype)
        top = float(info.max)
        got = fp8.saturate_cast(np.array([np.inf, -np.inf, np.nan, 2 * top, -2 * top, -0.0, float(info.smallest_subnormal)], np.float32), fmt)
        values = got.astype(np.float32)
        assert list(values[:2]) == [top, -top] and np.isnan(values[2]) and list(values[3:5]) == [top, -top]
        assert values[6] == float(info.smallest_subnormal)
        negative_zero = got[5:6].view(np.uint8)[0]
        assert negative_zero == (0x00 if fmt.endswith("fnuz") else 0x80)
        assert top == fp8.max_value(fmt)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_decode_every_byte(self, fmt):
        raw = np.arange(256, dtype=np.uint8)
        want = raw.view(fp8.dtype_of(fmt)).astype(np.float32)
        got = fp8.to_float32(raw, fmt)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))

    def test_refuses_other_formats(self):
        with pytest.raises(ValueError, match="not an FP8"):
            fp8.dtype_of("int8")
        with pytest.raises(ValueError, match="fmt="):
            fp8.to_float32(np.zeros(2, np.uint8))


# -- hal.fp8: UE8M0 ----------------------------------------------------------------------------


class TestE8M0:
    @has_e8m0_reference
    @pytest.mark.parametrize("mode", ["up", "down", "nearest"])
    @pytest.mark.parametrize("saturate", [True, False])
    @HYPOTHESIS
    @given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
    def test_is_onnx_reference(self, mode, saturate, bits):
        x = float32_from_bits(bits)
        want = onnx.numpy_helper.to_float8e8m0(x, saturate, mode).view(np.uint8)
        assert np.array_equal(fp8.e8m0_from_float32(x, mode, saturate=saturate), want)

    @has_e8m0_reference
    @pytest.mark.parametrize("mode", ["up", "down", "nearest"])
    def test_onnx_cast24_node(self, mode):
        rng = np.random.default_rng(1)
        x = np.concatenate([np.abs(SPECIALS), np.abs(rng.standard_normal(300)).astype(np.float32) * 2.0 ** rng.integers(-140, 127, 300)])
        x = x.astype(np.float32)
        node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E8M0, round_mode=mode)
        model = make_model([node], [("x", TensorProto.FLOAT, [x.size])], [("y", TensorProto.FLOAT8E8M0, [x.size])], opset=24, ir_version=11)
        (want,) = ReferenceEvaluator(model).run(None, {"x": x})
        assert np.array_equal(fp8.e8m0_from_float32(x, mode), np.asarray(want).view(np.uint8))

    def test_decode_is_ml_dtypes(self):
        raw = np.arange(256, dtype=np.uint8)
        got = fp8.e8m0_to_float32(raw)
        want = raw.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
        assert np.isnan(got[255]) and np.isnan(want[255])
        assert np.array_equal(got[:255].view(np.uint32), want[:255].view(np.uint32))
        assert got[0] == np.float32(2.0**-127) and got[127] == 1.0

    def test_cann_reading(self):
        raw = np.arange(256, dtype=np.uint8)
        ocp, cann = fp8.e8m0_to_float32(raw, "ocp"), fp8.e8m0_to_float32(raw, hal.E8M0Encoding.CANN_ZERO)
        assert cann[0] == 0.0 and ocp[0] == np.float32(2.0**-127)
        assert np.array_equal(ocp[1:255], cann[1:255]) and np.isnan(cann[255])

    @pytest.mark.parametrize("mode", ["up", "down", "nearest"])
    def test_powers_of_two_round_trip(self, mode):
        raw = np.arange(255, dtype=np.uint8)
        want = raw.copy()
        if mode == "up":
            # 2^-127 is a float32 subnormal (exponent field 0, mantissa 0x400000): Cast-24's
            # "up" sees a mantissa and carries, giving 2^-126. ONNX's reference does the same.
            want[0] = 1
        assert np.array_equal(fp8.e8m0_from_float32(fp8.e8m0_to_float32(raw), mode), want)

    def test_modes_bracket(self):
        x = np.float32(3.0) * 2.0 ** np.arange(-100, 100, dtype=np.float32)
        up = fp8.e8m0_to_float32(fp8.e8m0_from_float32(x, "up"))
        down = fp8.e8m0_to_float32(fp8.e8m0_from_float32(x, "down"))
        assert np.all(down < x) and np.all(x < up) and np.array_equal(up, down * 2)

    def test_specials(self):
        got = fp8.e8m0_from_float32(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 2.0**127 * 1.5], np.float32))
        assert list(got) == [0xFF, 0xFF, 0xFF, 0x00, 0x00, 0xFE]  # saturating: 2^127 is the largest
        assert fp8.e8m0_from_float32(np.float32(2.0**127 * 1.5), saturate=False) == 0xFF

    def test_reencode(self):
        raw = np.array([1, 127, 254, 255], np.uint8)
        assert np.array_equal(fp8.e8m0_reencode(raw, "ocp", "cann-zero"), raw)
        with pytest.raises(ValueError, match="2\\^-127"):
            fp8.e8m0_reencode(np.array([0, 3], np.uint8), "ocp", "cann-zero")
        with pytest.raises(ValueError, match="zero"):
            fp8.e8m0_reencode(np.array([0], np.uint8), "cann-zero", "ocp")
        with pytest.raises(ValueError, match="encoding"):
            fp8.e8m0_reencode(raw, "ocp", "ieee")


# -- hal.fp8: block scales, requantization, FN to FNUZ ------------------------------------------


def loop_amax(x, axis, block, expand=None):
    """Block maxima by an explicit loop, the definition."""
    x = np.moveaxis(np.abs(x.astype(np.float64)), axis, 0)
    n = x.shape[0]
    out = np.stack([x[i * block : (i + 1) * block].max(axis=0) for i in range(-(-n // block))])
    out = np.moveaxis(out, 0, axis)
    if expand is not None:
        other, rows = expand
        out = np.moveaxis(out, other, 0)
        grouped = out.copy()
        for g in range(0, out.shape[0], rows):
            grouped[g : g + rows] = out[g : g + rows].max(axis=0)
        out = np.moveaxis(grouped, 0, other)
    return out


def as_users_have_them(x: np.ndarray) -> list[np.ndarray]:
    """The same values read-only, strided (a view of a larger array) and in Fortran order."""
    readonly = x.copy()
    readonly.flags.writeable = False
    big = np.zeros((x.shape[0] * 2,) + x.shape[1:], dtype=x.dtype)
    big[::2] = x
    return [readonly, big[::2], np.asfortranarray(x)]


class TestBlocks:
    @HYPOTHESIS
    @given(
        rows=st.integers(1, 40), cols=st.integers(1, 40), block=st.integers(1, 16), expand=st.integers(1, 9),
        axis=st.integers(0, 1), seed=st.integers(0, 2**16),
    )
    def test_amax_is_the_definition(self, rows, cols, block, expand, axis, seed):
        x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
        want = loop_amax(x, axis, block, (1 - axis, expand))
        assert np.array_equal(fp8.block_amax(x, axis, block, expand=(1 - axis, expand)), want.astype(np.float32))
        assert np.array_equal(fp8.block_amax(x, axis, block), loop_amax(x, axis, block).astype(np.float32))

    def test_arrays_as_users_have_them(self):
        x = np.random.default_rng(0).standard_normal((70, 45)).astype(np.float32)
        amax = fp8.block_amax(x, 1, 32, expand=(0, 16))
        q = fp8.saturate_cast(x, "e4m3fn")
        s = fp8.scale_for(amax[:, :1], "e4m3fn")
        for variant in as_users_have_them(x):
            assert np.array_equal(fp8.block_amax(variant, 1, 32, expand=(0, 16)), amax)
            assert same_bits(fp8.saturate_cast(variant, "e4m3fn"), q)
        for variant in as_users_have_them(q):
            assert same_bits(fp8.requantize_blocks(variant, s, axis=0)[0], fp8.requantize_blocks(q, s, axis=0)[0])
        for variant in as_users_have_them(np.arange(256, dtype=np.uint8).reshape(16, 16)):
            assert np.array_equal(fp8.e8m0_to_float32(variant), fp8.e8m0_to_float32(np.ascontiguousarray(variant)), equal_nan=True)
            assert np.array_equal(fp8.e8m0_from_float32(fp8.e8m0_to_float32(variant), "down"), variant)

    @pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
    def test_scale_for(self, fmt):
        amax = np.array([0.0, 1.0, 448.0, 3e-45, 1e30], np.float32)
        top = np.float32(fp8.max_value(fmt))
        s = fp8.scale_for(amax, fmt)
        assert s[0] == 1.0 and s[1] == np.float32(1.0) / top and np.all(np.isfinite(s)) and np.all(s > 0)
        pow2 = fp8.scale_for(amax, fmt, "ue8m0", "up")
        assert np.all(np.frexp(pow2)[0] == 0.5)  # exact powers of two
        assert np.all(amax[1:] / pow2[1:] <= top)  # rounding up never clips

    def test_expand_scale_is_dequantize_linear(self):
        rng = np.random.default_rng(2)
        q = fp8.saturate_cast(rng.standard_normal((9, 70)) * 100, "e4m3fn")
        s = rng.uniform(0.5, 2, (9, 3)).astype(np.float32)
        node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=1, block_size=32)
        model = make_model([node], [("q", TensorProto.FLOAT8E4M3FN, [9, 70]), ("s", TensorProto.FLOAT, [9, 3])],
                           [("y", TensorProto.FLOAT, [9, 70])], opset=21, ir_version=10)
        (want,) = ReferenceEvaluator(model).run(None, {"q": q, "s": s})
        assert np.array_equal(fp8.to_float32(q) * fp8.expand_scale(s, q.shape, 1, 32), want)

    @pytest.mark.parametrize("mode", ["up", "nearest", "down"])
    def test_requantize_blocks_rounds_once(self, mode):
        rng = np.random.default_rng(3)
        q = fp8.saturate_cast(rng.standard_normal((40, 64)) * 100, "e4m3fn")
        s = (rng.uniform(1, 2, (40, 2)) * 2.0 ** rng.integers(-10, 10, (40, 2))).astype(np.float32)
        new_q, bits, values = fp8.requantize_blocks(q, s, axis=1, block_size=32, round_mode=mode)
        onnx_bits = fp8.e8m0_from_float32(s, mode)
        assert np.array_equal(bits, onnx_bits) and np.array_equal(values, fp8.e8m0_to_float32(onnx_bits))
        exact = q.astype(np.float64) * np.repeat(s, 32, axis=1) / np.repeat(values, 32, axis=1).astype(np.float64)
        assert same_bits(new_q, np.clip(exact, -448, 448).astype(ml_dtypes.float8_e4m3fn))
        if mode == "up":
            assert np.all(np.abs(exact) <= 448)  # never clipped

    def test_requantize_keeps_powers_of_two(self):
        q = fp8.saturate_cast(np.random.default_rng(4).standard_normal((8, 8)) * 100, "e4m3fn")
        s = np.float32(2.0) ** np.arange(-4, 4, dtype=np.float32).reshape(8, 1)
        for mode in ("up", "down", "nearest"):
            assert same_bits(fp8.requantize_blocks(q, s, axis=1, block_size=8, round_mode=mode)[0], q)

    def test_fn_to_fnuz(self):
        raw = np.arange(256, dtype=np.uint8)
        fn = raw.view(ml_dtypes.float8_e4m3fn)
        values = fn.astype(np.float32)
        fnuz, factor = fp8.e4m3fn_to_e4m3fnuz(fn)
        assert factor == 2.0
        back = fnuz.astype(np.float32) * factor
        finite = ~np.isnan(values)
        assert np.array_equal(back[finite], values[finite])  # exact, -0 as +0
        assert np.all(fnuz.view(np.uint8)[~finite] == 0x80)  # FN's NaNs become FNUZ's only NaN
        assert fnuz.view(np.uint8)[0x80] == 0x00  # FN -0 (0x80) is not FNUZ's NaN
        kept, one = fp8.e4m3fn_to_e4m3fnuz(fn, out_of_range="saturate")
        assert one == 1.0 and np.nanmax(np.abs(kept.astype(np.float32))) == 240.0
        small = np.abs(values) <= 240
        assert np.array_equal(kept.astype(np.float32)[small], values[small])
        with pytest.raises(ValueError, match="exceed"):
            fp8.e4m3fn_to_e4m3fnuz(fn, out_of_range="raise")
        assert fp8.e4m3fn_to_e4m3fnuz(fn[np.abs(np.nan_to_num(values)) <= 240], out_of_range="raise")[1] == 1.0


# -- hal.quantize.fp8 --------------------------------------------------------------------------


def initializer(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def matmul_model(w: np.ndarray, *, name: str = "w", opset: int = 21) -> onnx.ModelProto:
    k, n = w.shape
    return make_model(
        [helper.make_node("MatMul", ["x", name], ["y"], name="mm")],
        [("x", TensorProto.FLOAT, [3, k])], [("y", TensorProto.FLOAT, [3, n])],
        initializers=[initializer(name, w)], opset=opset, ir_version=10 if opset >= 21 else 9,
    )


def dq_node(model, output: str) -> onnx.NodeProto:
    return next(n for n in model.proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == output)


def tensor(model, name: str) -> TensorProto:
    return next(t for t in model.proto.graph.initializer if t.name == name)


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class TestFp8:
    @pytest.mark.parametrize("block", [(1, 32), (128, 128), (16, 8), "channel"])
    @pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
    def test_values_are_quantize_linear(self, block, fmt):
        w = np.random.default_rng(5).standard_normal((200, 130)).astype(np.float32)  # partial blocks
        q = hq.fp8(matmul_model(w), format=fmt, block=block)
        node = dq_node(q, "w")
        a = attrs(node)
        values = numpy_helper.to_array(tensor(q, node.input[0]))
        scale = numpy_helper.to_array(tensor(q, node.input[1]))
        qattrs = {"output_dtype": ONNX_FP8[fmt], "axis": a.get("axis", 1)}
        if "block_size" in a:
            qattrs["block_size"] = a["block_size"]
        quant = helper.make_node("QuantizeLinear", ["w", "s"], ["q"], **qattrs)
        model = make_model([quant], [("w", TensorProto.FLOAT, list(w.shape)), ("s", TensorProto.FLOAT, list(scale.shape))],
                           [("q", ONNX_FP8[fmt], list(w.shape))], opset=21, ir_version=10)
        (want,) = ReferenceEvaluator(model).run(None, {"w": w, "s": scale})
        assert same_bits(values, want)
        # The scale: amax / max(format) over each logical block (the definition, by loop).
        if block == "channel":
            amax = np.abs(w).max(axis=0)
            assert a["axis"] == 1 and "block_size" not in a
        else:
            rows, cols = block
            axis, size, expand = (0, cols, (1, rows)) if cols >= rows else (1, rows, (0, cols))
            amax = loop_amax(w, axis, size, expand if expand[1] > 1 else None).astype(np.float32)
            assert a["axis"] == axis and a["block_size"] == size
            logical = math.ceil(200 / cols) * math.ceil(130 / rows)  # reduction axis 0 (200), outputs 130
            assert hq.summary(q)["tensors"]["w"]["logical_blocks"] == logical
            assert hq.summary(q)["tensors"]["w"]["stored_scales"] == scale.size
        assert np.array_equal(scale, amax / np.float32(fp8.max_value(fmt)))

    def test_gemm_trans_b_and_conv(self):
        rng = np.random.default_rng(6)
        b = rng.standard_normal((24, 70)).astype(np.float32)  # Gemm transB: [N, K]
        c = rng.standard_normal((8, 40, 3, 3)).astype(np.float32)
        model = make_model(
            [helper.make_node("Gemm", ["x", "b"], ["y1"], transB=1, name="gemm"),
             helper.make_node("Conv", ["img", "c"], ["y2"], pads=[1, 1, 1, 1], name="conv")],
            [("x", TensorProto.FLOAT, [1, 70]), ("img", TensorProto.FLOAT, [1, 40, 5, 5])],
            [("y1", TensorProto.FLOAT, [1, 24]), ("y2", TensorProto.FLOAT, [1, 8, 5, 5])],
            initializers=[initializer("b", b), initializer("c", c)],
        )
        q = hq.fp8(model, block=(1, 32))
        gemm, conv = attrs(dq_node(q, "b")), attrs(dq_node(q, "c"))
        assert gemm == {"axis": 1, "block_size": 32}  # the reduction axis of a transB weight
        assert list(tensor(q, dq_node(q, "b").input[1]).dims) == [24, 3]
        assert conv == {"axis": 1, "block_size": 32}  # input channels, each kernel position apart
        assert list(tensor(q, dq_node(q, "c").input[1]).dims) == [8, 2, 3, 3]
        report = hq.accuracy(model, q)
        assert {t.name for t in report.tensors} == {"b", "c"} and all(t.sqnr_db > 25 for t in report.tensors)
        assert all(e < 0.1 for _, e in report.outputs)

    def test_ue8m0_scales(self):
        w = np.random.default_rng(7).standard_normal((256, 96)).astype(np.float32)
        for rounding in ("up", "nearest", "down"):
            q = hq.fp8(matmul_model(w), scale="ue8m0", rounding=rounding, block=(1, 32))
            node = dq_node(q, "w")
            scale = numpy_helper.to_array(tensor(q, node.input[1]))
            float_scale = loop_amax(w, 0, 32).astype(np.float32) / np.float32(448)
            want = fp8.e8m0_to_float32(onnx.numpy_helper.to_float8e8m0(float_scale, True, rounding).view(np.uint8)) \
                if hasattr(onnx.numpy_helper, "to_float8e8m0") else fp8.scale_for(loop_amax(w, 0, 32), "e4m3fn", "ue8m0", rounding)
            assert np.array_equal(scale, want)
            assert np.all(np.frexp(scale)[0] == 0.5)

    def test_keep_e8m0(self):
        w = np.random.default_rng(8).standard_normal((64, 40)).astype(np.float32)
        model = matmul_model(w, opset=17)
        plain = hq.fp8(model, scale="ue8m0", block=(1, 32))
        kept = hq.fp8(model, scale="ue8m0", block=(1, 32), keep_e8m0=True)
        assert plain.requirements.opset == 21 and kept.requirements.opset == 24
        assert kept.proto.ir_version >= helper.find_min_ir_version_for(list(kept.proto.opset_import))
        node = dq_node(kept, "w")
        assert tensor(kept, node.input[1]).data_type == TensorProto.FLOAT8E8M0
        assert attrs(node)["output_dtype"] == TensorProto.FLOAT
        x = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)
        (a,) = ReferenceEvaluator(plain.proto).run(None, {"x": x})
        (b,) = ReferenceEvaluator(kept.proto).run(None, {"x": x})
        assert np.array_equal(a, b)  # the E8M0 bytes hold exactly the float32 powers of two
        report = hq.accuracy(model, kept)
        assert "FLOAT8E8M0" in report.note and report.outputs

    def test_all_zero_block(self):
        w = np.random.default_rng(10).standard_normal((64, 8)).astype(np.float32)
        w[:32] = 0.0
        for scale in ("float32", "ue8m0"):
            q = hq.fp8(matmul_model(w), scale=scale, block=(1, 32))
            node = dq_node(q, "w")
            s = numpy_helper.to_array(tensor(q, node.input[1]))
            values = numpy_helper.to_array(tensor(q, node.input[0])).astype(np.float32)
            assert np.all(s[0] == 1.0) and np.all(np.isfinite(s))
            assert np.all(values[:32] == 0)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_weight(self, bad):
        w = np.ones((8, 4), np.float32)
        w[3, 2] = bad
        with pytest.raises(InputError, match="'w'.*NaN or infinite"):
            hq.fp8(matmul_model(w))

    def test_tied_weight(self):
        w = np.random.default_rng(11).standard_normal((16, 16)).astype(np.float32)
        model = make_model(
            [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2")],
            [("x", TensorProto.FLOAT, [2, 16])], [("y", TensorProto.FLOAT, [2, 16])], initializers=[initializer("w", w)],
        )
        q = hq.fp8(model, block=(1, 8))
        dqs = [n for n in q.proto.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dqs) == 1 and sorted(hq.summary(q)["tensors"]["w"]["consumers"]) == ["MatMul 'mm1'", "MatMul 'mm2'"]

    def test_tied_with_gather_is_skipped(self):
        w = np.random.default_rng(12).standard_normal((16, 16)).astype(np.float32)
        model = make_model(
            [helper.make_node("Gather", ["w", "ids"], ["e"], name="embed"), helper.make_node("MatMul", ["e", "w"], ["y"], name="head")],
            [("ids", TensorProto.INT64, [3])], [("y", TensorProto.FLOAT, [3, 16])], initializers=[initializer("w", w)],
        )
        q = hq.fp8(model)
        assert not [n for n in q.proto.graph.node if n.op_type == "DequantizeLinear"]
        (entry,) = hq.summary(q)["skipped"]
        assert entry["name"] == "w" and "Gather 'embed'" in entry["reason"]

    def test_graph_input_weight_is_skipped(self):
        model = matmul_model(np.ones((8, 4), np.float32))
        model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4]))
        q = hq.fp8(model)
        assert hq.summary(q)["skipped"] == [{"name": "w", "reason": "is also a graph input (a caller may replace it at run time)"}]

    def test_already_quantized_is_skipped(self):
        w = np.random.default_rng(13).standard_normal((64, 32)).astype(np.float32)
        once = hq.fp8(matmul_model(w), block=(1, 32))
        twice = hq.fp8(once, block=(1, 32))
        assert [n.op_type for n in twice.proto.graph.node].count("DequantizeLinear") == 1
        (entry,) = hq.summary(twice)["skipped"]
        assert entry["name"] == "w_fp8" and "already quantized" in entry["reason"]

    def test_skip(self):
        rng = np.random.default_rng(14)
        model = make_model(
            [helper.make_node("MatMul", ["x", "a.weight"], ["h"], name="layer0"),
             helper.make_node("MatMul", ["h", "lm_head.weight"], ["y"], name="head")],
            [("x", TensorProto.FLOAT, [2, 8])], [("y", TensorProto.FLOAT, [2, 8])],
            initializers=[initializer("a.weight", rng.standard_normal((8, 8)).astype(np.float32)),
                          initializer("lm_head.weight", rng.standard_normal((8, 8)).astype(np.float32))],
        )
        for skip in (["lm_head*"], ["head"], "lm_head.weight"):
            q = hq.fp8(model, skip=skip)
            assert list(hq.summary(q)["tensors"]) == ["a.weight"]
            assert hq.summary(q)["skipped"] == [{"name": "lm_head.weight", "reason": "skipped as asked"}]

    def test_bad_options(self):
        model = matmul_model(np.ones((8, 4), np.float32))
        for kwargs, match in (({"format": "e4m3"}, "format"), ({"scale": "e8m0"}, "scale"), ({"block": (0, 32)}, "block"),
                              ({"block": "32"}, "block"), ({"rounding": "even"}, "rounding"), ({"keep_e8m0": True}, "ue8m0")):
            with pytest.raises(SettingError, match=match):
                hq.fp8(model, **kwargs)

    def test_opset_that_cannot_be_raised(self, monkeypatch):
        from onnx import version_converter

        def fail(*args, **kwargs):
            raise RuntimeError("no adapter")

        monkeypatch.setattr(version_converter, "convert_version", fail)
        with pytest.raises(ModelError, match="opset 21.*no adapter"):
            hq.fp8(matmul_model(np.ones((8, 4), np.float32), opset=17))

    def test_source_untouched_and_runs(self):
        source = hal.load(models.mlp(batch=2, width=64, layers=2))
        before = source.proto.SerializeToString()
        q = hq.fp8(source, block=(1, 32))
        assert isinstance(q, hal.Model) and source.proto.SerializeToString() == before
        x = np.random.default_rng(15).standard_normal((2, 64)).astype(np.float32)
        got = hal.compile(q).to("ort:cpu", verify=False)
        (want,) = ReferenceEvaluator(q.proto).run(None, {"x": x})
        np.testing.assert_allclose(got.run({"x": x})["y"], want, rtol=1e-5, atol=1e-5)

    def test_external_weights(self, tmp_path):
        w = np.random.default_rng(16).standard_normal((64, 32)).astype(np.float32)
        e = np.random.default_rng(17).standard_normal((32,)).astype(np.float32)
        model = make_model(
            [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "e"], ["y"])],
            [("x", TensorProto.FLOAT, [2, 64])], [("y", TensorProto.FLOAT, [2, 32])],
            initializers=[initializer("w", w), initializer("e", e)], opset=21, ir_version=10,
        )
        path = tmp_path / "m.onnx"
        direct = hq.fp8(model, block=(1, 32))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.bin", size_threshold=0)
        loaded = hal.load(path)
        q = hq.fp8(loaded, block=(1, 32))  # reads w through the read-only mapping
        assert tensor(q, "e").data_location == TensorProto.EXTERNAL  # not quantized: stays external
        assert tensor(q, "w_fp8").raw_data == tensor(direct, "w_fp8").raw_data
        (tmp_path / "out").mkdir()
        back = hal.load(hq.save(q, tmp_path / "out" / "q.onnx"))
        assert back.weights is None and numpy_helper.to_array(tensor(back, "e")).tolist() == e.tolist()


class TestRequantize:
    @pytest.mark.parametrize("rounding", ["up", "nearest", "down"])
    def test_deepseek_layout(self, rounding):
        model = models.fp8_block_scaled_mlp(width=300, layers=2)
        q = hq.requantize(model, rounding=rounding)
        for i in range(2):
            old_q = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"layer{i}.weight"))
            old_s = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"layer{i}.weight_scale_inv"))
            new_q = numpy_helper.to_array(tensor(q, f"layer{i}.weight"))
            new_s = numpy_helper.to_array(tensor(q, f"layer{i}.weight_scale_inv"))
            assert np.all(np.frexp(new_s)[0] == 0.5)
            # 128x128 blocks stay 128x128: rows that shared a scale still share one.
            for start in range(0, 300, 128):
                assert np.all(new_s[start : start + 128] == new_s[start])
            # each value rounded once from its exact float64 value to the new scale
            exact = old_q.astype(np.float64) * np.repeat(old_s, 128, axis=1)[:, :300] / np.repeat(new_s, 128, axis=1)[:, :300]
            assert same_bits(new_q, np.clip(exact, -448, 448).astype(ml_dtypes.float8_e4m3fn))
            if rounding == "up":
                assert np.all(np.abs(exact) <= 448)
        assert hq.summary(q)["operation"] == "requantize"
        report = hq.accuracy(model, q)
        assert report.outputs and len(report.tensors) == 2

    def test_keep_e8m0_runs_in_reference(self):
        model = models.fp8_block_scaled_mlp(width=130, layers=1)
        plain, kept = hq.requantize(model), hq.requantize(model, keep_e8m0=True)
        assert tensor(kept, "layer0.weight_scale_inv").data_type == TensorProto.FLOAT8E8M0
        x = np.random.default_rng(18).standard_normal((4, 130)).astype(np.float32)
        (a,) = ReferenceEvaluator(plain.proto).run(None, {"x": x})
        (b,) = ReferenceEvaluator(kept.proto).run(None, {"x": x})
        assert np.array_equal(a, b)

    def test_bad_scale(self):
        model = models.fp8_block_scaled_mlp(width=64, layers=1)
        scale = next(t for t in model.graph.initializer if t.name == "layer0.weight_scale_inv")
        values = numpy_helper.to_array(scale).copy()
        values[0, 0] = 0.0
        scale.CopyFrom(numpy_helper.from_array(values, scale.name))
        with pytest.raises(InputError, match="layer0.weight_scale_inv"):
            hq.requantize(model)


class TestAccuracy:
    def test_figures_are_the_definitions(self):
        model = models.mlp(batch=2, width=64, layers=2)
        q = hq.fp8(model, block=(1, 32), scale="ue8m0")
        report = hq.accuracy(model, q, seed=3)
        x = hal.verification.seeded_feeds(hal.load(model).inputs, seed=3)
        (want,) = ReferenceEvaluator(model).run(None, x)
        (got,) = ReferenceEvaluator(q.proto).run(None, x)
        ((name, error),) = report.outputs
        assert name == "y" and error == pytest.approx(np.linalg.norm(got - want) / np.linalg.norm(want), rel=1e-3)
        originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for t in report.tensors:
            dq = next(n for n in q.proto.graph.node if n.output[0] == t.name)
            sub = onnx.ModelProto()
            sub.CopyFrom(q.proto)
            del sub.graph.output[:]
            sub.graph.output.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, None))
            (deq,) = ReferenceEvaluator(sub).run([t.name], x)
            w = originals[t.name].astype(np.float64)
            assert t.sqnr_db == pytest.approx(10 * np.log10(np.sum(w**2) / np.sum((w - deq) ** 2)))
            assert t.max_abs_error == pytest.approx(np.max(np.abs(w - deq)))
            assert t.bytes_before == w.size * 4
            assert t.bytes_after == w.size + numpy_helper.to_array(tensor(q, dq.input[1])).nbytes  # 1 byte a value
        assert report.bytes_before == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        assert report.bytes_saved == report.bytes_before - report.bytes_after > 0
        assert "SQNR" in "\n".join(report.lines())

    def test_device_none(self):
        model = models.mlp(batch=2, width=64, layers=1)
        report = hq.accuracy(model, hq.fp8(model), device=None)
        assert report.outputs == () and report.end_to_end is None and report.tensors


class TestSave:
    def test_small_is_one_file(self, tmp_path):
        q = hq.fp8(models.mlp(batch=2, width=64, layers=2))
        path = hq.save(q, tmp_path / "q.onnx")
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["q.onnx"]
        assert hal.load(path).digest == hal.load(q.proto).digest

    def test_large_goes_external(self, tmp_path, monkeypatch):
        monkeypatch.setattr("hal.quantize._fp8.EXTERNAL_THRESHOLD", 0)
        q = hq.fp8(models.mlp(batch=2, width=64, layers=2))
        path = hq.save(q, tmp_path / "q.onnx")
        assert (tmp_path / "q.onnx.data").is_file()
        back = hal.load(path)
        assert back.weights is not None
        stored = {t.name: t.raw_data for t in q.proto.graph.initializer}
        for t in back.proto.graph.initializer:
            if len(stored[t.name]) >= 1024:  # tensors over 1 KiB go to the data file
                assert t.data_location == TensorProto.EXTERNAL and back.weights.view(t).tobytes() == stored[t.name]
            else:
                assert t.raw_data == stored[t.name]

    def test_bad_path(self, tmp_path):
        from hal.errors import OutputPathError

        with pytest.raises(OutputPathError, match="existing directory"):
            hq.save(hq.fp8(models.mlp(batch=2, width=64, layers=1)), tmp_path / "missing" / "q.onnx")


class TestCli:
    def test_quantize_with_report(self, tmp_path, capsys):
        src = tmp_path / "m.onnx"
        onnx.save(models.mlp(batch=2, width=64, layers=2), src)
        code = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--fp8", "e4m3fn", "--scale", "ue8m0",
                     "--block", "1x32", "--rounding", "nearest", "--skip", "weight_1", "--report"])
        out, _ = capsys.readouterr()
        assert code == 0 and "quantized 1 weight(s)" in out and "SQNR" in out and "skipped weight_1" in out
        record = hq.summary(hal.load(tmp_path / "q.onnx"))
        assert record["block"] == [1, 32] and record["rounding"] == "nearest"

    def test_requantize(self, tmp_path, capsys):
        src = tmp_path / "ds.onnx"
        onnx.save(models.fp8_block_scaled_mlp(width=64, layers=1), src)
        code = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--requantize", "ue8m0", "--keep-e8m0"])
        out, _ = capsys.readouterr()
        assert code == 0 and "requantized 1 weight(s)" in out
        assert tensor(hal.load(tmp_path / "q.onnx"), "layer0.weight_scale_inv").data_type == TensorProto.FLOAT8E8M0

    def test_errors_are_one_line(self, tmp_path, capsys):
        w = np.ones((8, 4), np.float32)
        w[0, 0] = np.nan
        src = tmp_path / "nan.onnx"
        onnx.save(matmul_model(w), src)
        assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx")]) == 1
        _, err = capsys.readouterr()
        assert err.count("\n") == 1 and "'w'" in err and "--skip" in err
        assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--block", "7"]) == 1
        _, err = capsys.readouterr()
        assert err.startswith("hal: error: block '7'")
