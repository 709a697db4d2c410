"""Plugin loading: in-process plugins, real entry points from a distribution on sys.path,
allow and block lists, and plugins that break in every way we know of."""

from __future__ import annotations

import time

import pytest

import hal
from hal import _plugins


class OneDeviceBackend(hal.Backend):
    version = "1.0"

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


class TestHooksThroughPluggy:
    def test_a_misspelled_hook_is_a_reported_error(self, fresh_registry):
        class Misspelled:
            @hal.hookimpl
            def hal_register_backend(self, register):  # missing the final "s"
                register(OneDeviceBackend())

        reg = fresh_registry()
        reg.add_plugin(Misspelled(), name="typo")
        info = {p.name: p for p in reg.plugins()}["typo"]
        assert info.status == "error"
        assert "hal_register_backend (did you mean hal_register_backends?)" in info.error
        assert ids(reg) == ["ort:cpu"]

    def test_wrapper_hooks_wrap_every_plugins_registration(self, fresh_registry):
        seen = []

        class Tracer:
            @hal.hookimpl(wrapper=True)
            def hal_register_backends(self, register):
                seen.append("before")
                result = yield
                seen.append("after")
                return result

        reg = fresh_registry()
        reg.add_plugin(Tracer(), name="tracer")
        reg.add_plugin(Plugin(OneDeviceBackend()), name="acme")
        assert seen[-2:] == ["before", "after"]  # it wrapped acme's registration too
        assert "acme:0" in ids(reg)

    def test_a_plugin_that_hangs_in_its_hook_is_bounded(self, fresh_registry, monkeypatch):
        class Sleepy:
            @hal.hookimpl
            def hal_register_backends(self, register):
                time.sleep(3)
                register(OneDeviceBackend(name="late"))

        monkeypatch.setenv("HAL_PLUGIN_TIMEOUT", "0.3")
        reg = fresh_registry()
        start = time.monotonic()
        reg.add_plugin(Sleepy(), name="sleepy")
        assert time.monotonic() - start < 2
        info = {p.name: p for p in reg.plugins()}["sleepy"]
        assert info.status == "error" and "did not finish within 0.3 s" in info.error
        time.sleep(3.2)  # it wakes up and registers: refused, never half-added
        assert "late" not in reg.backends()

    def test_a_plugin_that_hangs_at_import_is_bounded(self, tmp_path, monkeypatch):
        (tmp_path / "hal_sleeps_at_import.py").write_text("import time\ntime.sleep(5)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("HAL_PLUGIN_TIMEOUT", "0.3")
        reg = _plugins.Registry(builtins={**_plugins.DEFAULT_PLUGINS, "sleeper": "hal_sleeps_at_import"})
        start = time.monotonic()
        assert reg.device("ort:cpu").available
        assert time.monotonic() - start < 3
        info = {p.name: p for p in reg.plugins()}["sleeper"]
        assert info.status == "error" and "import did not finish within 0.3 s" in info.error

    def test_a_named_device_does_not_wait_for_another_backends_discovery(self, fresh_registry):
        class Slow(OneDeviceBackend):
            def discover(self):
                time.sleep(5)
                return super().discover()

        reg = fresh_registry()
        reg.add_plugin(Plugin(Slow(name="slow")), name="slow")
        start = time.monotonic()
        assert reg.device("ort:cpu").id == "ort:cpu"
        assert time.monotonic() - start < 2

    def test_an_endless_device_generator_is_stopped(self, fresh_registry, monkeypatch):
        made = []

        class Endless(OneDeviceBackend):
            def discover(self):
                i = 0
                while True:
                    time.sleep(0.001)
                    made.append(i)
                    yield hal.Device(id=f"endless:{i}", backend="endless", vendor="x", name="x", kind="gpu")
                    i += 1

        reg = fresh_registry()
        reg.add_plugin(Plugin(Endless(name="endless")), name="endless")
        assert ids(reg) == ["ort:cpu"]
        assert any("more than" in p.error for p in reg.problems())
        count = len(made)
        time.sleep(0.2)
        assert len(made) == count  # nothing keeps generating after discovery gave up


class TestSettings:
    @pytest.mark.parametrize("value", ["abc", "inf", "0", "-1", "nan"])
    @pytest.mark.parametrize("variable", ["HAL_DISCOVERY_TIMEOUT", "HAL_PLUGIN_TIMEOUT"])
    def test_bad_timeouts_are_named(self, fresh_registry, monkeypatch, variable, value):
        from hal.errors import SettingError

        monkeypatch.setenv(variable, value)
        with pytest.raises(SettingError, match=f"{variable}={value!r}"):
            fresh_registry().devices()

    def test_cli_reports_a_bad_setting_in_one_line(self, fresh_registry, monkeypatch, capsys):
        from hal.cli import main

        monkeypatch.setenv("HAL_DISCOVERY_TIMEOUT", "soon")
        fresh_registry()
        assert main(["devices"]) == 1
        assert "HAL_DISCOVERY_TIMEOUT='soon'" in capsys.readouterr().err


def runs_float32(name):
    caps = hal.Capabilities.from_levels(native=["float32", "int64"], opsets=hal.OpsetRange(1, 25))
    return [hal.Device(id=f"{name}:0", backend=name, vendor="Acme", name="Acme X1", kind="npu", capabilities=caps)]


class TestMalformedPlugins:
    """What a plugin hands the host is checked where it enters; every other device stays usable."""

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [("capabilities", None, "capabilities must be a hal.Capabilities"), ("available", "no", "available must be True or False")],
    )
    def test_malformed_devices_are_left_out(self, fresh_registry, linear_model, field, value, message):
        bad = hal.Device(id="acme:0", backend="acme", vendor="x", name="x", kind="gpu")
        object.__setattr__(bad, field, value)  # what a plugin bypassing attrs' checks hands over
        reg = fresh_registry()
        reg.add_plugin(Plugin(OneDeviceBackend(devices=[bad])), name="acme")
        assert ids(reg) == ["ort:cpu"]
        assert any(message in p.error for p in reg.problems())
        assert hal.compile(linear_model).to("auto").device.id == "ort:cpu"

    def test_a_backend_without_version_cannot_register(self, fresh_registry):
        class NoVersion(hal.Backend):
            name = "nover"

            def discover(self):
                return []

            def prepare(self, model, device, options):
                raise NotImplementedError

        class Registers:
            @hal.hookimpl
            def hal_register_backends(self, register):
                register(NoVersion())

        reg = fresh_registry()
        reg.add_plugin(Registers(), name="nover")
        info = {p.name: p for p in reg.plugins()}["nover"]
        assert info.status == "error" and "version" in info.error

    @pytest.mark.parametrize("prepared", [None, object()])
    def test_prepare_returning_no_runner_is_a_compile_error_and_auto_moves_on(self, fresh_registry, linear_model, prepared):
        from hal.errors import CompileError

        class Broken(OneDeviceBackend):
            def prepare(self, model, device, options):
                return prepared

        reg = fresh_registry()
        reg.add_plugin(Plugin(Broken(name="broken", devices=runs_float32("broken"))), name="broken")
        with pytest.raises(CompileError, match="not a runner"):
            hal.compile(linear_model).to("broken:0", strict=True)
        exe = hal.compile(linear_model).to("auto")  # broken:0 is an "npu": ranked first, skipped
        assert exe.device.id == "ort:cpu" and "broken:0" in exe.lowering[0].detail

    def test_a_version_that_raises_is_a_compile_error(self, fresh_registry, linear_model):
        from hal.errors import CompileError

        class Raises(OneDeviceBackend):
            @property
            def version(self):
                raise RuntimeError("runtime not importable")

        reg = fresh_registry()
        reg.add_plugin(Plugin(Raises(name="raises", devices=runs_float32("raises"))), name="raises")
        with pytest.raises(CompileError, match="reading its version failed"):
            hal.compile(linear_model).to("raises:0", strict=True)


class TestPoliciesAndHealth:
    def test_a_plugin_policy_orders_auto(self, fresh_registry, linear_model):
        class Right(OneDeviceBackend):
            def prepare(self, model, device, options):
                return hal._plugins.registry().backend("ort").prepare(model, hal._plugins.registry().device("ort:cpu"), options)

        class Policies:
            @hal.hookimpl
            def hal_register_policies(self, register):
                register("cpu-first", lambda model, devices: sorted(devices, key=lambda d: d.kind.value != "cpu"), "CPUs first")

        reg = fresh_registry()
        reg.add_plugin(Plugin(Right(name="acme", devices=runs_float32("acme"))), name="acme")
        reg.add_plugin(Policies(), name="policies")
        assert {p.name: p for p in reg.plugins()}["policies"].policies == ("cpu-first",)
        compiled = hal.compile(linear_model)
        assert compiled.to("auto").device.id == "acme:0"  # default: the npu first
        assert compiled.to("auto", policy="cpu-first").device.id == "ort:cpu"
        with pytest.raises(hal.errors.InputError, match="unknown ranking policy 'cheapest'; built in: .*registered by plugins: cpu-first"):
            compiled.to("auto", policy="cheapest")

    def test_policy_names_clash_is_reported(self, fresh_registry):
        class P:
            @hal.hookimpl
            def hal_register_policies(self, register):
                register("same", lambda model, devices: devices)

        reg = fresh_registry()
        reg.add_plugin(P(), name="one")
        reg.add_plugin(P(), name="two")
        info = {p.name: p for p in reg.plugins()}["two"]
        assert info.status == "error" and "already registered by plugin one" in info.error

    def test_health_probes_are_collected_from_every_plugin(self, fresh_registry):
        class Probe:
            @hal.hookimpl
            def hal_probe_health(self, device):
                if device.id == "ort:cpu":
                    return hal.Health(probes=3, failures=1)
                return None

        reg = fresh_registry()
        reg.add_plugin(Probe(), name="probe")
        (health,) = reg.hooks.probe_health(reg.device("ort:cpu"))
        assert health.failures == 1 and health.error_rate == pytest.approx(1 / 3)
