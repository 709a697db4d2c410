"""Executable.run: feeds checked before the runtime sees them, and every element type in and out."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

import hal
from hal.backends.onnxruntime import runtime_limits
from hal.errors import InputError, RunError
from hal.testing.build import make_model


@pytest.fixture
def add_exe(add_model):
    return hal.compile(add_model).to("ort:cpu")


class TestRun:
    def test_outputs_by_name(self, add_exe):
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        out = add_exe.run({"x": x, "y": x})
        assert list(out) == ["z"]
        np.testing.assert_array_equal(out["z"], 2 * x)

    def test_metadata(self, add_exe):
        assert add_exe.device.id == "ort:cpu"
        assert [(i.name, i.format, i.shape) for i in add_exe.inputs] == [
            ("x", hal.NumberFormat.FLOAT32, (2, 3)),
            ("y", hal.NumberFormat.FLOAT32, (2, 3)),
        ]
        assert add_exe.outputs[0].name == "z"
        assert add_exe.placement[0].device == "ort:cpu"

    def test_output_subset_and_order(self):
        model = make_model(
            [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Abs", ["x"], ["b"])],
            [("x", TensorProto.FLOAT, [3])], [("a", TensorProto.FLOAT, [3]), ("b", TensorProto.FLOAT, [3])],
        )
        exe = hal.compile(model).to("ort:cpu")
        x = np.array([-1, 0, 2], np.float32)
        out = exe.run({"x": x}, output_names=["b"])
        assert list(out) == ["b"]
        np.testing.assert_array_equal(out["b"], np.abs(x))
        assert list(exe.run({"x": x}, output_names=["b", "a"])) == ["b", "a"]

    def test_symbolic_dims_accept_any_size(self, linear_model):
        exe = hal.compile(linear_model).to("ort:cpu")
        for batch in (1, 5):
            assert exe.run({"x": np.ones((batch, 8), np.float32)})["y"].shape == (batch, 4)

    def test_lists_and_non_contiguous_arrays(self, add_exe):
        x = np.arange(6, dtype=np.float32).reshape(3, 2).T  # non-contiguous view
        out = add_exe.run({"x": x, "y": [[1, 1, 1], [1, 1, 1]]})
        np.testing.assert_array_equal(out["z"], x + 1)


class TestBadFeeds:
    def ok(self):
        return np.ones((2, 3), np.float32)

    def test_missing_feed(self, add_exe):
        with pytest.raises(InputError, match=r"missing feeds \['y'\]"):
            add_exe.run({"x": self.ok()})

    def test_unknown_feed(self, add_exe):
        with pytest.raises(InputError, match=r"unknown feed names \['w'\]"):
            add_exe.run({"x": self.ok(), "y": self.ok(), "w": self.ok()})

    def test_wrong_name_same_count(self, add_exe):
        with pytest.raises(InputError, match=r"missing feeds \['y'\] and unknown feed names \['Y'\]"):
            add_exe.run({"x": self.ok(), "Y": self.ok()})

    def test_wrong_element_type_names_the_fix(self, add_exe):
        with pytest.raises(InputError, match=r"'x' has element type float64, expected float32.*astype\(np.float32\)"):
            add_exe.run({"x": self.ok().astype(np.float64), "y": self.ok()})

    def test_wrong_rank(self, add_exe):
        with pytest.raises(InputError, match="rank 1 .* expected rank 2"):
            add_exe.run({"x": np.ones(6, np.float32), "y": self.ok()})

    def test_wrong_static_dim(self, add_exe):
        with pytest.raises(InputError, match="axis 1 is 4, expected 3"):
            add_exe.run({"x": np.ones((2, 4), np.float32), "y": self.ok()})

    def test_wrong_static_dim_next_to_symbolic(self, linear_model):
        exe = hal.compile(linear_model).to("ort:cpu")
        with pytest.raises(InputError, match="axis 1 is 7, expected 8"):
            exe.run({"x": np.ones((2, 7), np.float32)})

    def test_shared_symbol_must_agree(self):
        model = make_model(
            [helper.make_node("Add", ["a", "b"], ["c"])],
            [("a", TensorProto.FLOAT, ["n"]), ("b", TensorProto.FLOAT, ["n"])], [("c", TensorProto.FLOAT, ["n"])],
        )
        exe = hal.compile(model).to("ort:cpu")
        with pytest.raises(InputError, match="dimension 'n' must be the same size"):
            exe.run({"a": np.ones(3, np.float32), "b": np.ones(1, np.float32)})

    def test_not_an_array(self, add_exe):
        with pytest.raises(InputError, match="'x' is a dict"):
            add_exe.run({"x": {}, "y": self.ok()})

    def test_unknown_output_name(self, add_exe):
        with pytest.raises(InputError, match=r"unknown output names \['nope'\]"):
            add_exe.run({"x": self.ok(), "y": self.ok()}, output_names=["nope"])

    def test_runtime_failure_is_a_run_error(self):
        # A reshape that cannot hold the data: only the runtime can tell.
        shape = helper.make_tensor("s", TensorProto.INT64, [1], [5])
        model = make_model(
            [helper.make_node("Reshape", ["x", "s"], ["y"])],
            [("x", TensorProto.FLOAT, ["n"])], [("y", TensorProto.FLOAT, [5])], initializers=[shape],
        )
        exe = hal.compile(model).to("ort:cpu")
        with pytest.raises(RunError, match="ort:cpu failed to run the model"):
            exe.run({"x": np.ones(3, np.float32)})

    def test_unknown_device_lists_available(self, add_model):
        with pytest.raises(hal.errors.UnknownDeviceError, match="available devices: .*ort:cpu"):
            hal.compile(add_model).to("nvidia:42")
        with pytest.raises(KeyError):  # also a KeyError, for callers who do not know the HAL
            hal.compile(add_model).to("nvidia:42")


def identity_through(fmt_code: int, opset: int):
    """x -> Identity/Cast-to-self chain that keeps the element type end to end."""
    return make_model(
        [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT), helper.make_node("Cast", ["f"], ["y"], to=fmt_code)],
        [("x", fmt_code, [2, 5])], [("y", fmt_code, [2, 5])], opset=opset,
    )


RAW_FORMATS = [
    (TensorProto.BFLOAT16, ml_dtypes.bfloat16, 21, [-3.5, 0.0, 1.0, 2.5, 100.0]),
    (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 21, [-3.5, 0.0, 1.0, 2.5, 448.0]),
    (TensorProto.FLOAT8E4M3FNUZ, ml_dtypes.float8_e4m3fnuz, 21, [-3.5, 0.0, 1.0, 2.5, 240.0]),
    (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2, 21, [-3.5, 0.0, 1.0, 2.5, 57344.0]),
    (TensorProto.FLOAT8E5M2FNUZ, ml_dtypes.float8_e5m2fnuz, 21, [-3.5, 0.0, 1.0, 2.5, 1024.0]),
    (TensorProto.INT4, ml_dtypes.int4, 21, [-8, -1, 0, 3, 7]),
    (TensorProto.UINT4, ml_dtypes.uint4, 21, [0, 1, 7, 8, 15]),
    pytest.param(
        TensorProto.FLOAT8E8M0, ml_dtypes.float8_e8m0fnu, 25, [0.25, 1.0, 2.0, 1024.0, 2.0**-20],
        marks=pytest.mark.skipif(not runtime_limits().float8_e8m0, reason="this onnxruntime has no float8_e8m0 kernels"),
    ),
    (TensorProto.INT2, ml_dtypes.int2, 25, [-2, -1, 0, 1, 1]),
    (TensorProto.UINT2, ml_dtypes.uint2, 25, [0, 1, 2, 3, 3]),
]


class TestRawBitFormats:
    """onnxruntime's Python API refuses ml_dtypes arrays; the HAL passes their raw bits."""

    @pytest.mark.parametrize(("code", "dtype", "opset", "values"), RAW_FORMATS, ids=lambda v: getattr(v, "__name__", None))
    def test_round_trip(self, code, dtype, opset, values):
        exe = hal.compile(identity_through(code, opset)).to("ort:cpu")
        x = np.array(values + values[::-1], dtype=dtype).reshape(2, 5)
        y = exe.run({"x": x})["y"]
        assert y.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32))

    def test_odd_count_int4(self):
        exe = hal.compile(make_model(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
            [("x", TensorProto.INT4, [3])], [("y", TensorProto.FLOAT, [3])], opset=21,
        )).to("ort:cpu")
        np.testing.assert_array_equal(exe.run({"x": np.array([-7, 5, -1], ml_dtypes.int4)})["y"], [-7, 5, -1])

    def test_fp8_cast_saturates_like_onnx(self):
        exe = hal.compile(make_model(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN)],
            [("x", TensorProto.FLOAT, [3])], [("y", TensorProto.FLOAT8E4M3FN, [3])], opset=21,
        )).to("ort:cpu")
        y = exe.run({"x": np.array([1000.0, -1000.0, 0.3], np.float32)})["y"]
        np.testing.assert_array_equal(y.astype(np.float32), np.array([448, -448, 0.3], ml_dtypes.float8_e4m3fn).astype(np.float32))

    def test_empty_tensor(self):
        exe = hal.compile(identity_through(TensorProto.BFLOAT16, 21)).to("ort:cpu")
        # static shape [2, 5] in the model: an empty array is a shape error, not a crash
        with pytest.raises(InputError):
            exe.run({"x": np.zeros((0, 5), ml_dtypes.bfloat16)})

    def test_blocked_fp8_dequantize(self):
        """DeepSeek-style 1x128 blocks: fp8 weights with float32 scales, dequantized on ort:cpu."""
        rng = np.random.default_rng(0)
        w = rng.standard_normal((2, 256)).astype(np.float32)
        scale = np.abs(w).reshape(2, 2, 128).max(-1) / 448.0
        q = (w / np.repeat(scale, 128, axis=1)).astype(ml_dtypes.float8_e4m3fn)
        model = make_model(
            [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1, block_size=128)],
            [("q", TensorProto.FLOAT8E4M3FN, [2, 256]), ("s", TensorProto.FLOAT, [2, 2])],
            [("w", TensorProto.FLOAT, [2, 256])], opset=21,
        )
        out = hal.compile(model).to("ort:cpu").run({"q": q, "s": scale.astype(np.float32)})["w"]
        np.testing.assert_allclose(out, q.astype(np.float32) * np.repeat(scale, 128, axis=1), rtol=1e-6)
        np.testing.assert_allclose(out, w, rtol=0.07, atol=1e-3)
