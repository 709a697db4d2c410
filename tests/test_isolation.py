"""Isolation: a device's runner in a worker process (crash and hang kill the worker, not us), and
a plugin's import and discovery in a child process (a crash there is reported like any broken
plugin)."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import time

import numpy as np
import pytest
from scripted_backend import CRASH, HANG, plus_one

import hal
from hal import _plugins
from hal.errors import RunError, SettingError
from hal.isolation import WorkerRunner

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def poisoned(value: float) -> np.ndarray:
    x = X.copy()
    x[0, 0] = value
    return x


def wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class TestIsolatedExecutable:
    def test_runs_in_another_process_with_the_same_answers(self, scripted, compiled):
        scripted({"a": "ok"})
        exe = compiled.to("s:a", isolate=True)  # verified through the worker, as any device
        assert isinstance(exe.runner, WorkerRunner)
        assert exe.runner.pid != os.getpid()
        assert exe.verification is not None and exe.verification.passed
        np.testing.assert_array_equal(exe.run({"x": X})["y"], X + 1)
        exe.runner.close()

    def test_a_crash_fails_the_request_and_restarts_the_worker(self, scripted, compiled):
        scripted({"a": "poison"})
        exe = compiled.to("s:a", isolate=True, verify=False)
        first = exe.runner.pid
        with pytest.raises(RunError, match=r"worker process died \(exit code 3\)"):
            exe.run({"x": poisoned(CRASH)})
        assert wait_for(lambda: exe.runner.pid not in (None, first))
        np.testing.assert_array_equal(exe.run({"x": X})["y"], X + 1)  # the new worker serves
        assert exe.runner.restarts == 1 and exe.runner.crashes == 1
        exe.runner.close()

    def test_a_hang_past_the_deadline_kills_the_worker(self, scripted, compiled):
        scripted({"a": "poison"}, hang_s=60)
        exe = compiled.to("s:a", isolate=True, verify=False, deadline_s=1.0)
        first = exe.runner.pid
        start = time.monotonic()
        with pytest.raises(RunError, match="no answer within 1 s; the isolated worker was killed"):
            exe.run({"x": poisoned(HANG)})
        assert time.monotonic() - start < 10  # generous: the hang would last 60 s
        assert exe.runner.kills == 1
        assert wait_for(lambda: exe.runner.pid not in (None, first))  # restarting takes a spawn
        np.testing.assert_array_equal(exe.run({"x": X})["y"], X + 1)
        exe.runner.close()

    def test_a_backend_that_cannot_compile_there_says_why(self, scripted, compiled):
        scripted({"bad": "ok"}, unplaceable=("bad",))
        with pytest.raises(hal.errors.CompileError, match=r"s:bad \(isolated\): CompileError: s:bad: this test device cannot compile"):
            compiled.to("s:bad", isolate=True, verify=False, fallback=None)


class TestIsolatedInAPool:
    def test_a_crash_fails_over_and_the_host_lives(self, scripted, compiled):
        scripted({"a": "poison", "b": "ok"})
        pool = compiled.to(["s:a", "s:b"], isolate=["s:a"], verify=False, deadline_s=30)
        isolated = pool.executables[0].runner
        assert isinstance(isolated, WorkerRunner) and not isinstance(pool.executables[1].runner, WorkerRunner)
        first = isolated.pid
        np.testing.assert_array_equal(pool.run({"x": poisoned(CRASH)})["y"], poisoned(CRASH) + 1)
        stats = pool.stats()
        assert stats["s:a"].failed == 1 and "died" in stats["s:a"].last_error
        assert stats["s:b"].served == 1 and stats["s:b"].retried == 1
        assert wait_for(lambda: isolated.pid not in (None, first))
        np.testing.assert_array_equal(pool.run({"x": X})["y"], X + 1)
        assert pool.stats()["s:a"].served == 1  # the restarted worker serves again
        pool.close()


GOOD = """
import numpy as np
import hal

class Runner:
    def run(self, feeds, names):
        return [feeds["x"] + np.float32(1)]

class Backend(hal.Backend):
    name = "iso"
    version = "2.0"
    def discover(self):
        caps = hal.Capabilities.from_levels(native=["float32"])
        return [hal.Device(id="iso:0", backend="iso", vendor="Iso", name="I1", kind="gpu", capabilities=caps)]
    def prepare(self, model, device, options):
        return Runner()

@hal.hookimpl
def hal_register_backends(register):
    register(Backend())
"""

CRASHES = {
    "exit": "import os\nos._exit(7)\n",
    "segfault": "import ctypes\nctypes.string_at(0)\n",
    "discover-exit": GOOD.replace("        caps = hal", "        import os; os._exit(9)\n        caps = hal"),
}


def _distribution(root, module: str, entry: str, body: str, isolate_group: bool = False) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    points = f"[hal]\n{entry} = {module}\n"
    if isolate_group:
        points += f"[hal.isolate]\n{entry} = {module}\n"
    (info / "entry_points.txt").write_text(points)


@pytest.fixture
def plugins_on_path(tmp_path, monkeypatch):
    def add(module: str, entry: str, body: str, isolate_group: bool = False) -> None:
        _distribution(tmp_path, module, entry, body, isolate_group)

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("HAL_DISABLE_PLUGINS", raising=False)
    importlib.invalidate_caches()
    yield add
    _plugins.reset_registry()


class TestIsolatedDiscovery:
    @pytest.mark.parametrize("how", sorted(CRASHES))
    def test_a_plugin_that_kills_its_process_is_reported_and_the_rest_listed(self, plugins_on_path, monkeypatch, how, capsys):
        plugins_on_path("hal_crashy", "crashy", CRASHES[how])
        plugins_on_path("hal_isogood", "isogood", GOOD.replace('"iso', '"isg'))
        monkeypatch.setenv("HAL_LOAD_PLUGINS", "crashy,isogood")
        monkeypatch.setenv("HAL_ISOLATE_PLUGINS", "crashy")
        _plugins.reset_registry()
        infos = {p.name: p for p in hal.plugins()}
        crashy = infos["crashy"]
        assert crashy.status == "error" and crashy.isolated
        expected = {"exit": "exit code 7", "segfault": "signal SIGSEGV", "discover-exit": "exit code 9"}[how]
        assert "crashed in its isolated process" in crashy.error and expected in crashy.error
        assert infos["isogood"].status == "loaded" and not infos["isogood"].isolated
        ids = [d.id for d in hal.devices()]
        assert "isg:0" in ids and "ort:cpu" in ids
        assert "hal_crashy" not in sys.modules
        from hal import cli

        assert cli.main(["plugins"]) == 0  # `hal plugins` says which plugin ran isolated
        lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
        assert "isolated, error: " in lines["crashy"] and "isolated" not in lines["isogood"]

    def test_devices_of_an_isolated_plugin_are_listed_and_run_isolated(self, plugins_on_path, monkeypatch):
        plugins_on_path("hal_isovendor", "isovendor", GOOD, isolate_group=True)  # the plugin asks for it
        monkeypatch.setenv("HAL_LOAD_PLUGINS", "isovendor")
        monkeypatch.delenv("HAL_ISOLATE_PLUGINS", raising=False)
        _plugins.reset_registry()
        info = next(p for p in hal.plugins() if p.name == "isovendor")
        assert info.status == "loaded" and info.isolated and info.backends == ("iso",)
        device = next(d for d in hal.devices() if d.id == "iso:0")
        assert device.vendor == "Iso" and device.capabilities.formats  # the child's record, whole
        exe = hal.compile(plus_one()).to("iso:0", fallback=None)
        assert isinstance(exe.runner, WorkerRunner)
        np.testing.assert_array_equal(exe.run({"x": X})["y"], X + 1)
        assert "hal_isovendor" not in sys.modules  # never imported here
        exe.runner.close()

    def test_a_bad_variable_is_a_setting_error(self, fresh_registry, monkeypatch):
        monkeypatch.setenv("HAL_ISOLATE_PLUGINS", "sim;rm -rf")
        with pytest.raises(SettingError, match="HAL_ISOLATE_PLUGINS"):
            fresh_registry().plugins()
