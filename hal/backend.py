"""What a plugin implements: a :class:`Backend` that finds :class:`Device` records and prepares
models for them, returning a :class:`Runner`. Plugins import these from :mod:`hal.plugin`.

A plugin module stays cheap to import: import the vendor runtime inside :meth:`Backend.discover`
and :meth:`Backend.prepare`, never at module level, so ``hal devices`` does not pay for runtimes
it is not asked about.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from attrs import define, field, frozen

from hal.capabilities import Capabilities, DeviceKind, _jsonable
from hal.errors import CompileError

if TYPE_CHECKING:
    import numpy as np

    from hal.lowering import LoweredModel

__all__ = ["Backend", "CompileOptions", "Device", "Runner"]

H = TypeVar("H")

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

    ``handle`` is the backend's own: whatever its :meth:`Backend.prepare` needs to find the device
    again (an ordinal, a driver name, a record of the runtime's properties), so no backend parses
    ids or reads ``details`` back. The host never looks at it; it is left out of equality,
    hashing, ``repr`` and :meth:`to_dict` (a device read back with :meth:`from_dict` has none).
    Read it with :meth:`Backend.handle_of`.
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
    handle: Any = field(default=None, eq=False, hash=False, repr=False)

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
        out = {a.name: _jsonable(getattr(self, a.name)) for a in type(self).__attrs_attrs__ if a.name != "handle"}
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
    keep artifacts of its own (OpenVINO's model cache, IREE's vmfb), set by the core. ``extra``:
    backend-specific options (``compiled.to(device, **extra)``), documented by each plugin. The
    model's digest is not an option: it travels in the :class:`~hal.lowering.LoweredModel`.
    """

    reduced_precision: bool = False
    cache_dir: str | None = None
    extra: Mapping[str, Any] = field(factory=dict)


class Runner(Protocol):
    """A model prepared for one device. Returned by :meth:`Backend.prepare`.

    ``run`` receives feeds already checked by the core against the model's inputs (names,
    element types as numpy/ml_dtypes dtypes, ranks, static dimensions) and returns one array per
    requested output, in order, each with the output's declared element type; the core checks
    that too. It is the hot path: do no per-call work that can be done once.

    Feeds may be read-only, strided, Fortran-ordered, broadcast or memory-mapped, and the caller
    may drop them as soon as ``run`` returns: copy what the runtime keeps. Outputs belong to the
    caller: never return a buffer the runtime writes again. ``run`` may be called from many
    threads at once.

    A device that declares sequences or optionals (``Capabilities.io_kinds``) gets a list of
    arrays for a sequence feed and None for an absent optional, and returns them alike: a list
    of arrays for a sequence output, None for an absent optional.
    """

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> Sequence[np.ndarray]: ...


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
        """Return every device this backend knows of, available or not (with the reason).

        Never raise for something missing on this machine: a device that cannot run here is
        listed with ``available=False`` and a ``reason`` saying what is missing and what to do.
        When nothing can be seen at all (no runtime, no driver), list the one device a user would
        name first, unavailable (:meth:`unavailable`). Raising is for bugs; the host reports it
        under the plugin's name."""

    @abc.abstractmethod
    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> Runner:
        """Compile ``model`` for ``device`` and return a :class:`Runner`.

        ``model.proto`` keeps external data external (checked; bytes in ``model.weights``, or
        ``model.self_contained()`` for one protobuf up to 2 GiB), its opsets already
        converted into the device's declared range and its element types legalized for the
        device's declared formats; ``model.inputs``, ``model.outputs`` and ``model.digest`` say
        what the core knows, so do not read them from the graph again. Raise
        :class:`hal.errors.CompileError` with the runtime's reason when it cannot be compiled.
        Never fall back to another device silently.
        """

    # -- helpers for subclasses ------------------------------------------------------------------

    def unavailable(
        self, reason: str, *, vendor: str, kind: DeviceKind | str, name: str | None = None, local_id: str = "0"
    ) -> Device:
        """The one device listed when nothing can be seen (no runtime, no driver, no hardware):
        ``<name>:<local_id>`` (``cuda:0``; pass ``local_id="CPU"`` where devices are named, not
        numbered), unavailable with ``reason``, declaring no capabilities. Asking for it then
        answers with the reason instead of "unknown device"."""
        return Device(
            id=f"{self.name}:{local_id}",
            backend=self.name,
            vendor=vendor,
            name=name or f"no {vendor} device found",
            kind=DeviceKind(kind),
            available=False,
            reason=reason,
        )

    def handle_of(self, device: Device, kind: type[H]) -> H:
        """``device.handle``, which this backend's :meth:`discover` set, checked to be a ``kind``.

        Raises :class:`~hal.errors.CompileError` for a device record this backend did not discover
        in this process (built by hand, or read back with :meth:`Device.from_dict`)."""
        handle = device.handle
        if not isinstance(handle, kind):
            msg = (
                f"device {device.id} has no {kind.__name__} handle from backend {self.name!r} "
                f"(got {type(handle).__name__}): use the device record hal.devices() lists in this process"
            )
            raise CompileError(msg)
        return handle

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

