"""Compile once: :func:`compile` turns a model into a :class:`CompiledModel`, and
:meth:`CompiledModel.to` prepares it for one device, returning an :class:`~hal.Executable`."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from hal._paths import backend_cache_dir
from hal._plugins import registry
from hal.backend import CompileOptions, Device
from hal.errors import CompileError, HalError
from hal.executable import Executable, Placement
from hal.model import Model, load

if TYPE_CHECKING:
    import onnx

__all__ = ["CompiledModel", "compile"]

log = logging.getLogger("hal.compile")


class CompiledModel:
    """A model checked and prepared once, ready to be placed on any registered device."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __repr__(self) -> str:
        return f"<hal.CompiledModel {self.model.name!r} {self.model.digest[:12]}>"

    @property
    def inputs(self):  # type: ignore[no-untyped-def]
        return self.model.inputs

    @property
    def outputs(self):  # type: ignore[no-untyped-def]
        return self.model.outputs

    def to(self, device: str | Device, *, reduced_precision: bool = False, **extra: Any) -> Executable:
        """Prepare the model for ``device`` (an id such as ``"ort:cpu"``, or a :class:`Device`).

        Raises :class:`~hal.errors.DeviceError` when the device is unknown or unavailable and
        :class:`~hal.errors.CompileError` when its backend cannot compile the model.
        """
        reg = registry()
        target = reg.device(device.id if isinstance(device, Device) else str(device))
        backend = reg.backend(target.backend)
        options = CompileOptions(
            reduced_precision=reduced_precision, cache_dir=str(backend_cache_dir(backend.name)), extra=extra
        )
        try:
            runner = backend.prepare(self.model.proto, target, options)
        except HalError:
            raise
        except Exception as exc:  # a plugin's bug must still reach the caller as a HalError
            msg = f"backend {backend.name} failed to compile for {target.id}: {type(exc).__name__}: {exc}"
            raise CompileError(msg) from exc
        nodes = tuple(n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.model.proto.graph.node))
        return Executable(
            runner, target, self.model.inputs, self.model.outputs, placement=(Placement(target.id, nodes),)
        )


def compile(model: str | os.PathLike[str] | bytes | onnx.ModelProto | Model) -> CompiledModel:  # noqa: A001
    """Compile a model once (loading it safely first if it is a path, bytes or a proto)."""
    return CompiledModel(load(model))
