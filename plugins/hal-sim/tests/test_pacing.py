"""HAL_SIM_PACE=1: a run takes at least its roofline estimate for the feeds' shapes."""

from __future__ import annotations

import time

import numpy as np
from onnx import TensorProto, helper

import hal
from hal.testing.build import make_model

#: 1 MB/s of memory bandwidth and 10 ms per kernel launch: a slow chip on purpose.
SLOW_CHIP = """\
BASE
[memory]
bandwidth_gbps = {value = 0.001, source = "unverified: test"}

[peak_tflops]
float32 = {value = 0.001, source = "unverified: test"}

[software]
launch_overhead_us = {value = 10000, source = "unverified: test"}
"""


def _model() -> hal.Model:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Add", ["a", "x"], ["b"]),
        helper.make_node("Mul", ["b", "b"], ["y"]),
    ]
    return hal.load(make_model(nodes, [("x", TensorProto.FLOAT, ["n", 256])], [("y", TensorProto.FLOAT, ["n", 256])]))


class TestPacing:
    def test_a_paced_run_takes_at_least_its_estimate(self, sim, profile_dir):
        sim(HAL_SIM_DEVICES="acme-x1", HAL_SIM_PROFILES=str(profile_dir(acme_x1=SLOW_CHIP)), HAL_SIM_PACE="1")
        exe = hal.compile(_model()).to("sim:acme-x1:0", strict=True, verify=False)
        for rows in (4, 64):  # the estimate follows the feeds' shapes
            x = np.ones((rows, 256), np.float32)
            estimate = exe.estimate({"x": x})
            assert estimate.kind == "estimated"
            assert estimate.seconds >= 0.03 + rows * 256 * 4 * 3 / 1e6  # three launches, at least the input read
            start = time.monotonic()
            out = exe.run({"x": x})
            assert time.monotonic() - start >= estimate.seconds
            np.testing.assert_array_equal(out["y"], np.full((rows, 256), 4.0, np.float32))

    def test_pacing_is_off_by_default(self, sim, profile_dir):
        (device,) = [
            d for d in sim(HAL_SIM_DEVICES="acme-x1", HAL_SIM_PROFILES=str(profile_dir(acme_x1=SLOW_CHIP)))
            if d.backend == "sim"
        ]
        assert dict(device.details)["pace"].startswith("off")
