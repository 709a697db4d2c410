"""HAL_SIM_DEVICES: which devices exist, what they declare, and what a bad setting says."""

from __future__ import annotations

import os

import pytest

import hal
from hal.errors import HalError, UnavailableDeviceError
from hal.plugin import DeviceKind, InterconnectKind, Maturity, NumberFormat, Support
from hal.testing import models
from hal_sim.settings import SimSettingError, parse_devices, parse_faults


def _sim(devices):
    return {d.id: d for d in devices if d.backend == "sim"}


class TestChoosingDevices:
    def test_none_chosen_lists_one_unavailable_device_saying_how(self, sim):
        devices = _sim(sim())
        assert list(devices) == ["sim:h100:0"]
        (device,) = devices.values()
        assert not device.available
        assert "HAL_SIM_DEVICES" in device.reason and "ascend-910c" in device.reason
        with pytest.raises(UnavailableDeviceError, match="set HAL_SIM_DEVICES"):
            hal.compile(models.add()).to("sim:h100:0")

    def test_profiles_and_counts(self, sim):
        devices = _sim(sim(HAL_SIM_DEVICES="h100, ascend-910c:2 ,mi300x"))
        assert list(devices) == ["sim:h100:0", "sim:ascend-910c:0", "sim:ascend-910c:1", "sim:mi300x:0"]
        assert all(d.available and d.kind is DeviceKind.SIMULATED for d in devices.values())

    def test_what_a_device_declares_comes_from_its_profile(self, sim):
        devices = _sim(sim(HAL_SIM_DEVICES="h100,ascend-910c:2"))
        h100, ascend = devices["sim:h100:0"], devices["sim:ascend-910c:1"]
        caps = h100.capabilities
        assert caps.support(NumberFormat.FLOAT8_E4M3FN) is Support.NATIVE
        assert ascend.capabilities.support(NumberFormat.FLOAT8_E4M3FN) is Support.NONE  # CANN has no FP8
        assert caps.memory.capacity_bytes == 80 * 2**30 and caps.memory.bandwidth_gbps == 3350
        assert caps.peak(NumberFormat.BFLOAT16) == 989
        assert caps.interconnect.kind is InterconnectKind.NVLINK and caps.interconnect.bandwidth_gbps == 900
        assert caps.launch_overhead_us == 5.0
        assert caps.stability.maturity is Maturity.SIMULATED
        assert any("no FP8" in reason for reason in ascend.capabilities.stability.incompatibilities)
        # the other device of the same profile is its peer over the chip link
        assert ascend.capabilities.interconnect.peers == ("sim:ascend-910c:0",)
        details = dict(h100.details)
        assert details["simulated"] == "simulated (computes on the CPU through onnxruntime)"
        assert details["profile"].endswith("h100.toml")
        assert h100.vendor == "NVIDIA" and "(simulated)" in h100.name

    def test_formats_the_simulator_cannot_compute_are_not_declared(self, sim):
        (b200,) = _sim(sim(HAL_SIM_DEVICES="b200")).values()
        caps = b200.capabilities
        assert caps.support(NumberFormat.FLOAT4_E2M1) is Support.NONE  # the profile says native
        # MXFP8 is declared: UE8M0 scales run once emulate() converts them to float32 (exact)
        assert any(s.scale is NumberFormat.FLOAT8_E8M0 and s.element is NumberFormat.FLOAT8_E4M3FN for s in caps.scaled)
        assert all(s.element is not NumberFormat.FLOAT4_E2M1 for s in caps.scaled)  # MXFP4 is not
        assert "float4_e2m1: profile says native, not declared" in dict(b200.details)["simulator"]

    def test_an_unknown_profile_names_the_known_ones(self, sim):
        devices = _sim(sim(HAL_SIM_DEVICES="h100,h1000"))
        bad = devices["sim:h1000:0"]
        assert not bad.available
        assert "no hal-sim profile named 'h1000'" in bad.reason and "ascend-910c" in bad.reason
        assert devices["sim:h100:0"].available

    @pytest.mark.parametrize(
        ("value", "device_id", "match"),
        [
            ("h100:0", "sim:h100:0", "the count '0' is not a whole number from 1"),
            ("h100:x", "sim:h100:0", "the count 'x'"),
            ("h100:2,h100", "sim:h100:0", "names 'h100' twice"),
            ("h 100", "sim:h_100:0", "has no profile name"),
        ],
    )
    def test_bad_entries_become_unavailable_devices_with_the_syntax(self, sim, value, device_id, match):
        devices = _sim(sim(HAL_SIM_DEVICES=value))
        assert not devices[device_id].available
        assert match in devices[device_id].reason
        assert "HAL_SIM_DEVICES=h100,ascend-910c:2" in devices[device_id].reason

    def test_parse_devices(self):
        requests = parse_devices("h100,ascend-910c:3,,")
        assert [(r.profile, r.count, r.problem) for r in requests] == [("h100", 1, None), ("ascend-910c", 3, None)]


class TestFaultSettings:
    def test_parse(self):
        parsed = parse_faults("ascend-910c:error=0.05,hang=0.01,nan=0.01,slow=0.02; h100:die_after=300;sim:h100:1:hang_s=2")
        assert parsed == {
            "ascend-910c": {"error": 0.05, "hang": 0.01, "nan": 0.01, "slow": 0.02},
            "h100": {"die_after": 300},
            "sim:h100:1": {"hang_s": 2.0},
        }

    @pytest.mark.parametrize(
        ("value", "match"),
        [
            ("h100", "'h100' does not start with a profile name"),
            ("h100:boom=0.1", "'boom=0.1' is not FAULT=VALUE"),
            ("h100:error=lots", "has 'lots' where a number belongs"),
            ("h100:error=1.5", "is not a probability"),
            ("h100:error=0.6,nan=0.6", "more than 1"),
            ("h100:die_after=-1", "is negative"),
            ("h100:die_after=2.5", "a whole number"),
            ("h100:hang_s=0", "not a positive number"),
            ("h100:error=0.1;h100:nan=0.1", "a second time"),
        ],
    )
    def test_malformed_faults_name_the_part_and_the_syntax(self, value, match):
        with pytest.raises(SimSettingError, match=match) as info:
            parse_faults(value)
        assert isinstance(info.value, HalError)
        assert "KEY:FAULT=VALUE" in str(info.value)

    def test_malformed_faults_make_every_device_say_why(self, sim):
        devices = _sim(sim(HAL_SIM_DEVICES="h100,mi300x", HAL_SIM_FAULTS="h100:error=2"))
        assert all(not d.available and "HAL_SIM_FAULTS: 'error=2'" in d.reason for d in devices.values())
        with pytest.raises(UnavailableDeviceError, match="is not a probability"):
            hal.compile(models.add()).to("sim:mi300x:0", strict=True)

    def test_a_bad_seed_or_pace(self, sim):
        (device,) = _sim(sim(HAL_SIM_DEVICES="h100", HAL_SIM_SEED="minus one")).values()
        assert not device.available and "HAL_SIM_SEED='minus one'" in device.reason
        (device,) = _sim(sim(HAL_SIM_DEVICES="h100", HAL_SIM_PACE="fast")).values()
        assert not device.available and "HAL_SIM_PACE='fast'" in device.reason

    def test_device_keys_override_profile_keys(self, sim):
        devices = _sim(sim(HAL_SIM_DEVICES="h100:2", HAL_SIM_FAULTS="h100:error=0.1;sim:h100:1:error=0.3,nan=0.1"))
        assert dict(devices["sim:h100:0"].details)["faults"] == "error=0.1"
        assert dict(devices["sim:h100:1"].details)["faults"] == "error=0.3,nan=0.1"


class TestFleetExample:
    def test_examples_fleet_places_one_model_on_an_h100_a_910c_and_the_cpu(self):
        """examples/fleet.py, as a reader runs it: every device answers as the CPU does, the 910C's
        lowering dequantized the FP8 weights and the H100's changed nothing."""
        import subprocess
        import sys
        from pathlib import Path

        script = Path(__file__).resolve().parents[3] / "examples" / "fleet.py"
        env = {k: v for k, v in os.environ.items() if k not in ("HAL_SIM_DEVICES", "HAL_SIM_FAULTS", "HAL_SIM_PACE")}
        env["HAL_LOAD_PLUGINS"] = "sim"
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env, check=False)
        assert result.returncode == 0, result.stderr
        sections = {block.split(": ", 1)[0]: block for block in result.stdout.strip().split("\n\n")}
        assert set(sections) == {"sim:h100:0", "sim:ascend-910c:0", "ort:cpu"}
        assert all("answers   agree" in block for block in sections.values())
        assert "nothing: the model runs as written" in sections["sim:h100:0"]
        assert "dequantized at compile time" in sections["sim:ascend-910c:0"]
        assert "x sim:h100:0 (estimated" in sections["sim:ascend-910c:0"]
