"""Build a small model, compile it once, run it on every available device.

    python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

import hal


def build_model() -> bytes:
    """y = relu(x @ w + b), with w and b stored in the model."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal((8, 4)).astype(np.float32).ravel())
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "quickstart",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def main() -> None:
    compiled = hal.compile(build_model())  # once
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    reference = None
    for device in hal.devices():
        if not device.available:
            print(f"{device.id:20s} skipped: {device.reason}")
            continue
        exe = compiled.to(device.id)
        y = exe.run({"x": x})["y"]
        if reference is None:
            reference = y
        same = np.allclose(y, reference, rtol=1e-4, atol=1e-5)
        print(f"{device.id:20s} ran on {exe.device.name} ({exe.device.vendor}): y[0] = {np.round(y[0], 4)}"
              f"{'' if same else '  (differs from the first device!)'}")


if __name__ == "__main__":
    main()
