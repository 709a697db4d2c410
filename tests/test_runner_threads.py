"""One Executable called from many threads gives every caller its own right answer.

The in-core runners: ort:cpu (onnxruntime sessions run concurrently; the raw-bits path for
ml_dtypes builds its OrtValues per call) and the example plugin (ONNX's reference evaluator keeps
no state between runs). Plugins test their own runners (hal-openvino, hal-iree).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

import hal
from hal.testing.build import make_model

ROOT = Path(__file__).resolve().parent.parent
THREADS, CALLS = 8, 200
W = (np.arange(48, dtype=np.float32).reshape(6, 8) - 24) / 16

Feeds = dict[str, np.ndarray]


def _affine():
    """y = a @ W + b (W a constant), two float32 inputs."""
    return make_model(
        [
            helper.make_node("Constant", [], ["w"], value=helper.make_tensor("wv", TensorProto.FLOAT, [6, 8], W.ravel())),
            helper.make_node("MatMul", ["a", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        [("a", TensorProto.FLOAT, [3, 6]), ("b", TensorProto.FLOAT, [3, 8])],
        [("y", TensorProto.FLOAT, [3, 8])],
    )


def _affine_feeds(t: int, i: int) -> Feeds:
    rng = np.random.default_rng(t * 10_000 + i)
    return {"a": rng.standard_normal((3, 6)).astype(np.float32), "b": np.full((3, 8), t * 1000 + i, np.float32)}


def _affine_want(feeds: Feeds) -> np.ndarray:
    return feeds["a"] @ W + feeds["b"]


def _hammer(exe: hal.Executable, feeds_for: Callable[[int, int], Feeds], want_for: Callable[[Feeds], np.ndarray]) -> None:
    """THREADS threads x CALLS calls on one executable, each on its own input; every answer checked."""
    errors: list[str] = []
    barrier = threading.Barrier(THREADS)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(CALLS):
            feeds = feeds_for(t, i)
            try:
                got = exe.run(feeds)["y"]
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(f"thread {t} call {i}: {exc}")
                continue
            if not np.allclose(got, want_for(feeds), rtol=1e-5, atol=1e-3):
                errors.append(f"thread {t} call {i}: wrong answer")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{len(errors)} of {THREADS * CALLS} calls on {exe.device.id} failed, e.g. {errors[:3]}"


class TestOrtCpu:
    def test_float32_inputs(self):
        exe = hal.compile(_affine()).to("ort:cpu", strict=True)
        _hammer(exe, _affine_feeds, _affine_want)

    def test_raw_bits_path(self):
        """bfloat16 and int4 inputs travel as OrtValues over their raw bits, built per call."""
        model = make_model(
            [
                helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
                helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
                helper.make_node("Add", ["af", "bf"], ["y"]),
            ],
            [("a", TensorProto.BFLOAT16, [2, 6]), ("b", TensorProto.INT4, [2, 6])],
            [("y", TensorProto.FLOAT, [2, 6])],
            opset=23,
            ir_version=10,
        )
        exe = hal.compile(model).to("ort:cpu", strict=True)
        assert exe.runner.run.__name__ == "_run_raw"  # the path under test

        def feeds_for(t: int, i: int) -> Feeds:
            a = np.full((2, 6), t * 8 + i % 8, np.float32).astype(ml_dtypes.bfloat16)
            b = np.full((2, 6), i % 16 - 8, np.int8).astype(ml_dtypes.int4)
            if i % 2:  # every other call read-only and strided: the copy made for it must live too
                a = np.repeat(a, 2, axis=0)[::2]
                a.flags.writeable = False
            return {"a": a, "b": b}

        _hammer(exe, feeds_for, lambda f: f["a"].astype(np.float32) + f["b"].astype(np.float32))


class TestExamplePlugin:
    @pytest.fixture
    def example(self, fresh_registry):
        path = ROOT / "examples" / "plugin" / "hal_example" / "__init__.py"
        spec = importlib.util.spec_from_file_location("hal_example", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        registry = fresh_registry()
        registry.add_plugin(module, name="example")
        try:
            yield
        finally:
            registry.remove_plugin("example")

    def test_float32_inputs(self, example):
        exe = hal.compile(_affine()).to("example:reference", strict=True)
        _hammer(exe, _affine_feeds, _affine_want)

    def test_outputs_are_the_callers_own(self, example):
        """The evaluator may hand back views of its own arrays (Reshape returns a view of the
        constant, or of the caller's input): a caller writing into one answer must not change the
        model, another call's answer, or its own input."""
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 1])
        model = make_model(
            [
                helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.FLOAT, [2], [1.0, 2.0])),
                helper.make_node("Reshape", ["k", "shape"], ["y"]),
                helper.make_node("Reshape", ["x", "shape"], ["z"]),
            ],
            [("x", TensorProto.FLOAT, [2])],
            [("y", TensorProto.FLOAT, [2, 1]), ("z", TensorProto.FLOAT, [2, 1])],
            initializers=[shape],
        )
        exe = hal.compile(model).to("example:reference", strict=True)
        x = np.zeros(2, np.float32)
        first = exe.run({"x": x})
        first["y"][:] = 99
        first["z"][:] = 99
        np.testing.assert_array_equal(x, [0.0, 0.0])
        np.testing.assert_array_equal(exe.run({"x": x})["y"], [[1.0], [2.0]])
        x[:] = 5
        np.testing.assert_array_equal(first["z"], [[99.0], [99.0]])
