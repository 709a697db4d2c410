"""The plugin author's SDK: everything a plugin may use, in one module.

A plugin imports ``hal`` and ``hal.plugin``, nothing else from onnx-hal (a test of this
repository fails if an in-repo plugin does). ``hal plugin new NAME`` writes a package that starts
from here; README.md's "Writing a plugin" walks from it to a passing contract kit.

The package
===========

One distribution ``hal-NAME`` importing as ``hal_NAME``, found through the ``hal`` entry-point
group (``setup.cfg``: ``[options.entry_points] hal = NAME = hal_NAME``). Its module implements
hooks (:mod:`hal.hookspecs` documents them) marked with :data:`hookimpl`; the one that matters::

    from hal.plugin import Backend, hookimpl

    @hookimpl
    def hal_register_backends(register):
        register(AcmeBackend())

Keep the module cheap to import: import the vendor runtime inside the backend's methods.

The backend
===========

Subclass :class:`Backend`, set ``name`` (unique; every device id starts with ``name:``) and
``version``, implement ``discover()`` and ``prepare()``.

``version`` (required; a class attribute or a property that imports the runtime lazily)
    The runtime's version, and the plugin's where its code changes what is compiled. It is part of
    every compile-cache key: a new runtime never reuses an old artifact.

``discover() -> Iterable[Device]``
    Every device the backend knows of. The host calls it in a thread, lazily (only when one of
    the backend's devices is wanted), bounded by ``HAL_DISCOVERY_TIMEOUT``, and checks each
    :class:`Device` as it enters; a bad one is reported under the plugin's name.

    **A device that cannot run here** (no driver, no toolkit, a provider that does not load) is
    listed with ``available=False`` and a ``reason`` that names what is missing and what to do.
    When the backend can see no device at all (the runtime does not import, no driver), it lists
    exactly one: the device a user would name first, ``<name>:0`` (``cuda:0``; ``local_id="CPU"``
    where devices are named), unavailable, declaring nothing — :meth:`Backend.unavailable` builds
    it. So ``to("cuda:0")`` on a machine without a driver answers with the reason, and a numbered
    device is never invented beyond that one. Never raise for something missing on the machine:
    an exception from ``discover()`` is reported as a broken plugin.

    **The handle.** Put whatever ``prepare`` needs to find the device again (an ordinal, a driver
    name, a record of the runtime's properties) in ``Device(handle=...)`` and read it back with
    :meth:`Backend.handle_of`; never parse ``device.id`` or read ``device.details`` back.
    ``details`` are for people (``hal devices``); the handle is the backend's own and is never
    serialized.

``prepare(model: LoweredModel, device: Device, options: CompileOptions) -> Runner``
    Compile for one device. What the core has already done to ``model.proto``:

    - loaded it safely (external data inside the model's directory, sizes bounded; the tensors
      stay external, their bytes in ``model.weights``: read ``model.weights.array(tensor)`` or ask
      for ``model.self_contained()``, never a location yourself); optimized it once,
      device-independently (constants folded, dead nodes gone);
    - converted its default-domain opset into the device's declared :class:`OpsetRange` (and its
      IR version to ``max_ir_version``) and refused operators of undeclared domains: a runtime
      whose importer needs opset 17 declares ``OpsetRange(17, ...)`` and never converts itself
      (the conversion then shows in ``hal explain``);
    - legalized element types for the declared formats: a format the device only ``STORAGE``\\ s
      is computed through ``Cast`` to a wider one, and a format it cannot hold (``NONE``) was
      refused before ``prepare`` was called.

    ``model.inputs`` / ``model.outputs`` (:class:`TensorInfo`: name, :class:`NumberFormat`, shape,
    and :class:`ValueKind`: a tensor, or a sequence or optional of such elements) are the graph's, the declared types unchanged by legalization; ``model.digest`` is the sha256
    of the proto (name artifacts by it); ``model.steps`` what lowering changed. Do not modify
    ``model.proto``. Raise :class:`CompileError` with the runtime's one-line reason when it cannot
    compile, :class:`UnavailableDeviceError` for a device that cannot run; never fall back to
    another device (or the CPU) silently. After ``prepare`` the core verifies the placement: the
    model runs once on the device and on a reference with seeded inputs, and a device that
    disagrees beyond the tolerance is refused.

    ``options``: ``reduced_precision`` (False unless the caller allows computing in narrower
    types than declared), ``cache_dir`` (this backend's directory for its own artifacts) and
    ``extra`` (the caller's backend-specific keyword arguments; document the keys you read).

The runner (:class:`Runner`) has one method, ``run(feeds, output_names) -> list of arrays``: feeds
are already checked against the inputs (names, dtypes, ranks, static dims), and may be read-only,
strided, memory-mapped, or dropped right after ``run``; return one array per requested output,
of the declared type, owned by the caller; ``run`` may be called from many threads at once.

Sequences and optionals reach a runner only when its device declares them
(``Capabilities.io_kinds``: ``"sequence"``, ``"optional"``, ``"optional-sequence"``; lowering
refuses such a model for any other device, with the reason). Such a runner gets a list of arrays
for a sequence feed (each array checked like a tensor feed, and as read-only or strided) and None
for an absent optional, and returns a list of arrays for a sequence output and None for an
absent optional; the core checks each array against the declared element type.

Building blocks
===============

- Capabilities: :meth:`Capabilities.from_levels` (``native=[...]``, ``emulated``, ``storage``,
  ``scaled=[ScaledFormat(...)]``, ``opsets=OpsetRange(...)``, ``memory=Memory(...)``,
  ``interconnect=Interconnect(...)``, ``stability=Stability(...)``, ``e8m0_encoding``,
  ``movable``, ``dynamic_shapes``, ``io_kinds``) with the records :class:`Support`, :class:`NumberFormat`,
  :class:`ScaledFormat`, :class:`OpsetRange`, :class:`Memory` (:meth:`Memory.host` for a CPU),
  :class:`Interconnect` / :class:`InterconnectKind`, :class:`Stability` / :class:`Maturity` /
  :class:`Health`, :class:`E8M0Encoding`, :class:`ValueKind`. Declare what the device really does: the contract kit
  checks every level.
- onnxruntime distributions: subclass :class:`OrtBackend` and implement ``discover`` and
  ``providers``; it creates sessions, moves ml_dtypes tensors by their bits (:class:`OrtRunner`),
  caches optimized models, and refuses a session that landed on another provider. For an
  accelerator build, set ``provider_libraries`` (provider -> library in onnxruntime's ``capi``),
  ``install_advice`` and ``cpu_fallback = False``, and take each device's ``reason`` from
  :meth:`OrtBackend.runtime_problem`: the provider must really load, never fall back to the CPU
  (onnxruntime-gpu and onnxruntime-cann list providers they cannot create). Fit the declared
  table to the installed onnxruntime with :func:`fit_capabilities`. :class:`OrtRunner` passes
  sequences and optionals: declare ``io_kinds=ORT_IO_KINDS`` once your provider has run them.
- Tensors whose runtime refuses ml_dtypes arrays: :func:`bits_view` (same-width unsigned view),
  :func:`from_bits`, :func:`pack` / :func:`unpack` (ONNX's sub-byte layout).
- A simulated device (hal-sim): :func:`emulate` lowers the model for the onnxruntime CPU engine
  that computes it; :func:`estimate` gives a roofline :class:`Estimate` of a run from a
  :class:`Capabilities`' declared peaks, bandwidth and ``launch_overhead_us`` (``kind`` is always
  ``"estimated"``), for pacing runs or reporting; ``Capabilities.unsupported_ops`` and
  ``Memory.capacity_bytes`` are enforced by the core's lowering, not by the plugin.
- A graph without its weights: :func:`weightless` (initializers you choose become graph inputs
  of their type and shape; nothing is copied), for shape inference or a reader that must not see
  external data.
- Cache files: :class:`Artifact` (a file in ``options.cache_dir``, checked against its record
  before the runtime reads it; a damaged one is rebuilt; a read-only disk only loses the cache).
- Errors: :class:`HalError` and the subclasses above, :class:`RunError` for a runner that fails,
  :class:`SettingError` for a bad value in a setting your plugin reads (an environment variable).

Testing
=======

The contract kit: ``pytest -p hal.testing --hal-device NAME:0`` runs the backend contract on a
device from your own test suite (see :mod:`hal.testing`); on an unavailable device it checks the
reason and skips the rest. A plugin's tests import from onnx-hal only ``hal``, ``hal.plugin``,
``hal.errors`` and ``hal.testing`` with its submodules (this repository checks its plugins' tests
as it checks their code). What they have here:

- :func:`add_plugin` registers a module in this process, to try a plugin that is not installed
  (:func:`remove_plugin` takes it out);
- :func:`reload_plugins` after changing ``HAL_LOAD_PLUGINS`` / ``HAL_DISABLE_PLUGINS`` (with
  ``monkeypatch.setenv``): plugins and devices are found afresh on next use;
- :func:`backend` is the instance of your backend the host calls, to read what it counts
  (compiles, cache hits) or to call ``prepare`` directly, with :meth:`LoweredModel.from_proto`
  building its argument and ``hal.devices()`` the device;
- :func:`runtime_limits`: the IR version and opset the installed onnxruntime loads, for a test of
  an :class:`OrtBackend` that checks what :func:`fit_capabilities` made of its table;
- :attr:`Artifact.record` is where a cache file's record lives, for a test that damages one
  (``Artifact(path, key).record``, with the path and key your backend gives it).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hal.hookspecs import hookimpl

__all__ = [
    # the contract
    "Backend", "CompileOptions", "Device", "LoweredModel", "LoweringStep", "Runner", "StepKind", "TensorInfo",
    "hookimpl",
    # describing a device
    "Capabilities", "DeviceKind", "E8M0Encoding", "Health", "Interconnect", "InterconnectKind", "Maturity", "Memory",
    "NumberFormat", "OpsetRange", "ScaledFormat", "Stability", "Support", "ValueKind",
    # building blocks
    "ORT_IO_KINDS", "Artifact", "OrtBackend", "OrtRunner", "bits_view", "fit_capabilities", "from_bits", "pack", "unpack",
    "weightless",
    # simulating a device
    "Estimate", "NodeEstimate", "emulate", "estimate",
    # errors
    "CompileError", "HalError", "RunError", "SettingError", "UnavailableDeviceError",
    # testing a plugin
    "add_plugin", "backend", "reload_plugins", "remove_plugin", "runtime_limits",
]

# Loaded on first use, as in ``hal``: a plugin module importing names from here pays only for
# those (hal.backends.onnxruntime and hal.model import numpy and onnx).
_LAZY = {
    name: module
    for module, names in {
        "hal.backend": ("Backend", "CompileOptions", "Device", "Runner"),
        "hal.capabilities": (
            "Capabilities", "DeviceKind", "E8M0Encoding", "Health", "Interconnect", "InterconnectKind",
            "Maturity", "Memory", "NumberFormat", "OpsetRange", "ScaledFormat", "Stability", "Support", "ValueKind",
        ),
        "hal.lowering": ("LoweredModel", "LoweringStep", "StepKind"),
        "hal.model": ("TensorInfo",),
        "hal.backends.onnxruntime": ("ORT_IO_KINDS", "OrtBackend", "OrtRunner", "fit_capabilities", "runtime_limits"),
        "hal.tensors": ("bits_view", "from_bits", "pack", "unpack"),
        "hal.cache": ("Artifact",),
        "hal.weights": ("weightless",),
        "hal.estimate": ("Estimate", "NodeEstimate", "estimate"),
        "hal.errors": ("CompileError", "HalError", "RunError", "SettingError", "UnavailableDeviceError"),
    }.items()
    for name in names
}

if TYPE_CHECKING:
    from hal.backend import Backend, CompileOptions, Device, Runner
    from hal.backends.onnxruntime import ORT_IO_KINDS, OrtBackend, OrtRunner, fit_capabilities, runtime_limits
    from hal.cache import Artifact
    from hal.capabilities import (
        Capabilities, DeviceKind, E8M0Encoding, Health, Interconnect, InterconnectKind, Maturity, Memory,
        NumberFormat, OpsetRange, ScaledFormat, Stability, Support, ValueKind,
    )
    from hal.errors import CompileError, HalError, RunError, SettingError, UnavailableDeviceError
    from hal.estimate import Estimate, NodeEstimate, estimate
    from hal.lowering import LoweredModel, LoweringStep, StepKind
    from hal.model import TensorInfo
    from hal.tensors import bits_view, from_bits, pack, unpack
    from hal.weights import weightless


def emulate(model: LoweredModel) -> LoweredModel:
    """``model`` lowered again for the embedded onnxruntime CPU runtime, for a backend that
    simulates a device on the CPU (hal-sim): a format the simulated device computes natively but
    onnxruntime's CPU kernels do not (bfloat16 MatMul, FP8) is computed wider, exactly as the core
    lowers for ``ort:cpu``; opsets are converted into what onnxruntime loads. The returned
    record's ``steps`` add this lowering's steps to ``model.steps``; they describe how the
    simulation computes, not what the simulated device needs, so keep them to your runner. Returns
    ``model`` itself when nothing changes. Raises :class:`~hal.errors.LoweringError` when the CPU
    runtime cannot run the model at all."""
    import hashlib

    from hal.backends.cpu import runtime_capabilities
    from hal.compiler import lower_for
    from hal.lowering import LoweredModel

    proto, steps = lower_for(model.proto, runtime_capabilities())
    if proto is model.proto:
        return model
    data = proto.SerializeToString(deterministic=True)
    digest = hashlib.sha256(data if model.weights is None else model.weights.normalized(proto)).hexdigest()
    return LoweredModel(proto, model.inputs, model.outputs, digest, (*model.steps, *steps), model.weights)


def add_plugin(plugin: object, name: str) -> None:
    """Register ``plugin`` (a module or object with ``@hookimpl`` functions) in this process under
    ``name``, as if it were installed: for tests and notebooks. It goes through the same hooks and
    checks; ``hal plugins`` lists it as ``(in-process)``. Device discovery starts afresh."""
    from hal._plugins import registry

    registry().add_plugin(plugin, name)


def remove_plugin(name: str) -> None:
    """Take out a plugin :func:`add_plugin` registered (call it in a ``finally``)."""
    from hal._plugins import registry

    registry().remove_plugin(name)


def reload_plugins() -> None:
    """Forget every plugin, backend and discovered device of this process (in-process plugins
    from :func:`add_plugin` too); the next use of the HAL loads them again, reading
    ``HAL_LOAD_PLUGINS``, ``HAL_DISABLE_PLUGINS`` and the installed entry points afresh. For a test
    that changes those variables: call it after ``monkeypatch.setenv`` and again in a
    ``finally`` (the variables are restored after the test, and the next use sees them)."""
    from hal._plugins import reset_registry

    reset_registry()


def backend(name: str) -> Backend:
    """The registered backend named ``name`` (``"openvino"``, not a device id): the instance the
    HAL calls in this process, loading plugins first if none are loaded. A test reads what the
    backend keeps (counters such as compiles and cache hits) or calls ``prepare`` on it directly.
    An unknown name raises :class:`hal.errors.UnknownDeviceError` (a :class:`HalError` and a
    ``KeyError``) listing the registered backends."""
    from hal._plugins import registry

    return registry().backend(name)


def __getattr__(name: str) -> Any:
    try:
        value = getattr(import_module(_LAZY[name]), name)
    except KeyError:
        raise AttributeError(f"module 'hal.plugin' has no attribute {name!r}") from None
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
