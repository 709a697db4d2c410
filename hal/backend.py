"""What a plugin implements: a :class:`Backend` that finds :class:`Device` records and prepares
models for them, returning a :class:`Runner`.

A plugin module stays cheap to import: import the vendor runtime inside :meth:`Backend.discover`
and :meth:`Backend.prepare`, never at module level, so ``hal devices`` does not pay for runtimes
it is not asked about.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field, frozen

from hal.capabilities import Capabilities, DeviceKind, _jsonable

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = ["Backend", "CompileOptions", "Device", "Runner"]

_ID = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)+$")


def _details(value: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    if isinstance(value, tuple):
        return value
    return tuple(sorted((str(k), str(v)) for k, v in (value or {}).items()))


@frozen
class Device:
    """One device a backend can run models on.

    ``id`` is ``"<backend>:<name>"`` (``ort:cpu``, ``openvino:CPU``, ``cuda:0``,
    ``sim:ascend-910c:0``). ``available`` is False, with ``reason`` saying why and what to do,
    when the device is known but cannot run anything here (no driver, no toolkit).
    """

    id: str = field()
    backend: str
    vendor: str
    name: str
    kind: DeviceKind = field(converter=DeviceKind)
    capabilities: Capabilities = field(factory=Capabilities)
    available: bool = True
    reason: str | None = None
    details: tuple[tuple[str, str], ...] = field(default=(), converter=_details)

    @id.validator
    def _check_id(self, _attribute: Any, value: str) -> None:
        if not isinstance(value, str) or not _ID.match(value):
            msg = f"device id {value!r} must look like 'backend:name' (letters, digits, '.', '_', '-')"
            raise ValueError(msg)

    def __attrs_post_init__(self) -> None:
        if not self.available and not self.reason:
            msg = f"device {self.id} is unavailable but gives no reason; say why and what to do"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        out = _jsonable(self)
        out["details"] = dict(self.details)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Device:
        data = dict(data)
        data["capabilities"] = Capabilities.from_dict(data.get("capabilities") or {})
        return cls(**data)


@define(kw_only=True)
class CompileOptions:
    """Options a caller passes through to a backend's :meth:`Backend.prepare`.

    ``reduced_precision``: allow the backend to compute in a narrower type than the model
    declares (OpenVINO's bf16 on AMX CPUs); off by default. ``cache_dir``: where the backend may
    keep artifacts of its own (OpenVINO's model cache, IREE's vmfb). ``model_digest``: the sha256
    (hex) of ``model.SerializeToString(deterministic=True)``, set by the core, so a backend can name
    its artifacts by the model without serializing and hashing it again. ``extra``:
    backend-specific options, documented by each plugin.
    """

    reduced_precision: bool = False
    cache_dir: str | None = None
    model_digest: str | None = None
    extra: Mapping[str, Any] = field(factory=dict)


class Runner(Protocol):
    """A model prepared for one device. Returned by :meth:`Backend.prepare`.

    ``run`` receives feeds already checked by the core against the model's inputs (names,
    element types as numpy/ml_dtypes dtypes, ranks, static dimensions) and returns one array per
    requested output, in order. It is the hot path: do no per-call work that can be done once.
    """

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]: ...


class Backend(abc.ABC):
    """A vendor runtime as the HAL sees it. Register an instance from ``hal_register_backends``.

    Subclasses set :attr:`name` (unique, the device-id prefix) and implement :meth:`discover` and
    :meth:`prepare`.
    """

    #: Unique backend name; device ids start with it (``"ort"`` -> ``"ort:cpu"``).
    name: str = ""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """The runtime's version (and the plugin's, where its code changes what is compiled):
        part of every compile-cache key, so a new runtime never reuses an old artifact.
        Required; a property may import the runtime lazily, or a class attribute may give it."""

    @abc.abstractmethod
    def discover(self) -> Iterable[Device]:
        """Return every device this backend knows of, available or not (with the reason)."""

    @abc.abstractmethod
    def prepare(self, model: onnx.ModelProto, device: Device, options: CompileOptions) -> Runner:
        """Compile ``model`` for ``device`` and return a :class:`Runner`.

        The model is self-contained (external data already loaded and checked). Raise
        :class:`hal.errors.CompileError` with the runtime's reason when it cannot be compiled.
        Never fall back to another device silently.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

