"""Plugin loading: in-process plugins, real entry points from a distribution on sys.path,
allow and block lists, and plugins that break in every way we know of."""

from __future__ import annotations

import importlib
import textwrap
import time

import pytest

import hal
from hal import _plugins


class OneDeviceBackend(hal.Backend):
    def __init__(self, name="acme", devices=None):
        self.name = name
        self._devices = devices

    def discover(self):
        if self._devices is not None:
            return self._devices
        return [hal.Device(id=f"{self.name}:0", backend=self.name, vendor="Acme", name="Acme X1", kind="npu")]

    def prepare(self, model, device, options):  # pragma: no cover - not used here
        raise NotImplementedError


class Plugin:
    def __init__(self, *backends):
        self.backends = backends

    @hal.hookimpl
    def hal_register_backends(self, register):
        for b in self.backends:
            register(b)


def ids(reg):
    return [d.id for d in reg.devices()]


class TestInProcessPlugins:
    def test_a_registered_plugin_adds_its_devices(self, fresh_registry):
        reg = fresh_registry()
        reg.add_plugin(Plugin(OneDeviceBackend()), name="acme")
        try:
            assert ids(reg) == ["ort:cpu", "acme:0"]
            info = {p.name: p for p in reg.plugins()}["acme"]
            assert info.status == "loaded"
            assert info.hooks == ("hal_register_backends",)
            assert info.backends == ("acme",)
        finally:
            reg.remove_plugin("acme")
        assert ids(reg) == ["ort:cpu"]

    def test_hook_may_take_fewer_arguments_than_the_spec(self, fresh_registry):
        class Minimal:
            @hal.hookimpl
            def hal_register_backends(self):
                pass

        reg = fresh_registry()
        reg.add_plugin(Minimal(), name="minimal")
        assert {p.name: p.status for p in reg.plugins()}["minimal"] == "loaded"

    def test_builtin_cpu_backend_goes_through_the_same_hook(self, fresh_registry):
        info = {p.name: p for p in fresh_registry().plugins()}["cpu"]
        assert info.builtin and info.hooks == ("hal_register_backends",) and info.backends == ("ort",)


class TestBrokenPlugins:
    def test_plugin_raising_in_registration_is_reported_and_others_still_listed(self, fresh_registry):
        class Raises:
            @hal.hookimpl
            def hal_register_backends(self, register):
                raise RuntimeError("license server unreachable")

        reg = fresh_registry()
        reg.add_plugin(Raises(), name="raises")
        reg.add_plugin(Plugin(OneDeviceBackend()), name="acme")
        info = {p.name: p for p in reg.plugins()}["raises"]
        assert info.status == "error"
        assert "license server unreachable" in info.error
        assert ids(reg) == ["ort:cpu", "acme:0"]

    @pytest.mark.parametrize(
        ("registered", "message"),
        [
            (object(), "hal.Backend instance"),
            (OneDeviceBackend(name=""), "non-empty name"),
            (OneDeviceBackend(name="a:b"), "without ':'"),
            (OneDeviceBackend(name="ort"), "already registered by plugin cpu"),
        ],
    )
    def test_registering_nonsense_is_reported(self, fresh_registry, registered, message):
        reg = fresh_registry()
        reg.add_plugin(Plugin(registered), name="nonsense")
        info = {p.name: p for p in reg.plugins()}["nonsense"]
        assert info.status == "error"
        assert message in info.error
        assert "ort:cpu" in ids(reg)

    def test_discovery_that_raises_is_a_problem_not_a_crash(self, fresh_registry):
        class Exploding(OneDeviceBackend):
            def discover(self):
                raise OSError("driver version mismatch")

        reg = fresh_registry()
        reg.add_plugin(Plugin(Exploding(name="boom"), OneDeviceBackend()), name="mixed")
        assert ids(reg) == ["ort:cpu", "acme:0"]
        (problem,) = reg.problems()
        assert problem.backend == "boom" and "driver version mismatch" in problem.error

    def test_discovery_that_hangs_times_out(self, fresh_registry, monkeypatch):
        class Hangs(OneDeviceBackend):
            def discover(self):
                time.sleep(30)
                return []

        monkeypatch.setenv("HAL_DISCOVERY_TIMEOUT", "0.5")
        reg = fresh_registry()
        reg.add_plugin(Plugin(Hangs(name="hang")), name="hang")
        start = time.monotonic()
        assert ids(reg) == ["ort:cpu"]
        assert time.monotonic() - start < 10
        (problem,) = reg.problems()
        assert "did not finish within 0.5 s" in problem.error

    @pytest.mark.parametrize(
        ("devices", "message"),
        [
            (["not a device"], "not a hal.Device"),
            ([hal.Device(id="other:0", backend="other", vendor="x", name="x", kind="gpu")], "must have backend 'acme'"),
            (
                [hal.Device(id="acme:0", backend="acme", vendor="x", name="x", kind="gpu")] * 2,
                "registered twice",
            ),
        ],
    )
    def test_bad_devices_are_reported(self, fresh_registry, devices, message):
        reg = fresh_registry()
        reg.add_plugin(Plugin(OneDeviceBackend(devices=devices)), name="acme")
        assert "ort:cpu" in ids(reg)
        assert any(message in p.error for p in reg.problems())


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Two real distributions on sys.path with `hal` entry points: one good, one that fails to
    import. importlib.metadata finds them exactly as it finds pip-installed plugins."""
    (tmp_path / "hal_goodvendor.py").write_text(
        textwrap.dedent(
            """
            import hal

            class Backend(hal.Backend):
                name = "good"
                def discover(self):
                    return [hal.Device(id="good:0", backend="good", vendor="Good", name="G1", kind="gpu")]
                def prepare(self, model, device, options):
                    raise hal.errors.CompileError("not in this test")

            @hal.hookimpl
            def hal_register_backends(register):
                register(Backend())
            """
        )
    )
    (tmp_path / "hal_badvendor.py").write_text("import vendor_sdk_that_is_not_installed\n")
    for dist, module in (("hal_goodvendor", "goodvendor"), ("hal_badvendor", "badvendor")):
        info = tmp_path / f"{dist}-1.2.3.dist-info"
        info.mkdir()
        name = dist.replace("_", "-")
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[hal]\n{module} = {dist}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    _plugins.reset_registry()


class TestEntryPoints:
    def load(self, monkeypatch, allow=None, block=None):
        for var, value in (("HAL_LOAD_PLUGINS", allow), ("HAL_DISABLE_PLUGINS", block)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
        _plugins.reset_registry()
        reg = _plugins.registry()
        return reg, {p.name: p for p in reg.plugins()}

    def test_installed_plugins_load_and_a_broken_one_is_reported(self, installed, monkeypatch):
        reg, plugins = self.load(monkeypatch, allow="goodvendor,badvendor")
        assert plugins["goodvendor"].status == "loaded"
        assert plugins["goodvendor"].distribution == "hal-goodvendor"
        assert plugins["goodvendor"].version == "1.2.3"
        assert plugins["badvendor"].status == "error"
        assert "vendor_sdk_that_is_not_installed" in plugins["badvendor"].error
        assert "good:0" in ids(reg) and "ort:cpu" in ids(reg)

    def test_empty_allow_list_loads_no_installed_plugin(self, installed, monkeypatch):
        reg, plugins = self.load(monkeypatch, allow="")
        assert plugins["goodvendor"].status == "not-allowed"
        assert ids(reg) == ["ort:cpu"]

    def test_allow_list_by_distribution_name(self, installed, monkeypatch):
        reg, plugins = self.load(monkeypatch, allow="hal-goodvendor")
        assert plugins["goodvendor"].status == "loaded"
        assert plugins["badvendor"].status == "not-allowed"

    def test_unset_allow_list_loads_everything_installed(self, installed, monkeypatch):
        _reg, plugins = self.load(monkeypatch, allow=None)
        assert plugins["goodvendor"].status == "loaded"
        assert plugins["badvendor"].status == "error"

    def test_block_list_wins_and_can_block_builtins(self, installed, monkeypatch):
        reg, plugins = self.load(monkeypatch, allow="goodvendor", block="goodvendor,cpu")
        assert plugins["goodvendor"].status == "blocked"
        assert plugins["cpu"].status == "blocked"
        assert ids(reg) == []

    def test_plugin_module_is_imported_only_when_allowed(self, installed, monkeypatch):
        import sys

        monkeypatch.delitem(sys.modules, "hal_goodvendor", raising=False)
        self.load(monkeypatch, allow="")
        assert "hal_goodvendor" not in sys.modules
