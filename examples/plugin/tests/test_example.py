"""hal-example's own tests. The backend contract kit runs beside them:

    HAL_LOAD_PLUGINS=example pytest -p hal.testing --hal-device example:reference examples/plugin/tests

(``cd examples/plugin && pytest`` does the same: ``setup.cfg`` adds those options.)
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

import hal


def test_the_reference_device_is_listed() -> None:
    devices = {d.id: d for d in hal.devices()}
    assert "example:reference" in devices, f"hal-example is not loaded (HAL_LOAD_PLUGINS?); devices: {sorted(devices)}"
    assert devices["example:reference"].available


def test_it_runs_a_model_on_the_reference_evaluator() -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["y"])],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    exe = hal.compile(model).to("example:reference", strict=True)
    np.testing.assert_array_equal(exe.run({"x": np.array([1, 2, 3], np.float32)})["y"], [1, 4, 9])
