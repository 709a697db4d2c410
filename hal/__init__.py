"""onnx-hal: compile an ONNX model once, run it on any registered chip.

    import hal
    exe = hal.compile("model.onnx").to("ort:cpu")
    outputs = exe.run({"x": x})

The whole public API is listed in ``__all__``; submodules load on first use so that
``import hal`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hal.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BreakerSettings",
    "Capabilities",
    "CompileOptions",
    "CompiledModel",
    "Device",
    "DeviceKind",
    "E8M0Encoding",
    "Executable",
    "Health",
    "Interconnect",
    "InterconnectKind",
    "LoweredModel",
    "LoweringStep",
    "Maturity",
    "Memory",
    "Model",
    "NumberFormat",
    "OpsetRange",
    "Placement",
    "PluginInfo",
    "Pool",
    "Requirements",
    "ScaledFormat",
    "Stability",
    "StepKind",
    "Support",
    "TensorInfo",
    "ValueKind",
    "VerificationReport",
    "compile",
    "devices",
    "load_compiled",
    "errors",
    "hookimpl",
    "load",
    "plugins",
    "quantize",
]

_LAZY = {
    "Backend": "hal.backend",
    "CompileOptions": "hal.backend",
    "Device": "hal.backend",
    "Capabilities": "hal.capabilities",
    "DeviceKind": "hal.capabilities",
    "E8M0Encoding": "hal.capabilities",
    "Health": "hal.capabilities",
    "Interconnect": "hal.capabilities",
    "InterconnectKind": "hal.capabilities",
    "Maturity": "hal.capabilities",
    "Memory": "hal.capabilities",
    "NumberFormat": "hal.capabilities",
    "OpsetRange": "hal.capabilities",
    "ScaledFormat": "hal.capabilities",
    "Stability": "hal.capabilities",
    "Support": "hal.capabilities",
    "ValueKind": "hal.capabilities",
    "CompiledModel": "hal.compiled",
    "compile": "hal.compiled",
    "load_compiled": "hal.compiled",
    "Executable": "hal.executable",
    "LoweredModel": "hal.lowering",
    "LoweringStep": "hal.lowering",
    "Placement": "hal.lowering",
    "StepKind": "hal.lowering",
    "Model": "hal.model",
    "Requirements": "hal.model",
    "TensorInfo": "hal.model",
    "load": "hal.model",
    "PluginInfo": "hal._plugins",
    "Pool": "hal.pool",
    "BreakerSettings": "hal.pool",
    "VerificationReport": "hal.verification",
}

if TYPE_CHECKING:
    from hal import errors, quantize
    from hal._plugins import PluginInfo
    from hal.backend import Backend, CompileOptions, Device
    from hal.capabilities import (
        Capabilities,
        DeviceKind,
        E8M0Encoding,
        Health,
        Interconnect,
        InterconnectKind,
        Maturity,
        Memory,
        NumberFormat,
        OpsetRange,
        ScaledFormat,
        Stability,
        Support,
        ValueKind,
    )
    from hal.compiled import CompiledModel, compile, load_compiled
    from hal.executable import Executable
    from hal.lowering import LoweredModel, LoweringStep, Placement, StepKind
    from hal.model import Model, Requirements, TensorInfo, load
    from hal.pool import BreakerSettings, Pool
    from hal.verification import VerificationReport


def devices(*, refresh: bool = False) -> tuple[Device, ...]:
    """Every device the registered plugins found, available or not (see ``Device.reason``)."""
    from hal._plugins import registry

    return registry().devices(refresh=refresh)


def plugins() -> tuple[PluginInfo, ...]:
    """Every plugin the HAL knows of, with its status and, for a broken one, the error."""
    from hal._plugins import registry

    return registry().plugins()


def __getattr__(name: str) -> Any:
    if name in ("errors", "quantize"):  # submodules, imported on first use
        return import_module(f"hal.{name}")
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'hal' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
