"""Injected faults: what each does, and that the same seed gives the same faults on the same
requests (fresh plugins, another process, many threads)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from onnx import TensorProto, helper

import hal
import hal.plugin
from hal.errors import HalError, RunError, UnavailableDeviceError
from hal.testing.build import make_model
from hal_sim.faults import fault_for
from hal_sim.settings import FaultSpec

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _model() -> hal.Model:
    """A float output and an int64 one (nan faults leave the latter alone)."""
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("ArgMax", ["x"], ["i"], axis=1)]
    return hal.load(
        make_model(nodes, [("x", TensorProto.FLOAT, [2, 4])], [("y", TensorProto.FLOAT, [2, 4]), ("i", TensorProto.INT64, [2, 1])])
    )


def _executable(device: str = "sim:h100:0") -> hal.Executable:
    # verify=False: verification would run once more on the device and take a request
    return hal.compile(_model()).to(device, strict=True, verify=False)


def _outcome(exe: hal.Executable) -> str:
    try:
        out = exe.run({"x": X})
    except RunError as exc:
        text = str(exc)
        return "error" if "injected fault 'error'" in text else ("died" if "device died" in text else f"other: {text}")
    if np.isnan(out["y"]).any():
        assert np.isnan(out["y"]).all()
        np.testing.assert_array_equal(out["i"], np.argmax(X, axis=1)[:, None])  # non-float left as computed
        return "nan"
    np.testing.assert_array_equal(out["y"], np.maximum(X, 0))
    return "ok"


def _sequence(sim, n: int, **variables: str) -> list[str]:
    sim(HAL_SIM_DEVICES="h100", **variables)
    exe = _executable()
    return [_outcome(exe) for _ in range(n)]


FAULTS = "h100:error=0.2,nan=0.2"


class TestReproducible:
    def test_the_same_seed_gives_the_same_faults_after_a_reload(self, sim):
        first = _sequence(sim, 200, HAL_SIM_FAULTS=FAULTS, HAL_SIM_SEED="7")
        second = _sequence(sim, 200, HAL_SIM_FAULTS=FAULTS, HAL_SIM_SEED="7")
        assert first == second
        assert {"ok", "error", "nan"} <= set(first)

    def test_another_seed_gives_other_faults(self, sim):
        first = _sequence(sim, 200, HAL_SIM_FAULTS=FAULTS, HAL_SIM_SEED="7")
        other = _sequence(sim, 200, HAL_SIM_FAULTS=FAULTS, HAL_SIM_SEED="8")
        assert first != other

    def test_the_default_seed_is_zero(self, sim):
        assert _sequence(sim, 100, HAL_SIM_FAULTS=FAULTS) == _sequence(sim, 100, HAL_SIM_FAULTS=FAULTS, HAL_SIM_SEED="0")

    def test_devices_of_one_profile_get_different_faults(self):
        spec = FaultSpec(error=0.3)
        a = [fault_for(1, "sim:h100:0", k, spec) for k in range(200)]
        b = [fault_for(1, "sim:h100:1", k, spec) for k in range(200)]
        assert a != b

    def test_the_same_in_another_process(self):
        spec = FaultSpec(error=0.1, hang=0.1, nan=0.1, slow=0.1)
        here = [fault_for(3, "sim:ascend-910c:1", k, spec) for k in range(300)]
        code = (
            "from hal_sim.faults import fault_for\nfrom hal_sim.settings import FaultSpec\n"
            "spec = FaultSpec(error=0.1, hang=0.1, nan=0.1, slow=0.1)\n"
            "print(repr([fault_for(3, 'sim:ascend-910c:1', k, spec) for k in range(300)]))\n"
        )
        # another hash seed: nothing may depend on Python's salted hash()
        env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
        there = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
        assert there.stdout.strip() == repr(here)

    def test_threads_draw_the_same_faults_as_one_thread(self, sim):
        sequential = _sequence(sim, 400, HAL_SIM_FAULTS=FAULTS, HAL_SIM_SEED="5")
        sim(HAL_SIM_DEVICES="h100", HAL_SIM_FAULTS=FAULTS, HAL_SIM_SEED="5")
        exe = _executable()
        found: list[str] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(50):
                outcome = _outcome(exe)
                with lock:
                    found.append(outcome)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # requests 0..399 were numbered under a lock: the same faults, in whatever order
        assert sorted(found) == sorted(sequential)


class TestRates:
    def test_rates_are_as_configured(self, sim):
        n = 2000
        outcomes = _sequence(sim, n, HAL_SIM_FAULTS="h100:error=0.05,nan=0.15", HAL_SIM_SEED="11")
        for fault, p in (("error", 0.05), ("nan", 0.15)):
            count = outcomes.count(fault)
            sigma = math.sqrt(n * p * (1 - p))
            assert abs(count - n * p) <= 5 * sigma, (fault, count)
        assert not [o for o in outcomes if o.startswith("other")]

    def test_a_fault_on_one_profile_leaves_the_others_alone(self, sim):
        sim(HAL_SIM_DEVICES="h100,mi300x", HAL_SIM_FAULTS="h100:error=1")
        assert _outcome(_executable("sim:mi300x:0")) == "ok"
        assert _outcome(_executable("sim:h100:0")) == "error"


class TestEachFault:
    def test_die_after_is_exact_and_the_device_stays_dead(self, sim):
        outcomes = _sequence(sim, 8, HAL_SIM_FAULTS="h100:die_after=5")
        assert outcomes == ["ok"] * 5 + ["died"] * 3
        with pytest.raises(HalError, match="died after 5 runs"):
            hal.compile(_model()).to("sim:h100:0", strict=True, verify=False)
        (device,) = [d for d in hal.devices() if d.id == "sim:h100:0"]
        lowered = hal.plugin.LoweredModel.from_proto(_model().proto)
        with pytest.raises(UnavailableDeviceError, match="stays dead"):
            hal.plugin.backend("sim").prepare(lowered, device, hal.plugin.CompileOptions())
        hal.plugin.reload_plugins()  # a fresh backend: alive again
        assert _outcome(_executable()) == "ok"

    def test_a_device_id_key_targets_one_device(self, sim):
        sim(HAL_SIM_DEVICES="h100:2", HAL_SIM_FAULTS="sim:h100:1:die_after=0")
        assert _outcome(_executable("sim:h100:0")) == "ok"
        assert _outcome(_executable("sim:h100:1")) == "died"

    def test_hang_blocks_for_hang_s_then_fails(self, sim):
        sim(HAL_SIM_DEVICES="h100", HAL_SIM_FAULTS="h100:hang=1,hang_s=0.2")
        exe = _executable()
        start = time.monotonic()
        with pytest.raises(RunError, match="injected fault 'hang' at request 0: no answer within 0.2 s"):
            exe.run({"x": X})
        assert time.monotonic() - start >= 0.2

    def test_nan_on_float_outputs_only(self, sim):
        assert set(_sequence(sim, 3, HAL_SIM_FAULTS="h100:nan=1")) == {"nan"}

    def test_slow_takes_slow_factor_times_as_long(self, sim, profile_dir):
        # every run is paced to at least 50 ms (one node, 50 ms launch each), then slowed 4x
        directory = profile_dir(
            acme_x1=(
                "BASE\n[memory]\nbandwidth_gbps = {value = 1000000, source = \"unverified: test\"}\n"
                "[software]\nlaunch_overhead_us = {value = 25000, source = \"unverified: test\"}\n"
            )
        )
        sim(
            HAL_SIM_DEVICES="acme-x1", HAL_SIM_PROFILES=str(directory), HAL_SIM_PACE="1",
            HAL_SIM_FAULTS="acme-x1:slow=1,slow_factor=4",
        )
        exe = _executable("sim:acme-x1:0")
        paced = exe.estimate({"x": X}).seconds
        assert paced >= 0.05
        start = time.monotonic()
        assert _outcome(exe) == "ok"  # slow, and right
        assert time.monotonic() - start >= 4 * paced
