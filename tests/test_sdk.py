"""The plugin author's SDK (``hal.plugin``): what it exports, that in-repo plugins use nothing
else, and the records and helpers it hands a backend."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from attrs import evolve
from onnx import TensorProto, helper

import hal
import hal.plugin
from hal.model import Model
from hal.plugin import (
    CompileError,
    CompileOptions,
    Device,
    DeviceKind,
    LoweredModel,
    Memory,
    OrtBackend,
    StepKind,
)
from hal.testing.build import make_model

ROOT = Path(__file__).resolve().parents[1]

#: The in-repo plugin packages: what a vendor writes.
PLUGIN_PACKAGES = sorted(
    [p.parent for p in (*ROOT.glob("plugins/*/hal_*/__init__.py"), ROOT / "examples/plugin/hal_example/__init__.py")],
    key=str,
)


#: The plugins' test suites: what a vendor's tests may import is checked too.
PLUGIN_TESTS = sorted([*ROOT.glob("plugins/*/tests"), ROOT / "examples/plugin/tests"], key=str)

#: The onnx-hal modules past ``hal`` that a plugin's code may import.
CODE_MODULES = frozenset({"hal.plugin"})
#: ... and its tests: the errors and the testing package with its submodules (the contract kit,
#: model builders) besides, and the user's tools a test drives a device with: FP8 quantization
#: (``hal.quantize``) and health checks (``hal.doctor``), public modules of the user API.
TEST_MODULES = frozenset({"hal.plugin", "hal.errors", "hal.testing", "hal.quantize", "hal.doctor"})


def _public(module: str, allowed: frozenset[str]) -> bool:
    if module in allowed:
        return True
    package, _, rest = module.rpartition(".")
    return package == "hal.testing" and "hal.testing" in allowed and not rest.startswith("_")


def private_imports(source: str, allowed: frozenset[str] = CODE_MODULES) -> list[str]:
    """The imports in ``source`` that reach into onnx-hal past ``hal`` and the ``allowed``
    modules: any other ``hal.*`` module, or a name ``from hal import`` that is neither in
    ``hal.__all__`` nor an allowed module. Strings that are Python with imports (a script a test
    runs in a child process) are checked as well."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("hal.") and not _public(a.name, allowed)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "hal":
                found += [
                    f"hal.{a.name}" for a in node.names
                    if a.name not in hal.__all__ and not _public(f"hal.{a.name}", allowed)
                ]
            elif node.module.startswith("hal.") and not _public(node.module, allowed):
                found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:
                found += private_imports(node.value, allowed)
            except SyntaxError:  # prose, not a script
                pass
    return found


class TestTheSurface:
    def test_every_exported_name_resolves(self):
        missing = [name for name in hal.plugin.__all__ if getattr(hal.plugin, name, None) is None]
        assert not missing
        assert sorted(hal.plugin.__all__) == dir(hal.plugin)
        with pytest.raises(AttributeError, match="no attribute 'registry'"):
            hal.plugin.registry  # noqa: B018 - the private registry is not part of it

    def test_the_docstring_names_what_a_plugin_implements(self):
        doc = hal.plugin.__doc__ or ""
        for needed in ("discover()", "prepare(", "version", "handle", "available=False", "OpsetRange", "contract kit"):
            assert needed in doc

    def test_importing_it_loads_no_runtime(self):
        code = (
            "import sys; from hal.plugin import Backend, Device, hookimpl, Capabilities, LoweredModel; "
            "bad = {'onnx', 'onnxruntime', 'numpy'} & set(sys.modules); assert not bad, bad"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


class TestPluginsImportOnlyThePublicSurface:
    def test_the_checker_sees_private_imports(self):
        bad = (
            "import hal\nimport hal.plugin\nfrom hal.plugin import Backend\nfrom hal import Device, errors\n"
            "from hal.backend import Device\nimport hal.tensors\nfrom hal import _plugins\n"
            "from hal_x import y\nfrom . import z\n"
        )
        assert private_imports(bad) == ["hal.backend", "hal.tensors", "hal._plugins"]

    def test_tests_may_use_the_errors_and_the_testing_package(self):
        source = (
            "import hal.errors\nfrom hal.errors import InputError\nfrom hal.testing.build import make_model\n"
            "from hal import testing\nimport hal.testing.models\nfrom hal.testing._x import y\n"
            "from hal.cache import RECORD_SUFFIX\n"
            'CHILD = """\nimport sys, hal\nfrom hal._plugins import registry\n"""\n'
            'PROSE = "import what you need"\n'
        )
        assert private_imports(source, TEST_MODULES) == ["hal.testing._x", "hal.cache", "hal._plugins"]
        assert private_imports(source) == [
            "hal.errors", "hal.errors", "hal.testing.build", "hal.testing", "hal.testing.models", "hal.testing._x",
            "hal.cache", "hal._plugins",
        ]

    @pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.name)
    def test_plugin_imports_only_hal_and_hal_plugin(self, package):
        files = sorted(package.rglob("*.py"))
        assert files, f"no modules under {package}"
        reached = {str(f.relative_to(ROOT)): private_imports(f.read_text()) for f in files}
        assert not {f: names for f, names in reached.items() if names}

    @pytest.mark.parametrize("tests", PLUGIN_TESTS, ids=lambda p: p.parent.name)
    def test_plugin_tests_import_only_the_public_surface(self, tests):
        """A plugin's tests are what its author copies from: hal, hal.plugin, hal.errors and
        hal.testing only, child-process scripts included."""
        files = sorted(tests.rglob("*.py"))
        assert files, f"no tests under {tests}"
        reached = {str(f.relative_to(ROOT)): private_imports(f.read_text(), TEST_MODULES) for f in files}
        assert not {f: names for f, names in reached.items() if names}

    def test_every_plugin_is_checked(self):
        assert {p.name for p in PLUGIN_PACKAGES} >= {"hal_openvino", "hal_iree", "hal_nvidia", "hal_ascend", "hal_example"}
        assert {p.parent.name for p in PLUGIN_TESTS} >= {"hal-openvino", "hal-iree", "hal-nvidia", "hal-ascend", "plugin"}


class TestLoweredModel:
    @pytest.fixture
    def prepared(self, fresh_registry, monkeypatch):
        """Every LoweredModel the ort backend is asked to prepare."""
        backend = fresh_registry().backend("ort")
        seen: list[LoweredModel] = []
        prepare = backend.prepare
        monkeypatch.setattr(backend, "prepare", lambda model, device, options: seen.append(model) or prepare(model, device, options))
        return seen

    @pytest.mark.parametrize(
        ("proto", "kinds"),
        [
            # int4 is storage-only on ort:cpu: the Identity is computed through int32 casts
            (
                make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", TensorProto.INT4, [4])], [("y", TensorProto.INT4, [4])], opset=21),
                {StepKind.LEGALIZE_FORMAT},
            ),
            # opset 6 is below ort:cpu's declared range: converted
            (
                make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, ["n", 2])], [("y", TensorProto.FLOAT, ["n", 2])], opset=6),
                {StepKind.CONVERT_OPSET},
            ),
        ],
        ids=["legalized", "converted"],
    )
    def test_prepare_gets_the_lowered_proto_with_its_own_inputs_outputs_and_digest(self, prepared, proto, kinds):
        exe = hal.compile(proto).to("ort:cpu", strict=True, verify=False)
        (model,) = prepared
        assert kinds <= {s.kind for s in model.steps} and model.steps == exe.lowering
        assert model.proto is not proto
        lowered = Model(model.proto)
        # the records the core passes are what the lowered graph declares: lowering keeps the I/O
        assert [(i.name, i.format) for i in model.inputs] == [(i.name, i.format) for i in lowered.inputs]
        assert [(o.name, o.format) for o in model.outputs] == [(o.name, o.format) for o in lowered.outputs]
        assert model.digest == lowered.digest

    def test_from_proto_reads_inputs_without_initializers(self, linear_model):
        model = LoweredModel.from_proto(linear_model)
        assert [i.name for i in model.inputs] == ["x"] and [o.name for o in model.outputs] == ["y"]
        assert model.digest == Model(linear_model).digest and model.steps == ()

    def test_the_digest_is_not_an_option(self):
        with pytest.raises(TypeError):
            CompileOptions(model_digest="ab" * 32)  # type: ignore[call-arg]


class Ordinal(OrtBackend):
    name = "ordinal"

    def discover(self):  # pragma: no cover - not called
        return []


class OrdinalPlugin:
    """An in-process plugin registering :class:`Ordinal`."""

    @hal.hookimpl
    def hal_register_backends(self, register):
        register(Ordinal())


class TestDevices:
    def test_the_handle_is_the_backends_own(self):
        a = Device(id="ordinal:0", backend="ordinal", vendor="V", name="N", kind="gpu", handle=0)
        b = evolve(a, handle=object())
        assert a == b and hash(a) == hash(b)
        assert "handle" not in repr(a) and "handle" not in a.to_dict()
        assert Device.from_dict(a.to_dict()).handle is None
        assert evolve(a, name="M").handle == 0

    def test_handle_of_checks_the_type(self):
        backend = Ordinal()
        device = Device(id="ordinal:1", backend="ordinal", vendor="V", name="N", kind="gpu", handle=1)
        assert backend.handle_of(device, int) == 1
        with pytest.raises(CompileError, match=r"ordinal:1 has no str handle.*hal.devices\(\)"):
            backend.handle_of(device, str)
        with pytest.raises(CompileError, match="got NoneType"):
            backend.handle_of(Device.from_dict(device.to_dict()), int)

    def test_the_one_unavailable_device(self):
        device = Ordinal().unavailable("no driver; install it", vendor="Acme", kind=DeviceKind.NPU)
        assert (device.id, device.available, device.reason, device.kind) == ("ordinal:0", False, "no driver; install it", DeviceKind.NPU)
        assert device.name == "no Acme device found" and device.capabilities == hal.Capabilities()
        named = Ordinal().unavailable("x", vendor="Acme", kind="cpu", name="Acme runtime", local_id="CPU")
        assert (named.id, named.name) == ("ordinal:CPU", "Acme runtime")

    def test_host_memory(self):
        memory = Memory.host(bandwidth_gbps=50.0)
        assert memory.capacity_bytes is None or memory.capacity_bytes > 2**20
        assert memory.bandwidth_gbps == 50.0
        if sys.platform == "linux":
            assert memory.capacity_bytes


class NoSuchProvider(OrtBackend):
    """An accelerator build whose provider library is not there (as onnxruntime-gpu without CUDA)."""

    name = "nosuch"
    distribution = "onnxruntime-nosuch"
    provider_libraries = {"NoSuchExecutionProvider": "libonnxruntime_providers_nosuch.so"}
    install_advice = "install the NoSuch toolkit"
    cpu_fallback = False

    def discover(self):  # pragma: no cover - not registered
        return []

    def providers(self, device, options):
        return [("NoSuchExecutionProvider", {"device_id": self.handle_of(device, int)})]


class TestTheOnnxruntimeGuard:
    def test_a_missing_provider_library_is_named(self):
        backend = NoSuchProvider()
        problem = backend.library_problem("NoSuchExecutionProvider")
        assert problem and "libonnxruntime_providers_nosuch.so" in problem and "onnxruntime-nosuch" in problem
        assert backend.library_problem("CPUExecutionProvider") is None  # not one of its libraries

    def test_runtime_problem_says_what_to_do(self):
        problem, version = NoSuchProvider().runtime_problem("NoSuchExecutionProvider")
        assert version and problem is not None and "NoSuchExecutionProvider" in problem
        problem, version = Ordinal().runtime_problem("CPUExecutionProvider")
        assert problem is None and version

    def test_sessions_forbid_the_cpu_only_where_asked(self):
        device = Device(id="nosuch:0", backend="nosuch", vendor="V", name="N", kind="gpu", handle=0)
        guarded = NoSuchProvider().session_options(device, CompileOptions())
        assert guarded.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
        plain = Ordinal().session_options(device, CompileOptions())
        with pytest.raises(Exception, match="does not have configuration"):
            plain.get_session_config_entry("session.disable_cpu_ep_fallback")

    def test_prepare_names_the_library_and_refuses_unavailable_devices(self, add_model):
        backend = NoSuchProvider()
        device = Device(id="nosuch:0", backend="nosuch", vendor="V", name="N", kind="gpu", handle=0)
        with pytest.raises(CompileError) as info:
            backend.prepare(LoweredModel.from_proto(add_model), device, CompileOptions())
        text = str(info.value)
        assert "libonnxruntime_providers_nosuch.so" in text and "install the NoSuch toolkit" in text
        with pytest.raises(hal.errors.UnavailableDeviceError, match="nosuch:0 is unavailable: gone"):
            backend.prepare(LoweredModel.from_proto(add_model), evolve(device, available=False, reason="gone"), CompileOptions())

    def test_the_cpu_backend_runs_a_lowered_model(self, fresh_registry, add_model):
        reg = fresh_registry()
        runner = reg.backend("ort").prepare(LoweredModel.from_proto(add_model), reg.device("ort:cpu"), CompileOptions())
        x = np.ones((2, 3), np.float32)
        np.testing.assert_array_equal(runner.run({"x": x, "y": x}, ["z"])[0], x + x)


class TestInProcessPlugins:
    def test_add_and_remove_plugin(self, fresh_registry):
        fresh_registry()
        hal.plugin.add_plugin(OrdinalPlugin(), name="ordinal-plugin")
        try:
            info = {p.name: p for p in hal.plugins()}["ordinal-plugin"]
            assert info.status == "loaded" and info.backends == ("ordinal",)
        finally:
            hal.plugin.remove_plugin("ordinal-plugin")
        assert "ordinal-plugin" not in {p.name for p in hal.plugins()}


class TestReloadPlugins:
    """``hal.plugin.reload_plugins()``: the HAL_* variables and entry points are read afresh."""

    def loaded(self) -> set[str]:
        return {p.name for p in hal.plugins() if p.status == "loaded"}

    def test_it_picks_up_a_changed_allow_list(self, installed, fresh_registry, monkeypatch):
        assert "goodvendor" not in self.loaded()  # HAL_LOAD_PLUGINS="" (fresh_registry)
        monkeypatch.setenv("HAL_LOAD_PLUGINS", "goodvendor")
        assert "goodvendor" not in self.loaded()  # read once, until reloaded
        hal.plugin.reload_plugins()
        assert "goodvendor" in self.loaded()
        assert "good:0" in {d.id for d in hal.devices()}
        monkeypatch.setenv("HAL_LOAD_PLUGINS", "")
        hal.plugin.reload_plugins()
        assert "goodvendor" not in self.loaded() and "good:0" not in {d.id for d in hal.devices()}

    def test_it_picks_up_a_changed_block_list(self, fresh_registry, monkeypatch):
        assert "cpu" in self.loaded()
        monkeypatch.setenv("HAL_DISABLE_PLUGINS", "cpu")
        hal.plugin.reload_plugins()
        assert {p.name: p.status for p in hal.plugins()}["cpu"] == "blocked"
        assert "ort:cpu" not in {d.id for d in hal.devices()}

    def test_it_forgets_in_process_plugins_and_backend_instances(self, fresh_registry):
        before = hal.plugin.backend("ort")
        hal.plugin.add_plugin(OrdinalPlugin(), name="ordinal-plugin")
        try:
            assert "ordinal-plugin" in self.loaded()
            hal.plugin.reload_plugins()
            assert "ordinal-plugin" not in self.loaded()
            assert hal.plugin.backend("ort") is not before  # built again, with discovery afresh
        finally:
            hal.plugin.remove_plugin("ordinal-plugin")


class TestBackend:
    """``hal.plugin.backend(name)``: the instance the HAL calls in this process."""

    def test_it_is_the_instance_the_hal_prepares_with(self, fresh_registry, add_model, monkeypatch):
        backend = hal.plugin.backend("ort")
        assert backend.name == "ort" and isinstance(backend, hal.plugin.Backend)
        seen = []
        prepare = backend.prepare
        monkeypatch.setattr(backend, "prepare", lambda model, device, options: seen.append(device.id) or prepare(model, device, options))
        hal.compile(add_model).to("ort:cpu", strict=True, verify=False)
        assert seen == ["ort:cpu"]
        assert hal.plugin.backend("ort") is backend

    def test_it_finds_in_process_plugins(self, fresh_registry):
        hal.plugin.add_plugin(OrdinalPlugin(), name="ordinal-plugin")
        try:
            assert isinstance(hal.plugin.backend("ordinal"), Ordinal)
        finally:
            hal.plugin.remove_plugin("ordinal-plugin")
        with pytest.raises(hal.errors.HalError, match="no backend named 'ordinal'"):
            hal.plugin.backend("ordinal")

    def test_an_unknown_name_is_a_hal_error_naming_the_known_ones(self, fresh_registry):
        with pytest.raises(hal.errors.HalError, match=r"no backend named 'nope'; registered: .*\bort\b") as info:
            hal.plugin.backend("nope")
        assert isinstance(info.value, KeyError)
        with pytest.raises(hal.errors.HalError, match="no backend named 'ort:cpu'"):
            hal.plugin.backend("ort:cpu")  # a device id is not a backend's name


class TestRuntimeLimits:
    def test_they_are_the_installed_onnxruntimes(self, tmp_path, monkeypatch):
        import onnxruntime as ort

        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))
        limits = hal.plugin.runtime_limits()
        assert limits.version == ort.__version__
        # what the probe found loads: a model at the limits is accepted by onnxruntime itself
        model = make_model(
            [helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2])], [("y", TensorProto.FLOAT, [2])],
            opset=limits.max_opset, ir_version=limits.max_ir_version,
        )
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.array([-1, 2], np.float32)
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], [0, 2])


class TestPluginNew:
    """``hal plugin new NAME``: a package that imports only the SDK, whose backend fails loudly
    until written, and whose tests (with the contract kit) pass out of the box."""

    def test_the_command_writes_the_package(self, tmp_path, capsys):
        from hal.cli import main

        assert main(["plugin", "new", "acme_npu", "--dir", str(tmp_path)]) == 0
        root = tmp_path / "hal-acme_npu"
        out = capsys.readouterr().out
        assert str(root) in out and "hal_acme_npu/__init__.py" in out
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert files == [
            "README.md", "hal_acme_npu/__init__.py", "pyproject.toml", "setup.cfg", "tests/conftest.py", "tests/test_acme_npu.py",
        ]
        for path in root.rglob("*.py"):
            ast.parse(path.read_text(), filename=str(path))
        assert not private_imports((root / "hal_acme_npu/__init__.py").read_text())

        import configparser

        cfg = configparser.ConfigParser()
        cfg.read(root / "setup.cfg")
        assert cfg["metadata"]["name"] == "hal-acme_npu"
        assert cfg["options.entry_points"]["hal"].split() == ["acme_npu", "=", "hal_acme_npu"]
        assert "--hal-device acme_npu:0" in cfg["tool:pytest"]["addopts"]
        assert "setuptools.build_meta" in (root / "pyproject.toml").read_text()

    def test_mistakes_are_one_line(self, tmp_path, capsys):
        from hal.cli import main

        assert main(["plugin", "new", "Acme-1", "--dir", str(tmp_path)]) == 1
        assert "lower-case letters" in capsys.readouterr().err
        assert main(["plugin", "new", "acme", "--dir", str(tmp_path / "missing")]) == 1
        assert "not a directory" in capsys.readouterr().err
        assert main(["plugin", "new", "acme", "--dir", str(tmp_path)]) == 0
        (tmp_path / "hal-acme" / "README.md").write_text("mine")
        assert main(["plugin", "new", "acme", "--dir", str(tmp_path)]) == 1
        assert "exists already" in capsys.readouterr().err
        assert (tmp_path / "hal-acme" / "README.md").read_text() == "mine"  # nothing overwritten

    def test_the_generated_backend_fails_loudly_until_written(self, tmp_path, monkeypatch, fresh_registry, add_model):
        from hal._scaffold import new_plugin

        root, _ = new_plugin("acme", tmp_path)
        monkeypatch.syspath_prepend(str(root))
        import importlib

        module = importlib.import_module("hal_acme")
        backend = module.AcmeBackend()
        (device,) = backend.discover()
        assert (device.id, device.available) == ("acme:0", False) and "TODO" in device.reason
        with pytest.raises(CompileError, match="acme:0.*not implemented"):
            backend.prepare(LoweredModel.from_proto(add_model), evolve(device, available=True, reason=None), CompileOptions())
        fresh_registry()
        hal.plugin.add_plugin(module, name="acme")
        try:
            assert "acme" in {p.name for p in hal.plugins() if p.status == "loaded"}
            with pytest.raises(hal.errors.UnavailableDeviceError, match="TODO"):
                hal.compile(add_model).to("acme:0")
        finally:
            hal.plugin.remove_plugin("acme")
            sys.modules.pop("hal_acme", None)

    def test_its_tests_and_the_contract_kit_run_out_of_the_box(self, tmp_path):
        """Slow (a pytest in a subprocess): the generated tests pass, the kit checks the TODO
        device's reason and skips the rest, without installing the package."""
        import os

        from hal._scaffold import new_plugin

        root, _ = new_plugin("acme", tmp_path)
        env = {**os.environ, "HAL_LOAD_PLUGINS": "", "HAL_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"],
            cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        summary = done.stdout.strip().splitlines()[-1]
        assert " passed" in summary and " skipped" in summary and "failed" not in summary, summary
        assert "test_the_backend_is_registered" not in done.stdout  # passed, not skipped or failed
        assert "acme:0 is unavailable here: TODO" in done.stdout  # the kit's skips say why
