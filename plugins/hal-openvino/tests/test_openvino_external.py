"""Models with external data on openvino:CPU: OpenVINO reads the weights from a private directory
whose data files are links to the files the HAL checked and holds open (issue 10)."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

import hal
from hal.testing.build import make_model


def _model_with_external_weights(directory, seed=0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    tensor = onnx.numpy_helper.from_array(w, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "w.bin", "offset": "16", "length": str(w.nbytes)}.items():
        tensor.external_data.add(key=key, value=value)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "w.bin").write_bytes(b"\0" * 16 + w.tobytes())
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", TensorProto.FLOAT, [2, 16])], [("y", TensorProto.FLOAT, [2, 8])], initializers=[tensor],
    )
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, w


def test_external_weights_run_and_are_the_checked_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, w = _model_with_external_weights(tmp_path / "m")
    model = hal.load(path)
    # Swap the data file after loading: OpenVINO must still read the file the HAL checked.
    _model_with_external_weights(tmp_path / "other", seed=1)
    os.replace(tmp_path / "other" / "w.bin", tmp_path / "m" / "w.bin")
    exe = hal.compile(model).to("openvino:CPU", strict=True)
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    np.testing.assert_allclose(exe.run({"x": x})["y"], x @ w, rtol=1e-5, atol=1e-5)
    assert exe.verification.passed


def test_an_input_openvino_drops_is_accepted_and_ignored() -> None:
    """CastLike's ``like`` input matters by its type only: OpenVINO's compiled model has no such
    input (the runner used to refuse the model: 62 ONNX node cases)."""
    model = make_model(
        [helper.make_node("CastLike", ["x", "like"], ["y"])],
        [("x", TensorProto.FLOAT, [4]), ("like", TensorProto.FLOAT16, [1])],
        [("y", TensorProto.FLOAT16, [4])],
        opset=19,
    )
    exe = hal.compile(model).to("openvino:CPU", strict=True)
    x = np.array([0.5, -1.25, 3.0, 1e-3], np.float32)
    out = exe.run({"x": x, "like": np.zeros(1, np.float16)})["y"]
    np.testing.assert_array_equal(out, x.astype(np.float16))
