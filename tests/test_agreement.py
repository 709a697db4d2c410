"""Every available device gives the same answers as onnxruntime's CPU backend on the generated models.

The device list is whatever ``hal.devices()`` finds at collection time, so the same file serves the
core tox environment (``HAL_LOAD_PLUGINS=``: only ``ort:cpu``) and each plugin's environment (that
plugin's devices as well). ``ort:cpu`` itself is checked against two independent references that
always run: a numpy implementation of the MLP written from its initializers, and onnx's Python
reference evaluator on every zoo model. So this file can fail even where ort:cpu is the only device.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import hal
from hal.testing import models

REFERENCE_DEVICE = "ort:cpu"

# fp32 tolerances. Backends reorder reductions (blocked GEMM, Winograd or im2col convolutions,
# FMA), vectorise Erf/Exp with polynomial approximations and fuse ops, which moves float32 results
# by a few ulps per op; through the small zoo models that compounds to ~1e-6..1e-5 here. rtol 1e-3
# with atol 1e-4 leaves an order of magnitude of room above that, yet is ~10x tighter than the
# error a silent bfloat16 computation gives (8-bit mantissa: ~4e-3 relative per op), which is
# exactly what it must catch (OpenVINO on AMX CPUs defaults to bf16 inference precision).
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
# The transformer's outputs come out of LayerNorm (order one, up to ~4) after Softmax, whose exp
# approximations and max-subtraction differ between runtimes; near-zero outputs then carry an
# absolute error of a few 1e-5 that rtol cannot absorb, hence a looser atol there only.
MODEL_TOLERANCE = {"transformer_encoder": {"rtol": 1e-3, "atol": 5e-4}}


@functools.cache
def _zoo() -> dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    return models.zoo(small=True)


@functools.cache
def _reference_outputs(name: str) -> dict[str, np.ndarray]:
    model, feeds = _zoo()[name]
    return hal.compile(model).to(REFERENCE_DEVICE).run(feeds)


def _other_devices() -> list[str]:
    return sorted(d.id for d in hal.devices() if d.available and d.id != REFERENCE_DEVICE)


def _device_model_params() -> list[object]:
    devices = _other_devices()
    if not devices:
        reason = f"no available device besides {REFERENCE_DEVICE} (install a plugin or set HAL_LOAD_PLUGINS)"
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=reason), id="no-other-device")]
    return [pytest.param(device, name, id=f"{device}-{name}") for device in devices for name in _zoo()]


def _assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], name: str, what: str) -> None:
    assert set(actual) == set(expected), f"{what}: outputs {sorted(actual)}, expected {sorted(expected)}"
    tol = MODEL_TOLERANCE.get(name, TOLERANCE)
    for out, want in expected.items():
        got = np.asarray(actual[out])
        assert got.shape == want.shape, f"{what}: output {out!r} has shape {got.shape}, expected {want.shape}"
        assert got.dtype == want.dtype, f"{what}: output {out!r} has dtype {got.dtype}, expected {want.dtype}"
        np.testing.assert_allclose(got, want, **tol, err_msg=f"{what}: output {out!r} of {name}")


@pytest.mark.parametrize(("device", "name"), _device_model_params())
def test_device_matches_ort_cpu(device: str, name: str) -> None:
    model, feeds = _zoo()[name]
    # strict: a model the device cannot compile must fail here, not quietly run on ort:cpu and
    # "agree" with itself.
    exe = hal.compile(model).to(device, strict=True)
    assert {p.device for p in exe.placement} == {device}, f"{name} placed on {exe.placement}, not only {device}"
    outputs = exe.run(feeds)
    _assert_close(outputs, _reference_outputs(name), name, f"{device} vs {REFERENCE_DEVICE}")


# -- the reference device against independent implementations -------------------------------------


def _numpy_mlp(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The MLP computed in float64 numpy from the model's initializers, in their declared order."""
    weights = [numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer if t.name.startswith("weight")]
    biases = [numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer if t.name.startswith("bias")]
    assert len(weights) == len(biases) > 0
    erf = np.vectorize(math.erf)
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w + b
        if i < len(weights) - 1:
            h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    return h


def test_reference_device_matches_numpy_mlp() -> None:
    model, feeds = _zoo()["mlp"]
    expected = _numpy_mlp(model, feeds["x"])
    got = hal.compile(model).to(REFERENCE_DEVICE).run(feeds)["y"]
    assert got.dtype == np.float32
    # float32 against a float64 computation: same tolerance as between devices.
    np.testing.assert_allclose(got, expected, **TOLERANCE)
    # Guard against a vacuous pass (an all-zero or constant output would be a broken model).
    assert float(np.std(expected)) > 0.05


def test_numpy_mlp_reference_is_sensitive() -> None:
    """The numpy reference is not trivially satisfied: perturbing one weight changes the answer."""
    model, feeds = _zoo()["mlp"]
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    first = next(t for t in broken.graph.initializer if t.name.startswith("weight"))
    w = numpy_helper.to_array(first).copy()
    w[0, 0] += 1.0
    first.CopyFrom(numpy_helper.from_array(w, first.name))
    got = hal.compile(broken).to(REFERENCE_DEVICE).run(feeds)["y"]
    assert not np.allclose(got, _numpy_mlp(model, feeds["x"]), **TOLERANCE)


@pytest.mark.parametrize("name", list(_zoo()))
def test_reference_device_matches_onnx_reference(name: str) -> None:
    model, feeds = _zoo()[name]
    expected = dict(zip((o.name for o in model.graph.output), ReferenceEvaluator(model).run(None, feeds)))
    _assert_close(_reference_outputs(name), expected, name, f"{REFERENCE_DEVICE} vs onnx.reference")


def test_models_are_deterministic() -> None:
    """Same arguments, same bytes: results recorded on one machine compare with another's."""
    assert models.mlp(batch=2, width=16).SerializeToString() == models.mlp(batch=2, width=16).SerializeToString()
    small = models.mlp(batch=2, width=16)
    a, b = models.random_feeds(small, seed=3), models.random_feeds(small, seed=3)
    np.testing.assert_array_equal(a["x"], b["x"])
