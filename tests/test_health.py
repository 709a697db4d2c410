"""hal doctor and health as data: canaries, thresholds, quarantine, persistence between processes,
concurrent writers, hal devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import hal
from hal import cli, health
from hal.capabilities import Capabilities, Health, Stability
from hal.doctor import doctor
from hal.errors import UnavailableDeviceError


class Flaky(hal.Backend):
    """Runs models through ort:cpu's backend, with faults switched on per test: ``nan`` (NaN
    outputs), ``noise`` (bits that vary between runs), ``fail_every`` (every n-th run raises),
    ``hang_s`` (every run sleeps)."""

    version = "1"

    def __init__(self, name="flaky", *, deterministic=None):
        self.name = name
        self.nan = False
        self.noise = False
        self.fail_every = 0
        self.hang_s = 0.0
        self.runs = 0
        self.caps = Capabilities.from_levels(
            native=["float32", "int64", "bool"], stability=Stability(deterministic=deterministic),
        )

    def discover(self):
        return [hal.Device(id=f"{self.name}:0", backend=self.name, vendor="test", name=self.name, kind="npu",
                           capabilities=self.caps)]

    def prepare(self, model, device, options):
        from hal._plugins import registry

        reg = registry()
        inner = reg.backend("ort").prepare(model, reg.device("ort:cpu"), options)
        backend = self

        class Runner:
            def run(self, feeds, names):
                backend.runs += 1
                if backend.hang_s:
                    import time

                    time.sleep(backend.hang_s)
                if backend.fail_every and backend.runs % backend.fail_every == 0:
                    raise hal.errors.RunError("injected failure")
                out = list(inner.run(feeds, names))
                if backend.nan:
                    out = [np.full_like(o, np.nan) if o.dtype.kind == "f" else o for o in out]
                if backend.noise:
                    out = [o + np.float32(1e-7 * backend.runs) if o.dtype.kind == "f" else o for o in out]
                return out

        return Runner()


@pytest.fixture
def flaky(fresh_registry, monkeypatch, tmp_path):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))

    def make(**kwargs):
        backend = Flaky(**kwargs)
        reg = fresh_registry()

        class Plugin:
            @hal.hookimpl
            def hal_register_backends(self, register):
                register(backend)

        reg.add_plugin(Plugin(), name="flaky")
        return backend

    return make


def _health(device_id):
    return hal._plugins.registry().device(device_id, require_available=False).capabilities.stability.health


class TestDoctor:
    def test_a_healthy_device_is_recorded(self, flaky):
        flaky()
        (report,) = doctor(["flaky:0"], burn_in=3)
        assert report.status == "healthy", report.reasons
        assert report.health.probes == 3 * len(report.canaries) and report.health.failures == 0
        assert report.health.deterministic is True and report.health.latency_jitter is not None
        assert all(c.agreement == "passed" for c in report.canaries)
        assert _health("flaky:0") == report.health  # this process's devices see it at once
        assert health.read()["flaky:0"]["report"]["status"] == "healthy"

    def test_nan_quarantines_refuses_and_a_passing_run_lifts_it(self, flaky, linear_model):
        backend = flaky()
        backend.nan = True
        (report,) = doctor(["flaky:0"], burn_in=3)
        assert report.status == "quarantined"
        assert any("error rate" in r for r in report.reasons)
        compiled = hal.compile(linear_model)
        with pytest.raises(UnavailableDeviceError, match=r"flaky:0 is quarantined: .*`hal doctor --device flaky:0`"):
            compiled.to("flaky:0")
        assert compiled.to("auto").device.id == "ort:cpu"  # auto passes it over
        backend.nan = False
        (report,) = doctor(["flaky:0"], burn_in=3)
        assert report.status == "healthy"
        assert compiled.to("flaky:0").device.id == "flaky:0"

    def test_errors_past_the_threshold_quarantine(self, flaky):
        backend = flaky()
        backend.fail_every = 4
        (report,) = doctor(["flaky:0"], burn_in=4)
        assert report.status == "quarantined"
        assert report.health.failures >= len(report.canaries) - 1
        assert report.health.error_rate > health.MAX_ERROR_RATE

    def test_varying_bits_quarantine_unless_declared(self, flaky):
        backend = flaky()
        backend.noise = True
        (report,) = doctor(["flaky:0"], burn_in=3)
        assert report.status == "quarantined" and report.health.deterministic is False
        assert any("different bits" in r for r in report.reasons)

    def test_varying_bits_are_no_fault_where_declared(self, flaky):
        backend = flaky(deterministic=False)
        backend.noise = True
        (report,) = doctor(["flaky:0"], burn_in=3)
        assert report.status == "healthy", report.reasons
        assert report.health.deterministic is False

    def test_a_hang_is_abandoned_and_quarantines(self, flaky):
        backend = flaky()
        backend.hang_s = 2.0
        (report,) = doctor(["flaky:0"], burn_in=3, timeout=0.2)
        assert report.status == "quarantined"
        assert report.canaries[-1].status == "hung" and len(report.canaries) == 1  # not run again
        assert "did not finish within 0.2 s" in report.reasons[0]

    def test_disagreement_quarantines(self, flaky, monkeypatch):
        backend = flaky()
        original = Flaky.prepare

        def wrong(self, model, device, options):
            runner = original(self, model, device, options)

            class Off:
                def run(self, feeds, names):
                    return [o * np.asarray(1.5, o.dtype) if o.dtype.kind == "f" else o for o in runner.run(feeds, names)]

            return Off()

        monkeypatch.setattr(Flaky, "prepare", wrong)
        (report,) = doctor(["flaky:0"], burn_in=2)
        assert report.status == "quarantined"
        assert any("disagrees with the reference" in r for r in report.reasons)
        assert backend.runs > 0

    def test_a_plugins_own_probe_is_added(self, flaky):
        flaky()

        class Probe:
            @hal.hookimpl
            def hal_probe_health(self, device):
                return Health(probes=5, failures=5, quarantined=True, reason="ECC errors") if device.id == "flaky:0" else None

        hal._plugins.registry().add_plugin(Probe(), name="probe")
        (report,) = doctor(["flaky:0"], burn_in=2)
        assert report.status == "quarantined" and "ECC errors" in report.reasons[-1]


class TestPersistence:
    def test_health_survives_the_process(self, fresh_registry, tmp_path):
        env = dict(os.environ, HAL_CACHE_DIR=str(tmp_path / "cache"), HAL_LOAD_PLUGINS="")
        code = "from hal.doctor import doctor; doctor(['ort:cpu'], burn_in=2)"
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
        os.environ["HAL_CACHE_DIR"] = env["HAL_CACHE_DIR"]
        try:
            reg = fresh_registry()
            got = reg.device("ort:cpu").capabilities.stability.health
        finally:
            del os.environ["HAL_CACHE_DIR"]
        assert got.probes > 0 and not got.quarantined and got.checked_at is not None

    def test_concurrent_writers_leave_every_record(self, tmp_path):
        env = dict(os.environ, HAL_CACHE_DIR=str(tmp_path / "cache"), HAL_LOAD_PLUGINS="")
        code = textwrap.dedent("""
            import sys
            from hal import health
            from hal.capabilities import Health
            for i in range(40):
                health.record(f"w{sys.argv[1]}:{i}", Health(probes=i + 1, failures=0))
        """)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(n)], env=env) for n in (1, 2)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        data = json.loads((tmp_path / "cache" / "health" / "devices.json").read_text())
        assert len(data["devices"]) == 80  # no writer lost another's record

    def test_a_damaged_file_reads_as_unchecked(self, tmp_path, monkeypatch, caplog):
        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))
        health.health_file().parent.mkdir(parents=True)
        health.health_file().write_text("{not json")
        assert health.read() == {}
        health.record("x:0", Health(probes=1))  # and the next record repairs it
        assert health.read()["x:0"]["health"]["probes"] == 1

    def test_threads_of_one_process_too(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))
        threads = [threading.Thread(target=lambda n=n: [health.record(f"t{n}:{i}", Health(probes=1)) for i in range(10)])
                   for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(health.read()) == 40


class TestDevicesCommand:
    def test_shows_health_and_quarantine(self, flaky, capsys):
        backend = flaky()
        assert cli.main(["devices"]) == 0
        assert "not checked" in capsys.readouterr().out
        backend.nan = True
        assert cli.main(["doctor", "--device", "flaky:0", "--burn-in", "2"]) == 1
        out = capsys.readouterr().out
        assert "QUARANTINED" in out and "hal doctor --device D" in out
        assert cli.main(["devices"]) == 0
        out = capsys.readouterr().out
        assert "QUARANTINED" in out and "quarantined: flaky:0 is quarantined" in out

    def test_doctor_json(self, flaky, capsys):
        flaky()
        assert cli.main(["doctor", "--device", "flaky:0", "--burn-in", "2", "--json"]) == 0
        (report,) = json.loads(capsys.readouterr().out)
        assert report["status"] == "healthy" and report["health"]["probes"] > 0 and report["error_rate"] == 0.0
