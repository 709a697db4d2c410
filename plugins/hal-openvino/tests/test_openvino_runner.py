"""The runner's hot path: feeds as users have them, and one executable called from many threads.

OpenVINO's infer request keeps only a pointer to an input's memory, so any copy the runner makes
(read-only, strided, Fortran-order, broadcast arrays; ml_dtypes bits; packed 4-bit) must outlive the
infer; a model with two or more inputs is what exposed it (the second copy reused the first's
freed memory). One request serves one call at a time, so many threads need many requests.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from ov_models import make, vi

import hal

REPEAT = 20


@pytest.fixture(scope="module")
def add3():
    """y = a * 2 + b - c on float32[n, 6]: three inputs, so one freed copy lands in another's place."""
    nodes = [
        helper.make_node("Mul", ["a", "two"], ["a2"]),
        helper.make_node("Add", ["a2", "b"], ["s"]),
        helper.make_node("Sub", ["s", "c"], ["y"]),
    ]
    inputs = [vi(n, TensorProto.FLOAT, ["n", 6]) for n in "abc"]
    model = make(nodes, inputs, [vi("y", TensorProto.FLOAT, ["n", 6])], [numpy_helper.from_array(np.array(2, np.float32), "two")])
    return hal.compile(model).to("openvino:CPU", strict=True)


@pytest.fixture(scope="module")
def narrow2():
    """y = float(a_bf16) + float(b_int4): the raw-bits and the packed input paths together."""
    nodes = [
        helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["af", "bf"], ["y"]),
    ]
    inputs = [vi("a", TensorProto.BFLOAT16, ["n", 6]), vi("b", TensorProto.INT4, ["n", 6])]
    model = make(nodes, inputs, [vi("y", TensorProto.FLOAT, ["n", 6])], opset=23)
    return hal.compile(model).to("openvino:CPU", strict=True)


def _frozen(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flags.writeable = False
    return x


def _from_buffer(x: np.ndarray) -> np.ndarray:
    return np.frombuffer(x.tobytes(), x.dtype).reshape(x.shape)  # read-only, as from a file or socket


def _memory_mapped(x: np.ndarray, path) -> np.ndarray:
    np.save(path, x)
    # .npy stores ml_dtypes arrays as raw void; viewing them keeps the read-only mapping.
    return np.load(path, mmap_mode="r").view(x.dtype)


def _strided(x: np.ndarray) -> np.ndarray:
    doubled = np.repeat(x, 2, axis=0)
    return doubled[::2]  # same values, every other row of a bigger array


def _fortran(x: np.ndarray) -> np.ndarray:
    return np.asfortranarray(x)


def _broadcast(x: np.ndarray) -> np.ndarray:
    return np.broadcast_to(x[:1], x.shape)  # zero stride along rows, read-only


LAYOUTS = {
    "read-only": _frozen,
    "frombuffer": _from_buffer,
    "mmap": None,  # needs tmp_path
    "strided": _strided,
    "fortran": _fortran,
    "broadcast": _broadcast,
}


def _layout(name: str, x: np.ndarray, tmp_path, tag: str) -> np.ndarray:
    if name == "mmap":
        return _memory_mapped(x, tmp_path / f"{tag}.npy")
    out = LAYOUTS[name](x)
    if name == "broadcast":
        assert out.strides[0] == 0
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
class TestFeedsAsUsersHaveThem:
    def test_float32_inputs(self, add3, layout, tmp_path):
        rng = np.random.default_rng(0)
        a, b, c = (rng.standard_normal((5, 6)).astype(np.float32) for _ in range(3))
        feeds = {name: _layout(layout, x, tmp_path, name) for name, x in zip("abc", (a, b, c))}
        assert not all(f.flags.c_contiguous and f.flags.writeable for f in feeds.values()), "not the case under test"
        want = feeds["a"] * np.float32(2) + feeds["b"] - feeds["c"]
        for _ in range(REPEAT):
            np.testing.assert_array_equal(add3.run(feeds)["y"], want)

    def test_mixed_with_plain_inputs(self, add3, layout, tmp_path):
        """One unusual input among plain ones (the plain ones are shared, not copied)."""
        rng = np.random.default_rng(1)
        a, b, c = (rng.standard_normal((5, 6)).astype(np.float32) for _ in range(3))
        feeds = {"a": a, "b": _layout(layout, b, tmp_path, "b"), "c": c}
        want = a * np.float32(2) + feeds["b"] - c
        for _ in range(REPEAT):
            np.testing.assert_array_equal(add3.run(feeds)["y"], want)

    def test_raw_bits_and_packed_inputs(self, narrow2, layout, tmp_path):
        rng = np.random.default_rng(2)
        a = rng.uniform(-4, 4, (5, 6)).astype(ml_dtypes.bfloat16)
        b = rng.integers(-8, 8, (5, 6)).astype(ml_dtypes.int4)
        feeds = {"a": _layout(layout, a, tmp_path, "a"), "b": _layout(layout, b, tmp_path, "b")}
        want = feeds["a"].astype(np.float32) + feeds["b"].astype(np.float32)
        for _ in range(REPEAT):
            np.testing.assert_array_equal(narrow2.run(feeds)["y"], want)


def test_zero_size_inputs(add3, narrow2):
    empty = np.zeros((0, 6), np.float32)
    y = add3.run({"a": empty, "b": empty, "c": empty.copy()})["y"]
    assert y.shape == (0, 6) and y.dtype == np.float32
    y = narrow2.run({"a": np.zeros((0, 6), ml_dtypes.bfloat16), "b": np.zeros((0, 6), ml_dtypes.int4)})["y"]
    assert y.shape == (0, 6)


def test_inputs_deleted_after_run_and_outputs_kept(add3):
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal((4, 6)).astype(np.float32) for _ in range(3))
    want = a * np.float32(2) + b - c
    first = add3.run({"a": _frozen(a), "b": _strided(b), "c": _fortran(c)})["y"]
    del a, b, c
    add3.run({n: rng.standard_normal((4, 6)).astype(np.float32) for n in "abc"})
    np.testing.assert_array_equal(first, want)  # the output is the caller's, not the request's buffer


class TestThreads:
    THREADS, CALLS = 8, 200

    def _hammer(self, exe, feeds_for, want_for):
        """THREADS threads x CALLS calls, each on its own input; every answer checked."""
        errors: list[str] = []
        barrier = threading.Barrier(self.THREADS)

        def work(t: int) -> None:
            barrier.wait()
            for i in range(self.CALLS):
                feeds = feeds_for(t, i)
                try:
                    got = exe.run(feeds)["y"]
                except Exception as exc:  # noqa: BLE001 - every failure is reported below
                    errors.append(f"thread {t} call {i}: {exc}")
                    continue
                if not np.array_equal(got, want_for(feeds)):
                    errors.append(f"thread {t} call {i}: wrong answer")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(self.THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"{len(errors)} of {self.THREADS * self.CALLS} calls failed, e.g. {errors[:3]}"

    def test_float32_with_distinct_inputs(self, add3):
        def feeds_for(t: int, i: int) -> dict[str, np.ndarray]:
            base = np.full((3, 6), t * 1000 + i, np.float32)
            return {"a": base, "b": base + 0.5, "c": _frozen(base)}  # one read-only input: the copy path too

        self._hammer(add3, feeds_for, lambda f: f["a"] * np.float32(2) + f["b"] - f["c"])

    def test_raw_bits_and_packed_with_distinct_inputs(self, narrow2):
        def feeds_for(t: int, i: int) -> dict[str, np.ndarray]:
            return {
                "a": np.full((2, 6), t * 8 + i % 8, np.float32).astype(ml_dtypes.bfloat16),
                "b": np.full((2, 6), i % 16 - 8, np.int8).astype(ml_dtypes.int4),
            }

        self._hammer(narrow2, feeds_for, lambda f: f["a"].astype(np.float32) + f["b"].astype(np.float32))


@pytest.mark.parametrize("hint", ["LATENCY", "THROUGHPUT"])
def test_requests_in_flight_are_distinct_and_at_most_openvinos_optimum(hint, monkeypatch):
    """No request serves two calls at once, and no more run at once than OpenVINO says is optimal
    (more oversubscribe the cores: BENCHMARKS.md). The window is widened with a short sleep."""
    model = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])])
    exe = hal.compile(model).to("openvino:CPU", strict=True, performance_hint=hint)
    runner = exe.runner
    optimal = runner.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    run_on, active, problems, most, guard = runner.run_on, [], [], [0], threading.Lock()

    def spy(request, feeds, output_names):
        with guard:
            if any(r is request for r in active):
                problems.append("a request served two calls at once")
            active.append(request)
            most[0] = max(most[0], len(active))
        try:
            threading.Event().wait(0.002)
            return run_on(request, feeds, output_names)
        finally:
            with guard:
                active.remove(request)

    monkeypatch.setattr(runner, "run_on", spy)
    x = np.arange(4, dtype=np.float32) - 2
    threads = [threading.Thread(target=lambda: [exe.run({"x": x}) for _ in range(10)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems, problems
    assert 1 <= most[0] <= optimal, (most[0], optimal)
