"""Selection and health on simulated chips: HAL_SIM_PACE gives them distinct speeds, HAL_SIM_FAULTS
gives them faults."""

from __future__ import annotations

import hal
from hal.doctor import doctor
from hal.testing.build import make_model
from onnx import TensorProto, helper


def chip(launch_us: float) -> str:
    """A chip whose every kernel launch takes ``launch_us`` (its roofline is launch-bound)."""
    return f"""\
BASE
[memory]
bandwidth_gbps = {{value = 1000, source = "unverified: test"}}

[peak_tflops]
float32 = {{value = 100, source = "unverified: test"}}

[software]
launch_overhead_us = {{value = {launch_us}, source = "unverified: test"}}
"""


def _model() -> hal.Model:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Add", ["a", "x"], ["y"])]
    return hal.load(make_model(nodes, [("x", TensorProto.FLOAT, [4, 16])], [("y", TensorProto.FLOAT, [4, 16])]))


class TestFastestOnPacedChips:
    def test_the_measured_fastest_chip(self, sim, profile_dir, monkeypatch):
        monkeypatch.setenv("HAL_SELECT_BUDGET_S", "0.5")
        # "a-slow" sorts first: the default order picks it; measured, it is 25 ms a run against 1 ms.
        profiles = profile_dir(a_slow=chip(12500), b_fast=chip(500))
        sim(HAL_SIM_DEVICES="a-slow,b-fast", HAL_SIM_PROFILES=str(profiles), HAL_SIM_PACE="1", HAL_DISABLE_PLUGINS="cpu")
        compiled = hal.compile(_model())
        assert compiled.to("auto").device.id == "sim:a-slow:0"
        assert compiled.to("auto", policy="fastest").device.id == "sim:b-fast:0"


class TestDoctorOnFaultyChips:
    def test_injected_errors_quarantine_and_auto_passes_over(self, sim):
        sim(HAL_SIM_DEVICES="h100,b200", HAL_SIM_FAULTS="h100:error=0.3", HAL_DISABLE_PLUGINS="cpu")
        reports = {r.device: r for r in doctor(["sim:h100:0", "sim:b200:0"], burn_in=5)}
        assert reports["sim:h100:0"].status == "quarantined"
        assert reports["sim:b200:0"].status == "healthy", reports["sim:b200:0"].reasons
        assert hal.compile(_model()).to("auto").device.id == "sim:b200:0"

    def test_nan_outputs_quarantine(self, sim):
        sim(HAL_SIM_DEVICES="h100", HAL_SIM_FAULTS="h100:nan=0.5")
        (report,) = doctor(["sim:h100:0"], burn_in=4)
        assert report.status == "quarantined"
        assert sum(c.nonfinite for c in report.canaries) > 0

    def test_a_hang_is_cut_by_the_run_timeout(self, sim):
        sim(HAL_SIM_DEVICES="h100", HAL_SIM_FAULTS="h100:hang=1.0,hang_s=3")
        (report,) = doctor(["sim:h100:0"], burn_in=2, timeout=0.3)
        assert report.status == "quarantined" and report.canaries[-1].status == "hung"
