"""to("auto", policy=...): fastest (measured, remembered, re-measured), stable, native-fp8, plugin
policies; precision="relaxed"; hal explain --device auto."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import hal
from hal import cli, health, selection
from hal.capabilities import Capabilities, Health, ScaledFormat
from hal.errors import InputError, PluginError
from hal.ranking import rank


class Counting:
    """A runner on ONNX's reference evaluator that sleeps per run, counts runs, and can perturb
    its outputs (reduced precision, wrong answers)."""

    def __init__(self, proto, backend):
        from onnx.reference import ReferenceEvaluator

        self.session = ReferenceEvaluator(proto)
        self.backend = backend

    def run(self, feeds, names):
        self.backend.runs += 1
        time.sleep(self.backend.sleep_s)
        out = self.session.run(list(names), feeds)
        return [np.asarray(o * self.backend.scale, dtype=o.dtype) for o in out]


class Timed(hal.Backend):
    def __init__(self, name, kind="cpu", sleep_s=0.0, *, scale=1.0, reduced_scale=None, version="1", caps=None):
        self.name = name
        self.kind = kind
        self.sleep_s = sleep_s
        self.base_scale = scale
        self.reduced_scale = reduced_scale
        self._version = version
        self.caps = caps or Capabilities.from_levels(native=["float32", "int64"])
        self.runs = 0
        self.prepares = 0
        self.scale = scale

    @property
    def version(self):
        return self._version

    def discover(self):
        return [hal.Device(id=f"{self.name}:0", backend=self.name, vendor="test", name=self.name, kind=self.kind,
                           capabilities=self.caps)]

    def prepare(self, model, device, options):
        self.prepares += 1
        backend = self

        class Runner(Counting):
            def run(self, feeds, names):
                backend.scale = backend.reduced_scale if (options.reduced_precision and backend.reduced_scale) else backend.base_scale
                return Counting.run(self, feeds, names)

        return Runner(model.proto, self)


@pytest.fixture
def devices(fresh_registry, monkeypatch, tmp_path):
    """``devices(*backends)``: a registry of these in-process backends only (no ort:cpu, so the
    reference is ONNX's evaluator), a cache of its own."""
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HAL_DISABLE_PLUGINS", "cpu")
    monkeypatch.setenv("HAL_SELECT_BUDGET_S", "0.3")
    selection._MEMORY.clear()

    def make(*backends):
        reg = fresh_registry()

        class Plugin:
            @hal.hookimpl
            def hal_register_backends(self, register):
                for b in backends:
                    register(b)

        reg.add_plugin(Plugin(), name="timed")
        return reg

    yield make
    selection._MEMORY.clear()


class TestFastest:
    def test_picks_the_measured_fastest_not_the_default_first(self, devices, linear_model):
        slow = Timed("slow", kind="gpu", sleep_s=0.05)  # an accelerator: first in the default order
        quick = Timed("quick", kind="cpu", sleep_s=0.001)
        devices(slow, quick)
        compiled = hal.compile(linear_model)
        assert compiled.to("auto").device.id == "slow:0"
        exe = compiled.to("auto", policy="fastest")
        assert exe.device.id == "quick:0"
        (note,) = [s for s in exe.lowering if s.kind == "selected"]
        assert "the fastest of 2 candidates (measured now)" in note.detail
        assert quick.runs >= 3 and slow.runs >= 2  # both were measured

    def test_remembered_between_processes_without_running_anything(self, devices, linear_model):
        slow, quick = Timed("slow", kind="gpu", sleep_s=0.05), Timed("quick", sleep_s=0.001)
        devices(slow, quick)
        hal.compile(linear_model).to("auto", policy="fastest")
        selection._MEMORY.clear()  # as a new process: only the cache directory remembers
        slow.runs = quick.runs = slow.prepares = 0
        exe = hal.compile(linear_model).to("auto", policy="fastest")
        assert exe.device.id == "quick:0"
        assert (slow.runs, quick.runs) == (0, 0)  # nothing measured, nothing verified again
        assert slow.prepares == 0  # only the chosen device is prepared
        assert "(remembered from" in exe.lowering[-1].detail

    def test_measured_again_when_a_version_changes(self, devices, linear_model):
        slow, quick = Timed("slow", kind="gpu", sleep_s=0.05), Timed("quick", sleep_s=0.001)
        devices(slow, quick)
        hal.compile(linear_model).to("auto", policy="fastest")
        slow.runs = quick.runs = 0
        quick._version = "2"  # a new runtime: its speed is not known
        quick.sleep_s, slow.sleep_s = 0.05, 0.001
        exe = hal.compile(linear_model).to("auto", policy="fastest")
        assert slow.runs > 0 and quick.runs > 0
        assert exe.device.id == "slow:0"

    def test_a_device_that_fails_verification_is_no_candidate(self, devices, linear_model):
        wrong = Timed("wrong", sleep_s=0.0, scale=2.0)  # fastest, but answers wrongly
        right = Timed("right", sleep_s=0.01)
        devices(wrong, right)
        exe = hal.compile(linear_model).to("auto", policy="fastest")
        assert exe.device.id == "right:0"

    def test_a_bad_budget_is_named(self, devices, linear_model, monkeypatch):
        devices(Timed("a"), Timed("b"))
        monkeypatch.setenv("HAL_SELECT_BUDGET_S", "soon")
        with pytest.raises(hal.errors.SettingError, match="HAL_SELECT_BUDGET_S='soon'"):
            hal.compile(linear_model).to("auto", policy="fastest")


class TestPolicies:
    def test_stable_puts_measured_health_first(self, devices, linear_model):
        devices(Timed("flaky", kind="gpu"), Timed("steady", kind="cpu"))
        health.record("flaky:0", Health(probes=100, failures=1, deterministic=True, latency_jitter=1.1))
        health.record("steady:0", Health(probes=100, failures=0, deterministic=True, latency_jitter=1.3))
        hal._plugins.registry().reapply_health()
        compiled = hal.compile(linear_model)
        assert compiled.to("auto").device.id == "flaky:0"
        assert compiled.to("auto", policy="stable").device.id == "steady:0"

    def test_native_fp8_first(self, fresh_registry):
        from hal.testing.models import fp8_block_scaled_mlp

        model = hal.load(fp8_block_scaled_mlp(batch=2, width=64, layers=1, block=32))
        # Both change how the model computes; the GPU only by dequantizing its FP8 weights.
        converts = Capabilities.from_levels(native=["float32", "int64"], storage=["float8_e4m3fn"])
        keeps = Capabilities.from_levels(
            native=["float64", "float8_e4m3fn", "int64"], storage=["float32"],
            scaled=[ScaledFormat("float8_e4m3fn", "float32", (32, 32))],
        )
        gpu = hal.Device(id="g:0", backend="g", vendor="t", name="g", kind="gpu", capabilities=converts)
        cpu = hal.Device(id="c:0", backend="c", vendor="t", name="c", kind="cpu", capabilities=keeps)
        assert [d.id for d, _ in rank(model, [gpu, cpu])] == ["g:0", "c:0"]
        ordered = rank(model, [gpu, cpu], policy="native-fp8")
        assert [d.id for d, _ in ordered] == ["c:0", "g:0"]
        assert any(s.kind == "legalize-scaled" for s in ordered[1][1].steps)

    def test_a_plugin_cannot_take_a_built_in_name(self, fresh_registry):
        class Policies:
            @hal.hookimpl
            def hal_register_policies(self, register):
                register("fastest", lambda model, devices: devices)

        reg = fresh_registry()
        reg.add_plugin(Policies(), name="policies")
        (info,) = [p for p in reg.plugins() if p.name == "policies"]
        assert info.status == "error" and "built in" in info.error
        assert isinstance(PluginError("x"), hal.errors.HalError)

    def test_policy_with_a_device_is_refused(self, devices, linear_model):
        devices(Timed("a"))
        with pytest.raises(InputError, match="ranks devices for to\\('auto'\\)"):
            hal.compile(linear_model).to("a:0", policy="fastest")


class TestRelaxedPrecision:
    def test_admitted_only_within_rtol(self, devices, linear_model):
        # Its reduced-precision variant is 1% off, as bf16 compute would be.
        device = Timed("bf16", reduced_scale=1.01)
        devices(device)
        compiled = hal.compile(linear_model)
        x = {"x": np.ones((2, 8), np.float32)}
        exact = compiled.to("bf16:0").run(x)["y"]

        loose = compiled.to("bf16:0", precision="relaxed", rtol=0.05)
        assert selection.admitted_reduced(loose)
        np.testing.assert_allclose(loose.run(x)["y"], exact * 1.01, rtol=1e-6)

        tight = compiled.to("bf16:0", precision="relaxed", rtol=1e-3)
        assert not selection.admitted_reduced(tight)
        assert "reduced precision not admitted within rtol=0.001" in tight.lowering[0].detail
        np.testing.assert_array_equal(tight.run(x)["y"], exact)

    def test_arguments_are_checked(self, devices, linear_model):
        devices(Timed("a"))
        compiled = hal.compile(linear_model)
        with pytest.raises(InputError, match="precision='fast'"):
            compiled.to("a:0", precision="fast")
        with pytest.raises(InputError, match="rtol= is the tolerance of precision='relaxed'"):
            compiled.to("a:0", rtol=0.1)


class TestExplainAuto:
    def test_every_candidate_with_its_figures_and_why(self, devices, linear_model, tmp_path, capsys):
        import onnx

        devices(Timed("slow", kind="gpu", sleep_s=0.03), Timed("quick", sleep_s=0.001))
        path = tmp_path / "m.onnx"
        onnx.save(linear_model, path)
        assert cli.main(["explain", str(path), "--device", "auto", "--policy", "fastest", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["device"] == "quick:0"
        by_id = {c["device"]: c for c in out["candidates"]}
        assert by_id["quick:0"]["place"] == 1 and by_id["quick:0"]["why"] == "measured fastest"
        assert by_id["slow:0"]["place"] == 2 and by_id["slow:0"]["measured_p50_s"] > by_id["quick:0"]["measured_p50_s"]
        assert by_id["slow:0"]["verdict"]["status"] == "as-is"

        assert cli.main(["explain", str(path), "--device", "auto"]) == 0
        text = capsys.readouterr().out
        assert "candidates" in text and "an accelerator" in text and "MEASURED P50" in text
