"""Shared fixtures. Installed plugins are kept out of core tests unless a test opts in."""

from __future__ import annotations

import importlib
import importlib.util
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hal
from hal import _plugins
from hal.testing.build import make_model


@pytest.fixture
def add_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [("x", TensorProto.FLOAT, [2, 3]), ("y", TensorProto.FLOAT, [2, 3])],
        [("z", TensorProto.FLOAT, [2, 3])],
    )


@pytest.fixture
def linear_model() -> onnx.ModelProto:
    """y = x @ w + b with a symbolic batch dimension."""
    rng = np.random.default_rng(1)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal(32).astype(np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        [("x", TensorProto.FLOAT, ["batch", 8])],
        [("y", TensorProto.FLOAT, ["batch", 4])],
        initializers=[w, b],
    )


# tests/ray needs Ray, hal-sim and tritonclient (the py311-ray environment). Elsewhere its
# conftest is not even imported: the environments that collect tests/ also collect a plugin's
# tests, whose `from conftest import ...` must find their own conftest.
if any(importlib.util.find_spec(name) is None for name in ("ray", "hal_sim", "tritonclient")):
    collect_ignore = ["ray"]


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry built from scratch for this test, with HAL_* variables it sets, then reset."""
    monkeypatch.delenv("HAL_DISABLE_PLUGINS", raising=False)
    monkeypatch.setenv("HAL_LOAD_PLUGINS", "")
    _plugins.reset_registry()
    yield _plugins.registry
    _plugins.reset_registry()


class EvaluatorBackend(hal.Backend):
    """A device whose capabilities a test chooses, running models with ONNX's reference evaluator
    (a real runtime, not a mock). ``prepared`` counts its placements, ``runs`` its runs."""

    version = "1"

    def __init__(self, name: str, capabilities: hal.Capabilities, kind: str) -> None:
        self.name = name
        self.capabilities = capabilities
        self.kind = kind
        self.prepared = 0
        self.runs = 0

    def discover(self):
        return [hal.Device(id=f"{self.name}:0", backend=self.name, vendor="test", name=self.name, kind=self.kind,
                           capabilities=self.capabilities)]

    def prepare(self, model, device, options):
        from onnx.reference import ReferenceEvaluator

        self.prepared += 1
        session = ReferenceEvaluator(model.proto)
        backend = self

        class Runner:
            def run(self, feeds, names):
                backend.runs += 1
                return session.run(list(names), feeds)

        return Runner()


@pytest.fixture
def evaluator_device(fresh_registry):
    """``evaluator_device(name, capabilities, kind="gpu")`` registers an :class:`EvaluatorBackend`
    with one device ``NAME:0`` in this process (an accelerator by default, so it ranks before
    ort:cpu) and returns it; taken out after the test."""
    reg = fresh_registry()
    added = []

    def add(name: str, capabilities: hal.Capabilities, kind: str = "gpu") -> EvaluatorBackend:
        backend = EvaluatorBackend(name, capabilities, kind)

        class Plugin:
            @hal.hookimpl
            def hal_register_backends(self, register):
                register(backend)

        reg.add_plugin(Plugin(), name=name)
        added.append(name)
        return backend

    yield add
    for name in added:
        reg.remove_plugin(name)


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
                version = "1.2.3"
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


@pytest.fixture
def scripted(fresh_registry):
    """``scripted(modes, **kw)`` registers a :class:`ScriptedBackend` named ``s`` in this process
    (taken out after the test) and returns it."""
    from scripted_backend import ScriptedBackend, register

    reg = fresh_registry()
    made = []

    def add(modes, **kwargs):
        backend = ScriptedBackend("s", modes, **kwargs)
        register(reg, backend)
        made.append(backend)
        return backend

    yield add
    for backend in made:
        reg.remove_plugin(backend.name)


@pytest.fixture
def compiled():
    """The ``plus_one`` model of tests/scripted_backend.py, compiled."""
    from scripted_backend import plus_one

    return hal.compile(plus_one())
