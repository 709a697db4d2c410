"""Executable.run: feeds checked before the runtime sees them, and every element type in and out."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

import hal
from hal.backends.onnxruntime import runtime_limits
from hal.errors import InputError, RunError
from hal.executable import Executable
from hal.model import TensorInfo
from hal.testing.build import make_model, optional_info, sequence_info


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

    def test_shared_symbol_that_differs_is_a_warning_once_not_a_refusal(self, caplog):
        # Issue 8 item 7: onnxruntime does not hold a model to its symbols (here Add broadcasts
        # 3 with 1), so the HAL may not refuse what the runtime runs; it warns, once.
        model = make_model(
            [helper.make_node("Add", ["a", "b"], ["c"])],
            [("a", TensorProto.FLOAT, ["n"]), ("b", TensorProto.FLOAT, ["n"])], [("c", TensorProto.FLOAT, ["n"])],
        )
        exe = hal.compile(model).to("ort:cpu")
        with caplog.at_level(logging.WARNING, logger="hal.executable"):
            for _ in range(3):
                out = exe.run({"a": np.ones(3, np.float32), "b": np.ones(1, np.float32)})
        np.testing.assert_array_equal(out["c"], [2, 2, 2])
        warned = [r for r in caplog.records if "dimension 'n' has different sizes" in r.getMessage()]
        assert len(warned) == 1 and "a[axis 0]=3, b[axis 0]=1" in warned[0].getMessage()

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


class _Returns:
    """A runner that answers whatever it was given, whatever it is asked."""

    def __init__(self, answer):
        self.answer = answer

    def run(self, feeds, names):
        return self.answer


def _exe(answer, outputs=(("y", hal.NumberFormat.FLOAT32, (1, 3)),)):
    device = next(d for d in hal.devices() if d.id == "ort:cpu")
    return Executable(_Returns(answer), device, [TensorInfo("x", hal.NumberFormat.FLOAT32, (1, 3))],
                      [TensorInfo(*o) for o in outputs])


X = {"x": np.zeros((1, 3), np.float32)}


class TestOutputsAreChecked:
    """Issue 8 item 5: what a backend returns reaches the caller only if it is the declared outputs."""

    @pytest.mark.parametrize(
        ("answer", "message"),
        [
            ([np.zeros((5, 5), np.float32)], r"output 'y' with shape \[5, 5\], but the model declares \[1, 3\]"),
            ([np.zeros((1, 3, 1), np.float32)], r"output 'y' with shape \[1, 3, 1\], but the model declares \[1, 3\]"),
            ([], r"returned 0 arrays where 1 outputs were asked for \(\['y'\]\)"),
            (None, "returned an object of type NoneType where 1 outputs were asked for"),
            (np.zeros((1, 3), np.float32), "returned an object of type ndarray"),
            ([np.zeros((1, 3), np.float32)] * 2, "returned 2 arrays where 1 outputs"),
            ([np.zeros((1, 3), np.float64)], "output 'y' with element type float64, but the model declares float32"),
            ([[[0.0, 0.0, 0.0]]], "output 'y' as a list instead of a numpy array"),
            ([np.float32(0)], "output 'y' as a float32 instead of a numpy array"),
        ],
    )
    def test_a_wrong_answer_is_a_run_error_naming_the_backend(self, answer, message):
        with pytest.raises(RunError, match=message) as info:
            _exe(answer).run(X)
        assert str(info.value).startswith("ort:cpu (backend ort) returned")

    def test_dynamic_dims_take_any_size_static_ones_are_held(self):
        outputs = (("y", hal.NumberFormat.FLOAT32, ("n", 3)),)
        assert _exe([np.zeros((7, 3), np.float32)], outputs).run(X)["y"].shape == (7, 3)
        with pytest.raises(RunError, match=r"shape \[7, 4\], but the model declares \[n, 3\]"):
            _exe([np.zeros((7, 4), np.float32)], outputs).run(X)
        with pytest.raises(RunError, match=r"shape \[7\], but the model declares \[n, 3\]"):
            _exe([np.zeros(7, np.float32)], outputs).run(X)
        unshaped = (("y", hal.NumberFormat.FLOAT32, None),)
        assert _exe([np.zeros((2, 2, 2), np.float32)], unshaped).run(X)["y"].shape == (2, 2, 2)

    def test_ml_dtypes_outputs_are_held_to_their_type(self):
        outputs = (("y", hal.NumberFormat.BFLOAT16, (1, 3)),)
        good = np.zeros((1, 3), ml_dtypes.bfloat16)
        assert _exe([good], outputs).run(X)["y"].dtype == np.dtype(ml_dtypes.bfloat16)
        with pytest.raises(RunError, match="element type float32, but the model declares bfloat16"):
            _exe([np.zeros((1, 3), np.float32)], outputs).run(X)
        with pytest.raises(RunError, match="element type uint16, but the model declares bfloat16"):
            _exe([good.view(np.uint16)], outputs).run(X)  # raw bits not turned back into bfloat16

    def test_a_subset_is_checked_against_its_own_declarations(self):
        outputs = (("a", hal.NumberFormat.FLOAT32, (2,)), ("b", hal.NumberFormat.INT64, (3,)))
        exe = _exe([np.zeros(3, np.int64)], outputs)
        assert exe.run(X, output_names=["b"])["b"].dtype == np.int64
        with pytest.raises(RunError, match="output 'a' with element type int64"):
            exe.run(X, output_names=["a"])


class TestCallerMistakes:
    """Issue 8 item 6: each is an InputError that names the fix, never a raw TypeError."""

    def test_feeds_that_are_not_a_mapping(self, add_exe):
        x = np.ones((2, 3), np.float32)
        with pytest.raises(InputError, match=r"feeds must be a dict of input name to array, e.g. exe.run\(\{'x': array, 'y': array\}\); got NoneType"):
            add_exe.run(None)
        with pytest.raises(InputError, match=r"got list; to feed arrays in input order, pass dict\(zip"):
            add_exe.run([x, x])

    @pytest.mark.parametrize(
        ("names", "message"),
        [
            (123, r"output_names must be None \(all outputs\) or a list of output names, got 123"),
            ("z", r"output_names must be a list of output names, not one string; pass \['z'\]"),
            ([["z"]], r"output_names must be None \(all outputs\) or a list of output names, got \[\['z'\]\]"),
        ],
    )
    def test_output_names_that_are_not_a_list_of_names(self, add_exe, names, message):
        x = np.ones((2, 3), np.float32)
        with pytest.raises(InputError, match=message):
            add_exe.run({"x": x, "y": x}, output_names=names)

    def test_output_names_as_a_tuple_or_generator(self, add_exe):
        x = np.ones((2, 3), np.float32)
        assert list(add_exe.run({"x": x, "y": x}, output_names=("z",))) == ["z"]
        assert list(add_exe.run({"x": x, "y": x}, output_names=(n for n in ["z"]))) == ["z"]


def _identity(code, shape=(2,)):
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", code, list(shape))], [("y", code, list(shape))], opset=21)
    return hal.compile(model).to("ort:cpu", fallback=None)


class TestPythonValues:
    """Lists and scalars are converted only when every value survives (floats into a float type
    round, but never overflow); numpy arrays must already have the input's type."""

    @pytest.mark.parametrize(
        ("code", "value", "expected"),
        [
            (TensorProto.INT64, [1.0, 2.0], [1, 2]),
            (TensorProto.INT64, [True, False], [1, 0]),
            (TensorProto.FLOAT, [True, 3], [1.0, 3.0]),
            (TensorProto.FLOAT, [0.1, 0.2], [np.float32(0.1), np.float32(0.2)]),  # rounds to the nearest float32
            (TensorProto.BOOL, [0, 1], [False, True]),
            (TensorProto.BOOL, [0.0, 1.0], [False, True]),
            (TensorProto.UINT8, [0, 255], [0, 255]),
            (TensorProto.INT4, [7, -8], [7, -8]),
            (TensorProto.STRING, ["a", "b"], ["a", "b"]),
            (TensorProto.FLOAT, [float("inf"), float("nan")], [np.inf, np.nan]),
            (TensorProto.INT64, [np.float64(3.0), np.int32(4)], [3, 4]),
        ],
    )
    def test_exact_values_are_converted(self, code, value, expected):
        got = _identity(code).run({"x": value})["y"]
        np.testing.assert_array_equal(got.astype(object) if code == TensorProto.STRING else got.astype(np.float64),
                                      np.array(expected, dtype=object if code == TensorProto.STRING else np.float64))

    @pytest.mark.parametrize(
        ("code", "value", "message"),
        [
            (TensorProto.INT64, [1.7, 2.9], r"the value 1.7 cannot be held exactly in int64 \(it would become 1.0\); .*np.round\(values\).astype\(np.int64\)"),
            (TensorProto.INT64, [float("nan"), 1], "the value nan cannot be held exactly in int64"),
            (TensorProto.INT32, [2**40, 1], "the value 1099511627776 cannot be held exactly in int32"),
            (TensorProto.UINT8, [-1, 2], r"the value -1 cannot be held exactly in uint8 \(it would become 255\)"),
            (TensorProto.BOOL, [2, 1], "the value 2 cannot be held exactly in bool"),
            (TensorProto.BOOL, [0.5, 1], "the value 0.5 cannot be held exactly in bool"),
            (TensorProto.FLOAT, [16777217, 1], "the value 16777217 cannot be held exactly in float32"),
            (TensorProto.FLOAT16, [1e6, 1.0], r"the value 1000000.0 overflows in float16 \(it would become inf\)"),
            (TensorProto.INT4, [8, 1], "the value 8 cannot be held exactly in int4"),
            (TensorProto.FLOAT, ["1.5", "2"], "holds <U3 values, expected float32: numbers are not read from text"),
            (TensorProto.STRING, [1, 2], "holds int64 values, expected object: numbers are not read from text, nor text from numbers"),
            (TensorProto.FLOAT, [1 + 2j, 1], "holds complex128 values, which float32 cannot hold"),
            (TensorProto.INT64, [2**70, 1], "integers beyond 64 bits"),
            (TensorProto.INT64, [[1, 2], [3]], "cannot be read as an array of int64"),
        ],
    )
    def test_lossy_values_are_refused(self, code, value, message):
        with pytest.raises(InputError, match=message):
            _identity(code).run({"x": value})

    def test_numpy_arrays_of_another_type_are_still_refused(self):
        with pytest.raises(InputError, match=r"element type float64, expected int64; convert it with array.astype\(np.int64\)"):
            _identity(TensorProto.INT64).run({"x": np.array([1.0, 2.0])})


class TestUnknownDims:
    """Issue 8 item 7: exporters write "?", "unk__N" and "" for unknown, not for equal."""

    def test_the_ocr_classifier_input_runs_on_its_real_shape(self, caplog):
        exe = _identity(TensorProto.FLOAT, shape=(-1, 3, "?", "?"))
        with caplog.at_level(logging.WARNING, logger="hal.executable"):
            y = exe.run({"x": np.ones((1, 3, 48, 192), np.float32)})["y"]
        assert y.shape == (1, 3, 48, 192)
        assert not caplog.records  # "?" is no symbol: nothing to warn about

    @pytest.mark.parametrize("placeholder", ["unk__12", "None", "-1", "*"])
    def test_other_placeholders_are_no_symbols(self, placeholder, caplog):
        exe = _identity(TensorProto.FLOAT, shape=(placeholder, placeholder))
        with caplog.at_level(logging.WARNING, logger="hal.executable"):
            assert exe.run({"x": np.ones((2, 5), np.float32)})["y"].shape == (2, 5)
        assert not caplog.records

    def test_an_empty_dim_param_is_unknown(self):
        model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", TensorProto.FLOAT, ["a", "b"])],
                           [("y", TensorProto.FLOAT, ["a", "b"])])
        for dim in (*model.graph.input[0].type.tensor_type.shape.dim, *model.graph.output[0].type.tensor_type.shape.dim):
            dim.dim_param = ""
        exe = hal.compile(model).to("ort:cpu")
        assert exe.run({"x": np.ones((2, 5), np.float32)})["y"].shape == (2, 5)


def _sequence_model():
    """y = x with one element inserted at the back; n = OptionalHasElement(p); q = p."""
    nodes = [
        helper.make_node("SequenceInsert", ["x", "t"], ["y"]),
        helper.make_node("OptionalHasElement", ["p"], ["n"]),
        helper.make_node("Identity", ["p"], ["q"]),
    ]
    return make_model(
        nodes,
        [sequence_info("x", TensorProto.FLOAT, ["n", 3]), ("t", TensorProto.FLOAT, [2, 3]),
         optional_info("p", TensorProto.INT64, [2])],
        [sequence_info("y", TensorProto.FLOAT, ["n", 3]), ("n", TensorProto.BOOL, []),
         optional_info("q", TensorProto.INT64, [2])],
        opset=18,
    )


@pytest.fixture(scope="module")
def seq_exe():
    return hal.compile(_sequence_model()).to("ort:cpu", fallback=None)


T23 = np.arange(6, dtype=np.float32).reshape(2, 3)


class TestSequencesAndOptionals:
    """Sequences travel as lists of arrays, optionals as an array or None, each array checked
    as a tensor feed of the element type is."""

    def test_inputs_and_outputs_say_what_they_hold(self, seq_exe):
        kinds = {i.name: (i.kind, i.format, i.shape) for i in (*seq_exe.inputs, *seq_exe.outputs)}
        assert kinds["x"] == (hal.ValueKind.SEQUENCE, hal.NumberFormat.FLOAT32, ("n", 3))
        assert kinds["p"] == (hal.ValueKind.OPTIONAL, hal.NumberFormat.INT64, (2,))
        assert kinds["t"][0] == "tensor" and kinds["y"][0] == "sequence"

    def test_a_sequence_in_and_out(self, seq_exe):
        a, b = np.ones((1, 3), np.float32), np.zeros((4, 3), np.float32)
        out = seq_exe.run({"x": [a, b], "t": T23, "p": np.array([5, 6])})
        assert type(out["y"]) is list and len(out["y"]) == 3
        for got, want in zip(out["y"], [a, b, T23]):
            np.testing.assert_array_equal(got, want)
        assert out["n"] and out["q"].tolist() == [5, 6]

    def test_an_empty_sequence_and_a_tuple(self, seq_exe):
        assert len(seq_exe.run({"x": [], "t": T23, "p": None})["y"]) == 1
        assert len(seq_exe.run({"x": (T23, T23), "t": T23, "p": None})["y"]) == 3

    def test_an_absent_optional_is_none_in_and_out(self, seq_exe):
        out = seq_exe.run({"x": [T23], "t": T23, "p": None})
        assert out["q"] is None and not out["n"]

    def test_arrays_as_users_have_them_inside_a_list(self, seq_exe, tmp_path):
        frozen = np.arange(6, dtype=np.float32).reshape(2, 3)
        frozen.flags.writeable = False
        wide = np.arange(12, dtype=np.float32).reshape(2, 6)
        np.save(tmp_path / "m.npy", T23)
        mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
        items = [frozen, wide[:, ::2], np.asfortranarray(np.ones((3, 3), np.float32)), T23[::-1],
                 np.broadcast_to(np.float32(7), (2, 3)), mapped, np.frombuffer(T23.tobytes(), np.float32).reshape(2, 3)]
        out = seq_exe.run({"x": items, "t": frozen, "p": np.array([1, 2])})["y"]
        for got, want in zip(out, [*items, frozen]):
            np.testing.assert_array_equal(got, want)

    def test_python_lists_inside_a_sequence_convert_as_tensor_feeds_do(self, seq_exe):
        out = seq_exe.run({"x": [[[1, 2, 3]]], "t": T23, "p": [7, 8]})
        assert out["y"][0].dtype == np.float32 and out["y"][0].tolist() == [[1, 2, 3]]
        with pytest.raises(InputError, match=r"input 'p': the value 1.5 cannot be held exactly in int64"):
            seq_exe.run({"x": [], "t": T23, "p": [1.5, 2]})

    @pytest.mark.parametrize(
        ("feeds", "message"),
        [
            ({"x": [T23, T23.astype(np.float64)]},
             r"input 'x' element 1 has element type float64, expected float32; convert it with array.astype\(np.float32\)"),
            ({"x": [T23, np.ones(3, np.float32)]}, r"input 'x' element 1 has rank 1 \(shape \[3\]\), expected rank 2 with shape \[n, 3\]"),
            ({"x": [np.ones((2, 4), np.float32)]}, r"input 'x' element 0 has shape \[2, 4\], expected \[n, 3\]: axis 1 is 4, expected 3"),
            ({"x": T23}, r"input 'x' is a sequence of float32 \[n, 3\]: pass a list of arrays \(list\(array\) splits one along its first axis\), not one array"),
            ({"x": None}, r"input 'x' is a sequence of float32 \[n, 3\]: pass a list of arrays, not None"),
            ({"x": [], "p": np.array([1.0, 2.0])}, r"input 'p' has element type float64, expected int64"),
            ({"x": [], "p": np.array([1, 2, 3])}, r"input 'p' has shape \[3\], expected \[2\]"),
            ({"x": [], "t": None}, r"input 't' is a NoneType; pass a numpy array of float32"),
            ({"x": [{"a": 1}]}, r"input 'x' element 0 is a dict; pass a numpy array of float32"),
        ],
    )
    def test_bad_elements_are_input_errors_naming_the_element(self, seq_exe, feeds, message):
        with pytest.raises(InputError, match=message):
            seq_exe.run({"t": T23, "p": None, **feeds})

    def test_a_backend_answering_other_than_a_sequence_is_a_run_error(self):
        outputs = [TensorInfo("s", hal.NumberFormat.FLOAT32, (None, 3), hal.ValueKind.SEQUENCE),
                   TensorInfo("o", hal.NumberFormat.FLOAT32, (3,), "optional")]
        device = next(d for d in hal.devices() if d.id == "ort:cpu")

        def exe(answer):
            return Executable(_Returns(answer), device, [TensorInfo("x", hal.NumberFormat.FLOAT32, (1, 3))], outputs)

        good = [np.ones((2, 3), np.float32)]
        assert exe([good, None]).run(X)["o"] is None
        for answer, message in [
            ([tuple(good), None], r"output 's' as a tuple, but the model declares a sequence of float32 \[\?, 3\], which comes back as a list"),
            ([good[0], None], "output 's' as one array"),
            ([None, None], "output 's' as None"),
            ([[good[0].astype(np.float64)], None], "output 's' element 0 with element type float64, but the model declares float32"),
            ([[good[0], np.ones((2, 4), np.float32)], None], r"output 's' element 1 with shape \[2, 4\], but the model declares \[\?, 3\]"),
            ([good, np.ones(4, np.float32)], r"output 'o' with shape \[4\], but the model declares \[3\]"),
            ([good, [np.ones(3, np.float32)]], "output 'o' as a list instead of a numpy array"),
        ]:
            with pytest.raises(RunError, match=message) as info:
                exe(answer).run(X)
            assert str(info.value).startswith("ort:cpu (backend ort) returned")

    def test_a_raw_bit_format_beside_a_sequence_is_refused_at_placement(self):
        model = make_model(
            [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["b"], ["c"])],
            [sequence_info("x", TensorProto.FLOAT, None), ("b", TensorProto.BFLOAT16, [2])],
            [sequence_info("y", TensorProto.FLOAT, None), ("c", TensorProto.BFLOAT16, [2])],
            opset=18,
        )
        with pytest.raises(hal.errors.CompileError, match="takes sequences and optionals .* only as numpy arrays, which cannot hold bfloat16"):
            hal.compile(model).to("ort:cpu", strict=True)
