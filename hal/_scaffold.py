"""``hal plugin new NAME``: write a vendor plugin package that installs and whose tests run.

The package is ``hal-NAME`` (import ``hal_NAME``, backend ``NAME``, devices ``NAME:0`` ...): a
``setup.cfg`` with the ``hal`` entry point, a build-system ``pyproject.toml``, one module whose
backend's ``discover()`` lists one unavailable device saying TODO and whose ``prepare()`` raises
:class:`~hal.errors.CompileError` (not implemented), a conftest that registers the module
in-process when it is not installed, a test file that runs the contract kit on ``NAME:0``, and a
README. The generated code imports only ``hal`` and ``hal.plugin``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from string import Template

from hal.errors import InputError, OutputPathError

__all__ = ["new_plugin", "plugin_files"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

_SETUP_CFG = """\
[metadata]
name = hal-$name
version = 0.1.0
description = onnx-hal plugin for $title devices: backend $name, devices $name:0, $name:1, ...

# TODO: add your vendor runtime to install_requires (import it inside the backend's methods only).
[options]
packages = hal_$name
python_requires = >=3.10
install_requires =
    onnx-hal

[options.extras_require]
test =
    pytest>=8

# The entry point makes the plugin discoverable: `hal plugins` lists it once installed.
[options.entry_points]
hal =
    $name = hal_$name

# The backend contract kit (hal.testing) runs with the plugin's own tests, on $name:0.
# pythonpath lets the tests import hal_$name before it is installed (tests/conftest.py).
[tool:pytest]
testpaths = tests
pythonpath = .
addopts = -p hal.testing --hal-device $name:0
"""

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69", "wheel"]
build-backend = "setuptools.build_meta"
"""

_MODULE = '''\
"""onnx-hal plugin for $title devices: backend ``$name``, devices ``$name:0``, ``$name:1``, ...

Written by ``hal plugin new $name``. Two methods are left to write, each marked TODO:
``$cls.discover`` and ``$cls.prepare``. Until then the plugin loads, lists ``$name:0`` as
unavailable ("TODO") and refuses to compile, loudly. The plugin author's reference is the
docstring of ``hal.plugin`` (``python -c "import hal.plugin; help(hal.plugin)"``); README.md beside
this package says how to get from here to a passing contract kit.

Import only ``hal`` and ``hal.plugin`` from onnx-hal, and import your vendor runtime inside the
methods below, never at module level: ``hal devices`` then pays only for the runtimes it uses.
"""

from __future__ import annotations

from collections.abc import Callable

from hal.plugin import Backend, CompileError, CompileOptions, Device, DeviceKind, LoweredModel, Runner, hookimpl

__version__ = "0.1.0"


class $cls(Backend):
    """$title devices as onnx-hal sees them: backend ``$name``, device ids ``$name:<n>``."""

    name = "$name"

    @property
    def version(self) -> str:
        # TODO: your runtime's version too (import it here): it is part of every compile-cache
        # key, so a new runtime never reuses an artifact an older one built.
        return __version__

    def discover(self) -> list[Device]:
        # TODO: ask your runtime or driver for its devices. For each, a Device saying what it
        # really does (the contract kit checks every claim) and, as its handle, what prepare()
        # needs to find it again:
        #
        #     Device(
        #         id=f"{self.name}:{index}", backend=self.name, vendor="$title", name=model_name,
        #         kind=DeviceKind.NPU,
        #         capabilities=Capabilities.from_levels(
        #             native=["float32", "float16"], storage=["float8_e4m3fn"], opsets=OpsetRange(17, 25)
        #         ),
        #         handle=index,
        #     )
        #
        # A device that cannot run here is listed with available=False and a reason saying what is
        # missing and what to do; when nothing can be seen at all, list the one device users will
        # name, unavailable, as below. Never raise for something missing on the machine.
        reason = "TODO: hal_$name's discover() is not written yet (see hal_$name/__init__.py)"
        return [self.unavailable(reason, vendor="$title", kind=DeviceKind.NPU)]

    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> Runner:
        # TODO: compile model.proto for the device found by self.handle_of(device, int) and
        # return an object with run(feeds, output_names) -> [one numpy array per name].
        # The core has already converted the model's opsets into your declared range and
        # legalized its formats; model.inputs / model.outputs / model.digest say what it knows.
        # External data stays external: model.weights.array(tensor) reads a tensor's bytes (a
        # read-only view), model.self_contained() gives one protobuf with them inside (< 2 GiB).
        # Raise CompileError with your runtime's one-line reason when it cannot compile.
        msg = f"hal_$name cannot compile for {device.id}: prepare() is not implemented yet"
        raise CompileError(msg)


@hookimpl
def hal_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the ``$name`` backend (discovery happens later, when the host asks)."""
    register($cls())
'''

_CONFTEST = '''\
"""Lets the tests run before the plugin is installed: hal_$name is registered in this process
unless its ``hal`` entry point has loaded it already (after ``pip install -e .``)."""

from __future__ import annotations

import pytest

import hal
import hal.plugin
import hal_$name


def pytest_configure(config: pytest.Config) -> None:
    if "$name" not in {backend for plugin in hal.plugins() for backend in plugin.backends}:
        hal.plugin.add_plugin(hal_$name, name="$name")
'''

_TEST = '''\
"""hal-$name's own tests. The backend contract kit runs beside them on $name:0 (setup.cfg adds
``-p hal.testing --hal-device $name:0``): on an unavailable device it checks the reason and skips
the rest, so these pass before discover() and prepare() are written, and test for real after."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import hal


def test_the_backend_is_registered() -> None:
    backends = {backend for plugin in hal.plugins() for backend in plugin.backends}
    assert "$name" in backends, f"hal_$name is not loaded; plugins: {[(p.name, p.status, p.error) for p in hal.plugins()]}"


def test_a_model_runs(hal_device: hal.Device) -> None:
    """Runs once per --hal-device: Add of two float32 tensors, placed strictly on the device."""
    if not hal_device.available:
        pytest.skip(f"{hal_device.id} is unavailable: {hal_device.reason}")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    exe = hal.compile(model).to(hal_device.id, strict=True)
    np.testing.assert_array_equal(exe.run({"x": x, "y": x})["z"], x + x)
'''

_README = """\
# hal-$name

An onnx-hal plugin for $title devices: backend `$name`, devices `$name:0`,
`$name:1`, ... Written by `hal plugin new $name`; two methods are left to write.

## From here to a passing contract kit

1. Try it as it is: `pytest` (in this folder). The plugin is registered in-process
   (`tests/conftest.py`), `$name:0` is listed unavailable with a TODO reason, and the contract kit
   (`hal.testing`, run by `setup.cfg`'s `addopts`) checks that reason and skips the rest.
2. Write `discover()` in `hal_$name/__init__.py`: one `Device` per device your runtime sees, with
   capabilities that say what it really does and a `handle` for `prepare`. Devices that cannot
   run here stay listed, `available=False`, with a reason saying what to do.
3. Write `prepare()`: compile `model.proto` with your runtime and return a runner,
   `run(feeds, output_names) -> [arrays]`. The core has already converted the model's opsets into
   your declared range and legalized its formats; it verifies your answers after `prepare`.
   Weights stored as external data stay external: read them with `model.weights.array(tensor)`
   or take `model.self_contained()`, never a location from the model yourself.
4. `pytest` again: the kit now runs for real on `$name:0` (discovery, errors, feeds as users
   have them, threads, every declared format, float32 precision, ONNX's node test cases). Change
   `--hal-device` in `setup.cfg` if your first device is not `$name:0`.
5. `pip install -e .`: `hal plugins` lists `$name` and `hal devices` your devices.

Import only `hal` and `hal.plugin` from onnx-hal: `hal.plugin`'s docstring is the reference
(`python -c "import hal.plugin; help(hal.plugin)"`), and the "Writing a plugin" section of
onnx-hal's README walks through it.
"""


def plugin_files(name: str) -> dict[str, str]:
    """The files of the ``hal-NAME`` package, by path relative to its folder."""
    check_name(name)
    words = {
        "name": name,
        "title": " ".join(w.capitalize() for w in name.split("_") if w),
        "cls": "".join(w.capitalize() for w in name.split("_") if w) + "Backend",
    }
    templates = {
        "setup.cfg": _SETUP_CFG,
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"hal_{name}/__init__.py": _MODULE,
        "tests/conftest.py": _CONFTEST,
        f"tests/test_{name}.py": _TEST,
    }
    return {path: Template(text).substitute(words) for path, text in templates.items()}


def check_name(name: str) -> None:
    """Raise :class:`~hal.errors.InputError` unless ``name`` makes a backend name, a device-id
    prefix and a module name ``hal_NAME``: lower-case letters, digits and ``_``, starting with a
    letter, at most 40 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        msg = (
            f"plugin name {name!r} must be lower-case letters, digits and '_', starting with a letter "
            "(at most 40): it names the backend, the device ids (NAME:0) and the module hal_NAME"
        )
        raise InputError(msg)


def new_plugin(name: str, directory: str | os.PathLike[str] = ".") -> tuple[Path, list[Path]]:
    """Write the ``hal-NAME`` package into ``directory/hal-NAME``; return that folder and the
    files written. Raises :class:`~hal.errors.InputError` for a bad name and
    :class:`~hal.errors.OutputPathError` when the folder exists or cannot be written."""
    files = plugin_files(name)
    parent = Path(directory)
    root = parent / f"hal-{name}"
    if not parent.is_dir():
        msg = f"--dir {parent} is not a directory; create it first or pick another"
        raise OutputPathError(msg)
    if root.exists() or root.is_symlink():
        msg = f"{root} exists already; remove it or pass another --dir"
        raise OutputPathError(msg)
    written = []
    try:
        for relative, text in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    except OSError as exc:
        msg = f"cannot write the plugin package to {root}: {exc.strerror or exc}"
        raise OutputPathError(msg) from None
    return root, written
