"""When ``auto`` (or a fallback) moves on from its first choice after placement: a new input
shape the device answers wrong or cannot run (``verify="each-shape"``), and a first choice whose
answer the reference evaluator disputes.

The wrong device is test_verification's DriftBackend: onnxruntime with its answer perturbed for
some input sizes, or refusing a batch size (a stand-in for a runtime that miscompiles one shape,
as iree:local-task did for an OCR model; no real runtime here does it on demand).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import hal
from hal.errors import RunError, VerificationError
from test_verification import Counter, DriftBackend, _register, conv_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def drifting(fresh_registry):
    """drift:0 answers inputs with height 64 wrong and cannot run batch 2."""
    reg = fresh_registry()
    _register(reg, DriftBackend(wrong_sizes={64}, refuse_batch=2))
    Counter.runs = 0
    yield
    reg.remove_plugin("drift")


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _expected(compiled: hal.CompiledModel, x: np.ndarray) -> np.ndarray:
    return compiled.to("ort:cpu", verify=False).run({"x": x})["y"]


class TestShapeFailover:
    def test_a_wrong_shape_moves_to_the_next_device_and_the_others_stay(self, drifting, caplog):
        compiled = hal.compile(conv_model())
        exe = compiled.to("auto", verify="each-shape")
        assert exe.device.id == "drift:0"  # ranked first (a gpu) and right on the seeded check
        right, wrong = _x(1, 3, 48, 32), _x(1, 3, 64, 64, seed=1)
        with caplog.at_level(logging.WARNING, logger="hal"):
            got = exe.run({"x": wrong})["y"]
        np.testing.assert_allclose(got, _expected(compiled, wrong), rtol=1e-5, atol=1e-5)
        assert "moved from drift:0 to ort:cpu" in caplog.text
        step = exe.lowering[-1]
        assert step.kind == "fallback" and "(1, 3, 64, 64)" in step.detail and "answers differently" in step.detail

        runs = Counter.runs
        again = _x(1, 3, 64, 64, seed=2)  # the moved shape goes straight to ort:cpu
        np.testing.assert_allclose(exe.run({"x": again})["y"], _expected(compiled, again), rtol=1e-5, atol=1e-5)
        assert Counter.runs == runs
        np.testing.assert_allclose(exe.run({"x": right})["y"], _expected(compiled, right), rtol=1e-5, atol=1e-5)
        assert Counter.runs == runs + 1  # other shapes stay on the device

    def test_a_shape_the_device_cannot_run_moves_too(self, drifting):
        compiled = hal.compile(conv_model())
        exe = compiled.to("auto", verify="each-shape")
        x = _x(2, 3, 16, 16)
        np.testing.assert_allclose(exe.run({"x": x})["y"], _expected(compiled, x), rtol=1e-5, atol=1e-5)
        assert "Expected dim size > 2" in exe.lowering[-1].detail

    def test_an_explicit_device_with_a_fallback_fails_over(self, drifting):
        compiled = hal.compile(conv_model())
        exe = compiled.to("drift:0", verify="each-shape", fallback="ort:cpu")
        x = _x(1, 3, 64, 8)
        np.testing.assert_allclose(exe.run({"x": x})["y"], _expected(compiled, x), rtol=1e-5, atol=1e-5)
        assert "moved from drift:0 to ort:cpu" in exe.lowering[-1].detail

    def test_strict_raises_and_so_does_a_shape_no_other_device_takes(self, drifting):
        compiled = hal.compile(conv_model())
        with pytest.raises(VerificationError, match=r"\(1, 3, 64, 64\)"):
            compiled.to("drift:0", verify="each-shape", strict=True).run({"x": _x(1, 3, 64, 64)})
        alone = compiled.to("drift:0", verify="each-shape", fallback="drift:0")  # nobody else to ask
        with pytest.raises(VerificationError):
            alone.run({"x": _x(1, 3, 64, 64)})
        with pytest.raises(RunError, match="Expected dim size"):
            alone.run({"x": _x(2, 3, 8, 8)})

    def test_a_failure_on_a_shape_that_ran_before_is_not_moved(self, fresh_registry):
        reg = fresh_registry()
        backend = DriftBackend(offset=0.0)
        _register(reg, backend)
        try:
            compiled = hal.compile(conv_model())
            exe = compiled.to("auto", verify="each-shape")
            x = _x(2, 3, 8, 8)
            exe.run({"x": x})
            backend.refuse_batch = 2  # the device breaks later: a run error, not a shape's
            with pytest.raises(RunError, match="Expected dim size"):
                exe.run({"x": x})
        finally:
            reg.remove_plugin("drift")

    def test_many_threads_on_a_moved_shape_get_right_answers(self, drifting):
        from concurrent.futures import ThreadPoolExecutor

        compiled = hal.compile(conv_model())
        exe = compiled.to("auto", verify="each-shape")
        inputs = [_x(1, 3, 64 if i % 2 else 40, 16, seed=i) for i in range(32)]
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda x: exe.run({"x": x})["y"], inputs))
        for x, got in zip(inputs, outs):
            np.testing.assert_allclose(got, _expected(compiled, x), rtol=1e-5, atol=1e-5)
        assert sum(step.kind == "fallback" for step in exe.lowering) == 1


class EchoBackend(hal.Backend):
    """A CPU device answering ``y = answer(x)`` for any model; by default ``y = x``, what the
    broken evaluator below says a Relu is. ``echo:0`` ranks after ort:cpu (both CPUs)."""

    name = "echo"
    version = "1"

    def __init__(self, answer=lambda x: np.array(x, copy=True)) -> None:
        self.answer = answer

    def discover(self):
        caps = hal.Capabilities.from_levels(native=["float32"], opsets=hal.OpsetRange(1, 25))
        return [hal.Device(id="echo:0", backend="echo", vendor="test", name="echo", kind="cpu", capabilities=caps)]

    def prepare(self, model, device, options):
        answer = self.answer

        class Runner:
            def run(self, feeds, names):
                return [answer(feeds["x"]) for _ in names]

        return Runner()


class TestDisputedFirstChoice:
    """``auto``'s first device is ort:cpu and the ONNX reference evaluator disputes its answer
    (here the evaluator's Relu is broken on purpose, as onnx 1.23's LpNormalization p=1 is for
    real): a device that agrees with the evaluator is used instead; ort:cpu stays when another
    device agrees with it, or when asked for by name; with no other opinion, auto refuses."""

    @pytest.fixture
    def broken_evaluator(self, monkeypatch):
        from onnx.reference.ops import op_relu

        monkeypatch.setattr(op_relu.Relu, "_run", lambda self, x: (x,))

    @staticmethod
    def relu():
        from onnx import TensorProto, helper

        from hal.testing.build import make_model

        return make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2, 8])], [("y", TensorProto.FLOAT, [2, 8])])

    def _auto(self, fresh_registry, backend):
        reg = fresh_registry()
        _register(reg, backend)
        try:
            return hal.compile(self.relu()).to("auto")
        finally:
            reg.remove_plugin("echo")

    def test_a_device_agreeing_with_the_evaluator_replaces_a_disputed_ort_cpu(self, fresh_registry, broken_evaluator, caplog):
        with caplog.at_level(logging.WARNING, logger="hal"):
            exe = self._auto(fresh_registry, EchoBackend())
        assert exe.device.id == "echo:0"
        assert exe.verification.passed and exe.verification.reference == "onnx-reference"
        assert exe.lowering[0].kind == "fallback" and "ort:cpu's answer is disputed" in exe.lowering[0].detail
        assert "moved from ort:cpu to echo:0" in caplog.text

    def test_ort_cpu_stands_when_the_other_device_agrees_with_it(self, fresh_registry, broken_evaluator):
        exe = self._auto(fresh_registry, EchoBackend(lambda x: np.maximum(x, np.float32(0))))  # a right Relu
        assert exe.device.id == "ort:cpu" and exe.verification.disputed
        assert not any(step.kind == "fallback" for step in exe.lowering)

    def test_auto_refuses_a_disputed_ort_cpu_nobody_settles(self, fresh_registry, broken_evaluator):
        reg = fresh_registry()
        _register(reg, EchoBackend(lambda x: x[:1]))  # answers another shape: no opinion at all
        try:
            compiled = hal.compile(self.relu())
            with pytest.raises(VerificationError, match=r"ort:cpu's answer is disputed.*no other device settles it.*echo:0.*to\('ort:cpu'\)") as info:
                compiled.to("auto")
            assert info.value.report.disputed
            assert compiled.to("ort:cpu").verification.disputed  # by name: used, the dispute in its report
        finally:
            reg.remove_plugin("echo")

    def test_alone_ort_cpu_is_refused_under_auto_too(self, fresh_registry, broken_evaluator):
        fresh_registry()  # the embedded ort:cpu only, whatever plugins this environment loads
        with pytest.raises(VerificationError, match="no other device can run it"):
            hal.compile(self.relu()).to("auto")

    def test_without_a_dispute_auto_keeps_its_first_choice(self, fresh_registry):
        exe = self._auto(fresh_registry, EchoBackend())  # echo answers wrong, ort:cpu right
        assert exe.device.id == "ort:cpu" and exe.verification.passed

    def test_an_explicit_ort_cpu_is_kept_whatever_the_dispute(self, broken_evaluator):
        exe = hal.compile(self.relu()).to("ort:cpu")
        assert exe.device.id == "ort:cpu" and exe.verification.disputed


class LoudBackend(DriftBackend):
    """Right on seeded inputs (uniform in [-1, 1)), off by 0.5 once an input exceeds 1: wrong on
    real values at the very shape placement checked."""

    name = "drift"

    def prepare(self, model, device, options):
        inner = super().prepare(model, device, options)

        class Runner:
            def run(self, feeds, names):
                out = inner.run(feeds, names)
                loud = max(float(np.abs(v).max()) for v in feeds.values() if v.size)
                return [o + np.float32(0.5) if loud > 1 else o for o in out]

        return Runner()


class TestThePlacementShapeWithRealValues:
    def test_its_first_real_run_is_checked_and_moved(self, fresh_registry):
        reg = fresh_registry()
        _register(reg, LoudBackend(offset=0.0))
        try:
            compiled = hal.compile(conv_model())
            exe = compiled.to("auto", verify="each-shape")
            assert exe.device.id == "drift:0" and exe.verification.passed
            real = 3 * _x(1, 3, 16, 16)  # the seeded sizes: batch 1, other symbols 16
            np.testing.assert_allclose(exe.run({"x": real})["y"], _expected(compiled, real), rtol=1e-5, atol=1e-5)
            assert "moved from drift:0 to ort:cpu" in exe.lowering[-1].detail
            with pytest.raises(VerificationError, match=r"\(1, 3, 16, 16\)"):
                compiled.to("drift:0", strict=True, verify="each-shape").run({"x": real})
            # given as an example, the shape's real values were checked at placement: refused there
            with pytest.raises(VerificationError):
                compiled.to("drift:0", strict=True, verify="each-shape", example={"x": real})
        finally:
            reg.remove_plugin("drift")


class TestDisputedNewShape:
    """``auto`` with ``verify="each-shape"``: the evaluator disputes ort:cpu only at a later input
    shape (its Relu broken on purpose for 3 rows). The dispute is settled as at placement: a
    device agreeing with the evaluator takes that shape, one agreeing with ort:cpu keeps it there,
    and with neither the run is refused."""

    @pytest.fixture
    def broken_at_three_rows(self, monkeypatch):
        from onnx.reference.ops import op_relu

        right = op_relu.Relu._run
        monkeypatch.setattr(op_relu.Relu, "_run", lambda self, x: (x,) if x.shape[0] == 3 else right(self, x))

    @staticmethod
    def relu():
        from onnx import TensorProto, helper

        from hal.testing.build import make_model

        return make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, ["n", 8])], [("y", TensorProto.FLOAT, ["n", 8])])

    @staticmethod
    def as_the_evaluator(x):
        """Relu, except x itself for 3 rows: what the broken evaluator answers."""
        return np.array(x, copy=True) if x.shape[0] == 3 else np.maximum(x, np.float32(0))

    def _run(self, fresh_registry, backend, rows):
        reg = fresh_registry()
        _register(reg, backend)
        try:
            exe = hal.compile(self.relu()).to("auto", verify="each-shape")
            assert exe.device.id == "ort:cpu" and exe.verification.passed  # one row: no dispute
            one = exe.run({"x": _x(1, 8)})["y"]  # the placement's shape, real values: agreed
            np.testing.assert_array_equal(one, np.maximum(_x(1, 8), 0))
            return exe, exe.run({"x": _x(rows, 8, seed=1)})["y"]
        finally:
            reg.remove_plugin("echo")

    def test_a_device_agreeing_with_the_evaluator_takes_the_shape(self, fresh_registry, broken_at_three_rows, caplog):
        with caplog.at_level(logging.WARNING, logger="hal"):
            exe, got = self._run(fresh_registry, EchoBackend(self.as_the_evaluator), 3)
        np.testing.assert_array_equal(got, _x(3, 8, seed=1))  # the evaluator's (broken) Relu: echo's answer
        assert exe.lowering[-1].kind == "fallback" and "moved from ort:cpu to echo:0" in exe.lowering[-1].detail
        assert "disputed" in exe.lowering[-1].detail and "(3, 8)" in exe.lowering[-1].detail

    def test_ort_cpu_keeps_the_shape_when_another_device_agrees_with_it(self, fresh_registry, broken_at_three_rows, caplog):
        with caplog.at_level(logging.WARNING, logger="hal"):
            exe, got = self._run(fresh_registry, EchoBackend(lambda x: np.maximum(x, np.float32(0))), 3)
        np.testing.assert_array_equal(got, np.maximum(_x(3, 8, seed=1), 0))
        assert not any(step.kind == "fallback" for step in exe.lowering)
        assert "echo:0 answers as ort:cpu does, so it stands" in caplog.text

    def test_a_dispute_nobody_settles_is_refused(self, fresh_registry, broken_at_three_rows):
        with pytest.raises(VerificationError, match=r"\(3, 8\).*disputed.*no other device settles it.*echo:0"):
            self._run(fresh_registry, EchoBackend(lambda x: x[:1]), 3)

    def test_shapes_without_a_dispute_stay_where_they_are(self, fresh_registry, broken_at_three_rows):
        exe, got = self._run(fresh_registry, EchoBackend(self.as_the_evaluator), 2)
        np.testing.assert_array_equal(got, np.maximum(_x(2, 8, seed=1), 0))
        assert not any(step.kind == "fallback" for step in exe.lowering)
