"""Verification at placement: a device's answers against a reference before anyone relies on them.

The wrong device here is an in-process backend that computes with onnxruntime and then perturbs its answer on purpose (everywhere, or only for some input shapes, as a runtime that
miscompiles one shape does): a stand-in for hardware answering wrong, which no real runtime on
this machine does on demand.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper

import hal
from hal.errors import HalError, InputError, LoweringError, VerificationError
from hal.testing import models
from hal.model import TensorInfo
from hal.testing.build import make_model, sequence_info
from hal.verification import (
    TOLERANCES,
    Reference,
    Tolerance,
    compare,
    estimate_evaluator_seconds,
    seeded_feeds,
    tolerance_for,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))


class Counter:
    runs = 0


class DriftBackend(hal.Backend):
    """Answers right (onnxruntime), then adds ``offset`` to float outputs whose first input's axis 2 is in
    ``wrong_sizes`` (every size when None)."""

    name = "drift"
    version = "1"

    def __init__(self, offset: float = 0.1, wrong_sizes: set[int] | None = None, refuse_batch: int | None = None) -> None:
        self.offset = offset
        self.wrong_sizes = wrong_sizes
        self.refuse_batch = refuse_batch

    def discover(self):
        caps = hal.Capabilities.from_levels(native=["float32", "int64", "bool"], opsets=hal.OpsetRange(1, 25))
        return [hal.Device(id="drift:0", backend="drift", vendor="test", name="drift", kind="gpu", capabilities=caps)]

    def prepare(self, model, device, options):
        import onnxruntime

        # onnxruntime's own session, not the HAL's ort:cpu, and not the ONNX reference evaluator
        # (which TestDisputes breaks on purpose).
        session = onnxruntime.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        backend = self

        class Runner:
            def run(self, feeds, names):
                Counter.runs += 1
                first = next(iter(feeds.values()))
                if first.shape[0] == backend.refuse_batch:
                    raise RuntimeError(f"Expected dim size > {backend.refuse_batch}")
                out = session.run(list(names), dict(feeds))
                wrong = backend.wrong_sizes is None or (first.ndim > 2 and first.shape[2] in backend.wrong_sizes)
                return [o + np.float32(backend.offset) if wrong and o.dtype == np.float32 else o for o in out]

        return Runner()


def _register(reg, backend):
    class Plugin:
        @hal.hookimpl
        def hal_register_backends(self, register):
            register(backend)

    reg.add_plugin(Plugin(), name="drift")


@pytest.fixture
def drift(fresh_registry):
    reg = fresh_registry()
    backend = DriftBackend()
    _register(reg, backend)
    Counter.runs = 0
    yield backend
    reg.remove_plugin("drift")


def conv_model(dynamic: bool = True):
    """Conv + Relu with dynamic height and width, like the OCR models exporters write."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    dims = ["N", 3, "H", "W"] if dynamic else [1, 3, 8, 8]
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        [("x", TensorProto.FLOAT, dims)],
        [("y", TensorProto.FLOAT, ["N", 4, "H", "W"] if dynamic else [1, 4, 8, 8])],
        initializers=[w],
    )


class TestPlacementVerifies:
    def test_right_device_is_verified_and_says_against_what(self, linear_model):
        exe = hal.compile(linear_model).to("ort:cpu")
        step = exe.lowering[-1]
        assert step.kind == "verified"
        assert "onnx-reference" in step.detail
        assert exe.verification.passed
        assert exe.verification.checks[0].max_rel < TOLERANCES[hal.NumberFormat.FLOAT32].rtol

    def test_wrong_device_is_refused_with_the_figures(self, drift, linear_model):
        with pytest.raises(VerificationError) as info:
            hal.compile(linear_model).to("drift:0", strict=True)
        message = str(info.value)
        assert "output 'y'" in message and "max abs error 0.1" in message and "rtol=0.0001" in message
        report = info.value.report
        assert report.status == "failed" and report.reference == "onnx-reference"
        assert report.checks[0].max_abs == pytest.approx(0.1, rel=1e-3)

    def test_auto_skips_a_wrong_device_with_a_warning_and_a_step(self, drift, linear_model, caplog):
        # drift:0 is a "gpu": auto ranks it first, verification moves the model on.
        with caplog.at_level(logging.WARNING, logger="hal.compile"):
            exe = hal.compile(linear_model).to("auto")
        assert exe.device.id == "ort:cpu"
        assert exe.lowering[0].kind == "fallback" and "drift:0" in exe.lowering[0].detail
        assert "answers differently" in exe.lowering[0].detail
        assert any("drift:0" in r.getMessage() for r in caplog.records)
        x = np.ones((3, 8), np.float32)
        np.testing.assert_allclose(exe.run({"x": x})["y"], hal.compile(linear_model).to("ort:cpu").run({"x": x})["y"])

    def test_a_device_list_moves_on_too(self, drift, linear_model):
        exe = hal.compile(linear_model).to(["drift:0", "ort:cpu"])
        assert exe.device.id == "ort:cpu"
        assert "drift:0" in exe.lowering[0].detail

    def test_verify_false_accepts_the_device_unchecked(self, drift, linear_model):
        exe = hal.compile(linear_model).to("drift:0", verify=False, strict=True)
        assert exe.device.id == "drift:0"
        assert not any(s.kind in ("verified", "unverified") for s in exe.lowering)

    def test_bad_verify_value_is_an_input_error(self, linear_model):
        with pytest.raises(InputError, match="verify="):
            hal.compile(linear_model).to("ort:cpu", verify="sometimes")

    def test_small_offsets_within_the_tolerance_pass(self, fresh_registry, linear_model):
        reg = fresh_registry()
        _register(reg, DriftBackend(offset=1e-7))
        try:
            exe = hal.compile(linear_model).to("drift:0", strict=True)
            assert exe.verification.passed
        finally:
            reg.remove_plugin("drift")


class TestVerdictCache:
    def test_warm_to_does_not_verify_again(self, drift, linear_model, monkeypatch):
        compiled = hal.compile(linear_model)
        compiled.to("ort:cpu", verify=True)
        calls = []
        monkeypatch.setattr(Reference, "run", lambda self, *a, **k: calls.append(1))
        again = hal.compile(linear_model).to("ort:cpu")
        assert calls == []
        assert again.lowering[-1].kind == "verified"

    def test_a_failed_verdict_is_remembered(self, drift, linear_model):
        with pytest.raises(VerificationError):
            hal.compile(linear_model).to("drift:0", strict=True)
        runs = Counter.runs
        with pytest.raises(VerificationError):
            hal.compile(linear_model).to("drift:0", strict=True)
        assert Counter.runs == runs  # refused from the cached verdict, without running it again

    def test_verdict_depends_on_the_example(self, drift, linear_model):
        compiled = hal.compile(linear_model)
        compiled.to("ort:cpu")
        x = np.full((5, 8), 2.0, np.float32)
        exe = compiled.to("ort:cpu", example={"x": x})
        assert exe.verification.passed


class TestEachShape:
    def test_a_shape_the_device_gets_wrong_raises_on_its_first_run(self, fresh_registry):
        reg = fresh_registry()
        _register(reg, DriftBackend(wrong_sizes={64}))
        try:
            compiled = hal.compile(conv_model())
            exe = compiled.to("drift:0", strict=True, verify="each-shape")
            right = np.random.default_rng(1).standard_normal((1, 3, 48, 32)).astype(np.float32)
            expected = compiled.to("ort:cpu").run({"x": right})["y"]
            np.testing.assert_allclose(exe.run({"x": right})["y"], expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(exe.run({"x": right})["y"], expected, rtol=1e-5, atol=1e-5)
            wrong = np.ones((1, 3, 64, 64), np.float32)
            with pytest.raises(VerificationError, match=r"shape \{'x': \(1, 3, 64, 64\)\}.*answers differently"):
                exe.run({"x": wrong})
        finally:
            reg.remove_plugin("drift")

    def test_default_verification_covers_one_shape_only(self, fresh_registry):
        # What each-shape is for: the same device passes placement and answers wrong later.
        reg = fresh_registry()
        _register(reg, DriftBackend(wrong_sizes={64}))
        try:
            exe = hal.compile(conv_model()).to("drift:0", strict=True)
            assert exe.verification.passed
            out = exe.run({"x": np.ones((1, 3, 64, 64), np.float32)})["y"]
            assert out.shape == (1, 4, 64, 64)
        finally:
            reg.remove_plugin("drift")


class TestReference:
    def test_ort_cpu_is_never_its_own_reference(self, monkeypatch, linear_model):
        monkeypatch.setenv("HAL_VERIFY_BUDGET_S", "0")
        exe = hal.compile(linear_model).to("ort:cpu")
        assert exe.lowering[-1].kind == "unverified"
        assert "never verified against itself" in exe.lowering[-1].detail
        assert exe.verification.status == "skipped"

    def test_other_devices_fall_back_to_ort_cpu(self, drift, monkeypatch, linear_model):
        monkeypatch.setenv("HAL_VERIFY_BUDGET_S", "0")
        with pytest.raises(VerificationError, match="from ort:cpu"):
            hal.compile(linear_model).to("drift:0", strict=True)

    def test_over_budget_models_are_estimated_not_run(self):
        compiled = hal.compile(models.transformer_encoder())  # shape inference leaves the shapes
        feeds = seeded_feeds(compiled.inputs)
        assert estimate_evaluator_seconds(compiled.model.proto, feeds) > 0.5
        small = hal.compile(models.mlp(batch=2, width=16, layers=2))
        assert estimate_evaluator_seconds(small.model.proto, seeded_feeds(small.inputs)) < 0.05

    def test_the_deadline_stops_a_slow_evaluator(self, monkeypatch, linear_model):
        import time

        from onnx.reference.ops import op_matmul

        real = op_matmul.MatMul._run
        monkeypatch.setattr(op_matmul.MatMul, "_run", lambda self, a, b: (time.sleep(0.3), real(self, a, b))[1])
        reference = Reference(hal.compile(linear_model).model.proto, exclude="", ort_cpu=lambda: hal.compile(linear_model).to("ort:cpu", verify=False), budget=0.05)
        outputs, name = reference.run(seeded_feeds(hal.load(linear_model).inputs))
        assert name == "ort:cpu"
        assert outputs["y"].shape == (1, 4)

    def test_bad_budget_is_named(self, monkeypatch, linear_model):
        monkeypatch.setenv("HAL_VERIFY_BUDGET_S", "soon")
        with pytest.raises(HalError, match="HAL_VERIFY_BUDGET_S"):
            hal.compile(linear_model).to("ort:cpu")


class TestOrtReference:
    """Over the evaluator's budget the reference is onnxruntime's CPU provider on the model as it
    is (a plain session: no lowering, no optimized-model file); the HAL's ort:cpu placement only
    where the plain session cannot take the model."""

    @staticmethod
    def reference(model):
        built = []

        def hal_ort_cpu():
            built.append(1)
            return hal.compile(model).to("ort:cpu", verify=False, fallback=None)

        compiled = hal.compile(model)
        reference = Reference(compiled.model.proto, exclude="", ort_cpu=hal_ort_cpu, budget=0, weights=compiled.model.weights)
        return reference, built, compiled

    @staticmethod
    def ort_files(tmp_path):
        return sorted((tmp_path / "cache").rglob("*.ort.onnx"))

    def test_a_right_device_passes_without_the_hal_placing_ort_cpu(self, fresh_registry, monkeypatch, linear_model, tmp_path):
        monkeypatch.setenv("HAL_VERIFY_BUDGET_S", "0")
        reg = fresh_registry()
        _register(reg, DriftBackend(offset=0.0))
        try:
            exe = hal.compile(linear_model).to("drift:0", strict=True)
        finally:
            reg.remove_plugin("drift")
        assert exe.verification.passed and exe.verification.reference == "ort:cpu"
        assert self.ort_files(tmp_path) == []  # the HAL's ort:cpu would have cached its optimized model

    def test_a_wrong_device_is_still_refused(self, drift, monkeypatch, linear_model, tmp_path):
        monkeypatch.setenv("HAL_VERIFY_BUDGET_S", "0")
        with pytest.raises(VerificationError, match="from ort:cpu") as info:
            hal.compile(linear_model).to("drift:0", strict=True)
        assert info.value.report.reference == "ort:cpu"
        assert info.value.report.checks[0].max_abs == pytest.approx(0.1, rel=1e-3)
        assert self.ort_files(tmp_path) == []

    def test_outputs_by_name_as_the_hal_gives_them(self, linear_model):
        reference, built, compiled = self.reference(linear_model)
        feeds = seeded_feeds(compiled.inputs)
        outputs, name = reference.run(feeds)
        assert name == "ort:cpu" and built == []
        expected = compiled.to("ort:cpu", verify=False).run(feeds)
        assert outputs.keys() == expected.keys()
        np.testing.assert_allclose(outputs["y"], expected["y"], rtol=1e-6)
        assert reference.second_opinion(feeds)[1] == "ort:cpu" and built == []

    def test_a_run_error_is_a_hal_error(self, linear_model):
        reference, built, _ = self.reference(linear_model)
        with pytest.raises(HalError, match="ort:cpu failed on the inputs: "):
            reference.run({"x": np.ones((2, 9), np.float32)})  # 9 columns where w has 8 rows
        assert built == []

    def test_a_sequence_model_uses_the_hals_ort_cpu(self, fresh_registry, monkeypatch, tmp_path):
        reference, built, compiled = self.reference(sequence_model())
        outputs, name = reference.run(seeded_feeds(compiled.inputs))
        assert name == "ort:cpu" and built == [1] and len(outputs["y"]) == 2
        monkeypatch.setenv("HAL_VERIFY_BUDGET_S", "0")
        reg = fresh_registry()
        _register(reg, SequenceDriftBackend())
        try:
            with pytest.raises(VerificationError, match=r"from ort:cpu.*output 'y': element 1: max abs error 0.1"):
                hal.compile(sequence_model()).to("seqdrift:0", strict=True)
        finally:
            reg.remove_plugin("seqdrift")
        assert self.ort_files(tmp_path)  # the reference was the HAL's ort:cpu placement

    def test_bfloat16_inputs_use_the_hals_ort_cpu(self):
        # numpy cannot hand onnxruntime bfloat16 arrays; the HAL's runner passes their bits.
        model = make_model(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
            [("x", TensorProto.BFLOAT16, [2, 3])], [("y", TensorProto.FLOAT, [2, 3])],
        )
        reference, built, compiled = self.reference(model)
        feeds = seeded_feeds(compiled.inputs)
        outputs, _ = reference.run(feeds)
        assert built == [1]
        np.testing.assert_array_equal(outputs["y"], feeds["x"].astype(np.float32))

    def test_external_weights_use_the_hals_ort_cpu(self, linear_model, tmp_path):
        import onnx
        from onnx import numpy_helper

        for t in linear_model.graph.initializer:  # only raw_data goes external
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
        path = tmp_path / "linear.onnx"
        onnx.save_model(linear_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="linear.data", size_threshold=0)
        reference, built, compiled = self.reference(path)
        assert compiled.model.weights is not None
        feeds = seeded_feeds(compiled.inputs)
        outputs, _ = reference.run(feeds)
        assert built == [1]
        np.testing.assert_allclose(outputs["y"], compiled.to("ort:cpu", verify=False).run(feeds)["y"], rtol=1e-6)


class TestSeededFeeds:
    def test_symbols_get_one_size_and_examples_fix_them(self):
        inputs = hal.load(make_model(
            [helper.make_node("Add", ["a", "b"], ["y"])],
            [("a", TensorProto.FLOAT, ["N", "T"]), ("b", TensorProto.FLOAT, ["N", "T"])],
            [("y", TensorProto.FLOAT, ["N", "T"])],
        )).inputs
        feeds = seeded_feeds(inputs)
        assert feeds["a"].shape == feeds["b"].shape
        fixed = seeded_feeds(inputs, example={"a": np.zeros((3, 7), np.float32)})
        assert fixed["b"].shape == (3, 7)
        np.testing.assert_array_equal(seeded_feeds(inputs)["a"], feeds["a"])  # seeded: reproducible

    def test_unknown_example_name_is_refused(self, linear_model):
        with pytest.raises(InputError, match="not inputs of the model"):
            seeded_feeds(hal.load(linear_model).inputs, example={"z": np.zeros(1)})

    def test_every_format_gets_its_own_dtype(self):
        from hal.model import TensorInfo

        for fmt in (hal.NumberFormat.BFLOAT16, hal.NumberFormat.FLOAT8_E4M3FN, hal.NumberFormat.INT4,
                    hal.NumberFormat.INT64, hal.NumberFormat.BOOL, hal.NumberFormat.FLOAT8_E8M0):
            array = seeded_feeds([TensorInfo("x", fmt, (2, "n"))])["x"]
            assert array.dtype == fmt.dtype and array.shape == (2, 16)
            assert np.all(np.isfinite(array.astype(np.float32))) if fmt.is_float else True


class TestCompare:
    def _info(self, fmt=hal.NumberFormat.FLOAT32):
        from hal.model import TensorInfo

        return [TensorInfo("y", fmt, None)]

    def test_normwise_tolerance(self):
        want = np.array([1000.0, 1e-3], np.float32)
        (ok,) = compare({"y": want + np.float32(0.05)}, {"y": want}, self._info())
        assert ok.passed  # 0.05 <= 1e-6 + 1e-4 * 1000
        (bad,) = compare({"y": want + np.float32(0.2)}, {"y": want}, self._info())
        assert not bad.passed and bad.max_rel == pytest.approx(2e-4, rel=1e-2)

    def test_nan_and_inf_must_sit_in_the_same_places(self):
        want = np.array([np.nan, np.inf, 1.0], np.float32)
        assert compare({"y": want.copy()}, {"y": want}, self._info())[0].passed
        assert not compare({"y": np.array([0.0, np.inf, 1.0], np.float32)}, {"y": want}, self._info())[0].passed
        assert not compare({"y": np.array([np.nan, -np.inf, 1.0], np.float32)}, {"y": want}, self._info())[0].passed

    def test_shape_dtype_and_integers(self):
        assert "shape" in compare({"y": np.zeros(3, np.float32)}, {"y": np.zeros(4, np.float32)}, self._info())[0].reason
        assert "element type" in compare({"y": np.zeros(3, np.float64)}, {"y": np.zeros(3, np.float32)}, self._info())[0].reason
        ints = self._info(hal.NumberFormat.INT64)
        (check,) = compare({"y": np.array([1, 2, 4])}, {"y": np.array([1, 2, 3])}, ints)
        assert not check.passed and "1 of 3 elements differ" in check.reason

    def test_overrides_and_reduced_precision(self):
        want = np.array([1.0, 2.0], np.float32)
        got = want * np.float32(1.01)
        assert not compare({"y": got}, {"y": want}, self._info())[0].passed
        assert compare({"y": got}, {"y": want}, self._info(), reduced_precision=True)[0].passed
        assert compare({"y": got}, {"y": want}, self._info(), rtol=0.05)[0].passed
        assert tolerance_for(hal.NumberFormat.INT8) == Tolerance(0.0, 0.0)

    def test_missing_outputs_fail(self):
        assert "missing" in compare({}, {"y": np.zeros(1, np.float32)}, self._info())[0].reason



class SequenceDriftBackend(hal.Backend):
    """Passes sequences (onnxruntime's own session), and adds ``offset`` to the last element of
    each sequence output: a device that answers one element wrong."""

    name = "seqdrift"
    version = "1"

    def __init__(self, offset: float = 0.1) -> None:
        self.offset = offset

    def discover(self):
        caps = hal.Capabilities.from_levels(native=["float32", "int64"], opsets=hal.OpsetRange(1, 25), io_kinds=["sequence"])
        return [hal.Device(id="seqdrift:0", backend="seqdrift", vendor="test", name="seqdrift", kind="gpu", capabilities=caps)]

    def prepare(self, model, device, options):
        import onnxruntime

        session = onnxruntime.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        offset = np.float32(self.offset)

        class Runner:
            def run(self, feeds, names):
                out = session.run(list(names), dict(feeds))
                return [[*o[:-1], o[-1] + offset] if isinstance(o, list) and o else o for o in out]

        return Runner()


def sequence_model():
    """Each element of a sequence doubled (SequenceMap), and the sequence's elements summed."""
    body = helper.make_graph(
        [helper.make_node("Add", ["e", "e"], ["d"])], "double",
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", 3])], [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["n", 3])],
    )
    nodes = [helper.make_node("SequenceMap", ["x"], ["y"], body=body),
             helper.make_node("ConcatFromSequence", ["x"], ["c"], axis=0),
             helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0)]
    return make_model(nodes, [sequence_info("x", TensorProto.FLOAT, ["n", 3])],
                      [sequence_info("y", TensorProto.FLOAT, ["n", 3]), ("s", TensorProto.FLOAT, [])], opset=18)


class TestSequencesAndOptionals:
    def test_seeded_sequences_hold_two_elements_and_optionals_one_array(self):
        inputs = [TensorInfo("s", hal.NumberFormat.FLOAT32, ("n", 3), "sequence"),
                  TensorInfo("o", hal.NumberFormat.INT64, ("n",), "optional"),
                  TensorInfo("os", hal.NumberFormat.BOOL, (2,), "optional-sequence")]
        feeds = seeded_feeds(inputs)
        assert [a.shape for a in feeds["s"]] == [(1, 3), (1, 3)] and feeds["s"][0].dtype == np.float32
        assert isinstance(feeds["o"], np.ndarray) and feeds["o"].shape == (1,)
        assert [a.dtype for a in feeds["os"]] == [np.bool_, np.bool_]
        fixed = seeded_feeds(inputs, example={"s": [np.zeros((4, 3), np.float32)], "os": None})
        assert fixed["o"].shape == (4,) and fixed["os"] is None  # the example's first element fixes n

    def test_compare_goes_element_by_element(self):
        info = [TensorInfo("y", hal.NumberFormat.FLOAT32, None, "sequence")]
        want = [np.ones(2, np.float32), np.full(3, 100.0, np.float32)]
        (same,) = compare({"y": [w.copy() for w in want]}, {"y": want}, info)
        assert same.passed and same.max_abs == 0
        (close,) = compare({"y": [want[0], want[1] + np.float32(0.005)]}, {"y": want}, info)
        assert close.passed  # 0.005 <= 1e-6 + 1e-4 * 100, the float32 tolerance of element 1
        (off,) = compare({"y": [want[0] + np.float32(0.1), want[1]]}, {"y": want}, info)
        assert not off.passed and off.reason.startswith("element 0: max abs error 0.1")
        assert compare({"y": want[:1]}, {"y": want}, info)[0].reason == "1 elements, the reference gives 2"
        assert "element 1: shape [2]" in compare({"y": [want[0], want[0]]}, {"y": want}, info)[0].reason
        assert compare({"y": []}, {"y": []}, info)[0].passed

    def test_compare_an_optional_absent_in_both_or_present_in_both(self):
        info = [TensorInfo("y", hal.NumberFormat.INT64, None, "optional")]
        assert compare({"y": None}, {"y": None}, info)[0].passed
        assert compare({"y": np.arange(3)}, {"y": np.arange(3)}, info)[0].passed
        assert compare({"y": None}, {"y": np.arange(3)}, info)[0].reason == "absent, where the reference's is present"
        assert compare({"y": np.arange(3)}, {"y": None}, info)[0].reason == "present, where the reference's is absent"
        assert "missing" in compare({}, {"y": None}, info)[0].reason

    def test_placement_verifies_a_sequence_model(self):
        exe = hal.compile(sequence_model()).to("ort:cpu")
        assert exe.verification.passed and exe.verification.reference == "onnx-reference"
        assert {c.name for c in exe.verification.checks} == {"y", "s"}

    def test_a_device_wrong_in_one_element_is_refused(self, fresh_registry):
        reg = fresh_registry()
        _register(reg, SequenceDriftBackend())
        try:
            compiled = hal.compile(sequence_model())
            with pytest.raises(VerificationError, match=r"seqdrift:0 answers differently .*output 'y': element 1: max abs error 0.1"):
                compiled.to("seqdrift:0", strict=True)
            assert compiled.to("auto").device.id == "ort:cpu"  # the accelerator is skipped
            (report,) = compiled.verify(["seqdrift:0"], example={"x": [np.ones((2, 3), np.float32)]})
            assert report.status == "failed" and report.checks[0].reason.startswith("element 0: max abs error 0.1")
        finally:
            reg.remove_plugin("seqdrift")

    def test_each_shape_tells_sequences_apart_by_their_elements_shapes(self, fresh_registry):
        exe = hal.compile(sequence_model()).to("ort:cpu", verify="each-shape")
        x = [np.ones((1, 3), np.float32), np.ones((5, 3), np.float32)]
        assert exe.run({"x": x})["s"] == 18
        assert len(exe.runner._seen) == 1  # this one (seeded values leave placement's shape to its first real run)  # noqa: SLF001
        exe.run({"x": [np.ones((2, 3), np.float32)]})
        assert len(exe.runner._seen) == 2  # noqa: SLF001


class TestVerifyCommand:
    def test_every_device_with_figures(self, drift, linear_model):
        reports = {r.device: r for r in hal.compile(linear_model).verify()}
        assert reports["ort:cpu"].passed
        assert reports["drift:0"].status == "failed"
        assert reports["drift:0"].checks[0].max_abs == pytest.approx(0.1, rel=1e-3)

    def test_overridden_tolerance_and_example(self, drift, linear_model):
        (loose,) = hal.compile(linear_model).verify(["drift:0"], rtol=1.0, example={"x": np.ones((2, 8), np.float32)})
        assert loose.passed and loose.checks[0].tolerance.rtol == 1.0

    def test_unknown_device_is_the_callers_mistake(self, linear_model):
        with pytest.raises(hal.errors.UnknownDeviceError):
            hal.compile(linear_model).verify(["nope:0"])

    def test_cli_exits_1_when_a_device_differs(self, drift, linear_model, tmp_path, capsys):
        import json

        import onnx

        from hal.cli import main

        path = tmp_path / "m.onnx"
        onnx.save(linear_model, path)
        assert main(["verify", str(path), "--devices", "ort:cpu"]) == 0
        assert "pass" in capsys.readouterr().out
        assert main(["verify", str(path), "--devices", "ort:cpu", "drift:0", "--json"]) == 1
        rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["drift:0"]["status"] == "failed" and rows["ort:cpu"]["status"] == "passed"
        np.save(tmp_path / "x.npy", np.ones((3, 8), np.float32))
        assert main(["verify", str(path), "--devices", "drift:0", "--input", f"x={tmp_path / 'x.npy'}", "--atol", "0.5"]) == 0


class TestDisputes:
    """The ONNX reference evaluator is not always right (onnx 1.23 computes LpNormalization p=1
    without the absolute value): a device that matches ort:cpu is not refused on its word alone.
    Here the evaluator's Relu is broken on purpose."""

    @pytest.fixture
    def broken_evaluator(self, monkeypatch):
        from onnx.reference.ops import op_relu

        monkeypatch.setattr(op_relu.Relu, "_run", lambda self, x: (x,))

    def relu_model(self):
        return make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2, 8])], [("y", TensorProto.FLOAT, [2, 8])])

    def test_a_device_matching_ort_cpu_passes_with_the_dispute_noted(self, fresh_registry, broken_evaluator):
        reg = fresh_registry()
        _register(reg, DriftBackend(offset=0.0))
        try:
            exe = hal.compile(self.relu_model()).to("drift:0", strict=True)
        finally:
            reg.remove_plugin("drift")
        assert exe.verification.passed and exe.verification.reference == "ort:cpu"

    def test_ort_cpu_against_a_wrong_evaluator_is_left_unverified(self, broken_evaluator):
        exe = hal.compile(self.relu_model()).to("ort:cpu", strict=True)
        assert exe.verification.status == "skipped"
        assert "disputed" in exe.verification.detail and exe.lowering[-1].kind == "unverified"

    def test_a_device_wrong_against_both_is_refused(self, drift, broken_evaluator):
        with pytest.raises(VerificationError):
            hal.compile(self.relu_model()).to("drift:0", strict=True)


class TestSeededInputsTheDeviceRefuses:
    def test_seeded_inputs_leave_it_unverified_real_ones_refuse_it(self, fresh_registry, linear_model):
        reg = fresh_registry()
        _register(reg, DriftBackend(offset=0.0, refuse_batch=1))  # seeded batch is 1
        try:
            exe = hal.compile(linear_model).to("drift:0", strict=True)
            assert exe.verification.status == "skipped" and "refused the seeded inputs" in exe.verification.detail
            with pytest.raises(VerificationError, match="Expected dim size"):
                hal.compile(linear_model).to("drift:0", strict=True, example={"x": np.ones((1, 8), np.float32)})
        finally:
            reg.remove_plugin("drift")


class TestInputsOutsideTheModelsDomain:
    """Seeded integers include 0; as a divisor (a step, a count, a modulus) some runtimes trap on
    it and the process ends (IREE's STFT with frame_step 0: SIGFPE). The reference sees the zero
    division first, and the device is never run on such inputs."""

    @staticmethod
    def int_div_model():
        return make_model(
            [helper.make_node("Div", ["a", "b"], ["y"])],
            [("a", TensorProto.INT64, [16]), ("b", TensorProto.INT64, [16])],
            [("y", TensorProto.INT64, [16])],
        )

    def test_a_zero_divisor_leaves_the_device_unrun_and_unverified(self, fresh_registry):
        feeds = seeded_feeds(hal.compile(self.int_div_model()).model.inputs)
        assert (feeds["b"] == 0).any(), "the seeded divisor has no zero: the test would not test anything"
        reg = fresh_registry()
        _register(reg, DriftBackend(offset=0.0))
        try:
            before = Counter.runs
            exe = hal.compile(self.int_div_model()).to("drift:0", strict=True)
            assert Counter.runs == before, "the device was run on inputs that divide by zero"
        finally:
            reg.remove_plugin("drift")
        assert exe.verification.status == "skipped" and "divide by zero" in exe.verification.detail
        assert exe.lowering[-1].kind == "unverified"

    def test_an_example_inside_the_domain_is_verified(self, fresh_registry):
        reg = fresh_registry()
        _register(reg, DriftBackend(offset=0.0))
        try:
            example = {"a": np.arange(16, dtype=np.int64), "b": np.full(16, 3, np.int64)}
            exe = hal.compile(self.int_div_model()).to("drift:0", strict=True, example=example)
        finally:
            reg.remove_plugin("drift")
        assert exe.verification.passed

    def test_seeded_inputs_with_an_empty_answer_leave_the_device_unrun(self, fresh_registry):
        """CenterCropPad to a seeded shape [0, 0, 1]: the reference answers an empty tensor, which
        proves nothing, and IREE corrupted its heap there (the process ended)."""
        model = make_model(
            [helper.make_node("CenterCropPad", ["x", "shape"], ["y"])],
            [("x", TensorProto.FLOAT, [10, 7, 3]), ("shape", TensorProto.INT64, [3])],
            [("y", TensorProto.FLOAT, ["a", "b", "c"])],
            opset=18,
        )
        feeds = seeded_feeds(hal.compile(model).model.inputs)
        assert 0 in feeds["shape"], "the seeded shape has no 0: the test would not test anything"
        reg = fresh_registry()
        _register(reg, DriftBackend(offset=0.0))
        try:
            before = Counter.runs
            exe = hal.compile(model).to("drift:0", strict=True)
            assert Counter.runs == before, "the device was run on inputs whose answer is empty"
            real = {"x": np.ones((10, 7, 3), np.float32), "shape": np.array([4, 4, 3], np.int64)}
            verified = hal.compile(model).to("drift:0", strict=True, example=real)
        finally:
            reg.remove_plugin("drift")
        assert exe.verification.status == "skipped" and "empty outputs (y (0, 0, 1))" in exe.verification.detail
        assert verified.verification.passed


class TestWhatCannotBeCompared:
    def test_a_model_that_draws_random_numbers_is_left_unverified(self):
        """Bernoulli draws differ between runtimes (a seed fixes them within one only): comparing
        would refuse every device but the reference."""
        model = make_model(
            [helper.make_node("Bernoulli", ["p"], ["y"], seed=1.0)],
            [("p", TensorProto.FLOAT, [64])],
            [("y", TensorProto.FLOAT, [64])],
            opset=15,
        )
        exe = hal.compile(model).to("ort:cpu", strict=True)
        assert exe.verification.status == "skipped"
        assert "draws random numbers (Bernoulli)" in exe.verification.detail

    def test_a_declared_empty_axis_is_seeded_empty(self):
        """A dimension declared 0 is a static empty axis (ReduceL1's empty ``axes``), not an
        unknown size: seeding it 16 long changed what the model computes."""
        infos = hal.compile(
            make_model(
                [helper.make_node("ReduceL1", ["x", "axes"], ["y"], keepdims=1)],
                [("x", TensorProto.FLOAT, [3, 2, 2]), ("axes", TensorProto.INT64, [0])],
                [("y", TensorProto.FLOAT, [1, 1, 1])],
                opset=18,
            )
        ).model.inputs
        feeds = seeded_feeds(infos)
        assert feeds["axes"].shape == (0,) and feeds["x"].shape == (3, 2, 2)


class TestMlDtypesOutputs:
    """bfloat16 and float8 outputs are ml_dtypes arrays (numpy kind "V"): they are held to their
    row of TOLERANCES, not compared bit for bit (bf16 attention differs by an ulp between runtimes)."""

    def test_bfloat16_within_its_tolerance_passes_and_beyond_fails(self):
        import ml_dtypes

        from hal.capabilities import NumberFormat

        want = np.linspace(-4, 4, 64, dtype=np.float32).astype(ml_dtypes.bfloat16)
        ulp = (want.astype(np.float32) * np.float32(1.01)).astype(ml_dtypes.bfloat16)  # a step or two
        info = [TensorInfo("y", NumberFormat.BFLOAT16, (64,))]
        close = compare({"y": ulp}, {"y": want}, info)
        assert close[0].passed and 0 < close[0].max_abs <= 0.1
        far = compare({"y": (want.astype(np.float32) + np.float32(0.5)).astype(ml_dtypes.bfloat16)}, {"y": want}, info)
        assert not far[0].passed and far[0].tolerance == TOLERANCES[NumberFormat.BFLOAT16]

    def test_float8_and_integers_keep_their_own_rules(self):
        import ml_dtypes

        from hal.capabilities import NumberFormat

        want = np.array([0.5, 1.0, 2.0], np.float32).astype(ml_dtypes.float8_e4m3fn)
        got = np.array([0.5, 1.0, 2.25], np.float32).astype(ml_dtypes.float8_e4m3fn)
        assert compare({"y": got}, {"y": want}, [TensorInfo("y", NumberFormat.FLOAT8_E4M3FN, (3,))])[0].passed
        ints = compare({"z": np.array([1, 2], np.int8)}, {"z": np.array([1, 3], np.int8)}, [TensorInfo("z", NumberFormat.INT8, (2,))])
        assert not ints[0].passed and "exact match required" in ints[0].reason

    def test_e8m0_must_match_exactly(self):
        """One rounding step off in an e8m0 scale is twice the scale, however small the element
        (OpenVINO's Cast with round_mode="up" gives 1 for 1.1, where the answer is 2)."""
        import ml_dtypes

        from hal.capabilities import NumberFormat

        want = np.array([0.125, 2.0, 8.0], np.float32).astype(ml_dtypes.float8_e8m0fnu)
        info = [TensorInfo("s", NumberFormat.FLOAT8_E8M0, (3,))]
        assert compare({"s": want.copy()}, {"s": want}, info)[0].passed
        one_step = np.array([0.125, 1.0, 8.0], np.float32).astype(ml_dtypes.float8_e8m0fnu)
        (check,) = compare({"s": one_step}, {"s": want}, info)
        assert not check.passed and check.max_abs == 1.0


class TestUndefinedInputs:
    def test_inputs_cast_to_e8m0_are_drawn_positive(self):
        """ONNX leaves negative values cast to float8 e8m0 undefined (onnxruntime and the
        evaluator differ there): seeded inputs feeding such a Cast are positive, the rest not."""
        from onnx import TensorProto, helper

        from hal.testing.build import make_model
        from hal.verification import positive_inputs, seeded_feeds

        model = make_model(
            [helper.make_node("Cast", ["s"], ["e"], to=TensorProto.FLOAT8E8M0), helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["x"], ["z"])],
            [("s", TensorProto.FLOAT, [64]), ("x", TensorProto.FLOAT, [64])],
            [("y", TensorProto.FLOAT, [64]), ("z", TensorProto.FLOAT, [64])],
            opset=24, ir_version=11,
        )
        assert positive_inputs(model) == {"s"}
        compiled = hal.compile(model)
        feeds = seeded_feeds(compiled.model.inputs, positive=positive_inputs(model))
        assert (feeds["s"] >= 0.5).all() and (feeds["x"] < 0).any()
        cpu = next(d for d in hal.devices() if d.id == "ort:cpu")
        if cpu.capabilities.support("float8_e8m0") is hal.Support.NONE:  # an onnxruntime without e8m0 (1.24)
            with pytest.raises(LoweringError, match="float8_e8m0"):
                compiled.to("ort:cpu", strict=True)
            return
        assert compiled.to("ort:cpu", strict=True).verification.passed  # no dispute over undefined values
