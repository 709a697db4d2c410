"""The runner from many threads, and feeds as users have them.

An IREE VM context runs one invocation at a time (thread-compatible, not thread-safe) and the
binding releases the GIL while it invokes, so concurrent callers each need a context: the
runner keeps a pool of them.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from iree_helpers import make, to_strict
from onnx import TensorProto, helper

import hal

DEVICE = "iree:local-task"
W = (np.arange(48, dtype=np.float32).reshape(6, 8) - 24) / 16


@pytest.fixture(scope="module")
def affine():
    """y = a @ W + b - c, three float32 inputs of shape (4, 6) / (4, 8)."""
    model = make(
        [
            helper.make_node("MatMul", ["a", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["s"]),
            helper.make_node("Sub", ["s", "c"], ["y"]),
        ],
        [("a", TensorProto.FLOAT, [4, 6]), ("b", TensorProto.FLOAT, [4, 8]), ("c", TensorProto.FLOAT, [4, 8])],
        [("y", TensorProto.FLOAT, [4, 8])],
        {"w": W},
    )
    return to_strict(hal.compile(model), DEVICE)


def _want(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return feeds["a"] @ W + feeds["b"] - feeds["c"]


def test_eight_threads_with_distinct_inputs(affine) -> None:  # type: ignore[no-untyped-def]
    threads_n, calls = 8, 200
    errors: list[str] = []
    barrier = threading.Barrier(threads_n)

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        barrier.wait()
        for i in range(calls):
            feeds = {
                "a": rng.standard_normal((4, 6)).astype(np.float32),
                "b": np.full((4, 8), t * 1000 + i, np.float32),
                "c": rng.standard_normal((4, 8)).astype(np.float32),
            }
            try:
                got = affine.run(feeds)["y"]
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(f"thread {t} call {i}: {exc}")
                continue
            if not np.allclose(got, _want(feeds), rtol=1e-5, atol=1e-3):
                errors.append(f"thread {t} call {i}: wrong answer")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{len(errors)} of {threads_n * calls} calls failed, e.g. {errors[:3]}"


def test_read_only_strided_broadcast_and_fortran_feeds(affine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    frozen = rng.standard_normal((4, 8)).astype(np.float32)
    frozen.flags.writeable = False
    feeds = {
        "a": np.load(tmp_path / "a.npy", mmap_mode="r"),
        "b": np.broadcast_to(rng.standard_normal((1, 8)).astype(np.float32), (4, 8)),
        "c": np.asfortranarray(np.repeat(frozen, 2, axis=0)[::2]),
    }
    for _ in range(20):
        np.testing.assert_allclose(affine.run(feeds)["y"], _want(feeds), rtol=1e-5, atol=1e-5)


def test_no_context_is_invoked_by_two_threads_at_once(affine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """IREE's contract, which right answers on this machine do not prove: a context is used by
    one invocation at a time (the overlap window is widened with a short sleep)."""
    runner = affine.runner
    run_on, active, overlaps, guard = runner.run_on, set(), [], threading.Lock()

    def spy(context, feeds, output_names):  # type: ignore[no-untyped-def]
        with guard:
            if id(context) in active:
                overlaps.append(id(context))
            active.add(id(context))
        try:
            threading.Event().wait(0.002)
            return run_on(context, feeds, output_names)
        finally:
            with guard:
                active.discard(id(context))

    monkeypatch.setattr(runner, "run_on", spy)
    feeds = {"a": np.ones((4, 6), np.float32), "b": np.zeros((4, 8), np.float32), "c": np.zeros((4, 8), np.float32)}
    threads = [threading.Thread(target=lambda: [affine.run(feeds) for _ in range(20)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps, f"{len(overlaps)} invocations shared a context with another thread"
