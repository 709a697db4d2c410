"""A model with external data on iree:local-task: IREE's importer takes the bytes inside the
protobuf (LoweredModel.self_contained), read from the files the HAL checked (issue 10)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import to_strict
from onnx import TensorProto, helper

import hal
from hal.testing.build import make_model


def test_external_weights_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    tensor = onnx.numpy_helper.from_array(w, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "w.bin", "offset": "0", "length": str(w.nbytes)}.items():
        tensor.external_data.add(key=key, value=value)
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", TensorProto.FLOAT, [2, 16])], [("y", TensorProto.FLOAT, [2, 8])], initializers=[tensor], opset=17,
    )
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    exe = to_strict(hal.compile(path), "iree:local-task")
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    np.testing.assert_allclose(exe.run({"x": x})["y"], x @ w, rtol=1e-5, atol=1e-5)
