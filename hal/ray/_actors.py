"""What runs on a fleet's nodes: plain classes that :mod:`hal.ray._fleet` turns into Ray actors.

They are plain classes (``ray.remote`` is applied where an actor is created) so that they can be
read and tested without a cluster; each imports the HAL inside the node's own process, with the
node's own plugins, environment and compile cache.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DeviceWorker", "NodeProbe"]


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def opened(model: Any) -> Any:
    """A :class:`hal.CompiledModel` from a :class:`~hal.ray.Shipment` or a model's bytes."""
    from hal.ray._fleet import Shipment

    if isinstance(model, Shipment):
        return model.open()
    import hal

    return hal.compile(model)


class NodeProbe:
    """A small actor pinned to one node: lists the HAL's devices there."""

    def devices(self) -> dict[str, Any]:
        import hal

        return {
            "node": _node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "hal": hal.__version__,
            "devices": [d.to_dict() for d in hal.devices()],
        }


class DeviceWorker:
    """One device of a fleet: the compiled model lowered, verified and prepared on that device.

    ``model`` is the compiled model as :func:`hal.ray.ship` packs it (or its bytes), shipped
    once through the object store; ``device`` the device id on this node; ``options`` go to
    ``compiled.to(device, strict=True, **options)``. When Ray restarts the actor (its process or
    its node died) the constructor runs again on the node Ray chose, which must have the device.
    """

    def __init__(self, model: bytes, device: str, options: Mapping[str, Any]) -> None:
        self.compiled = opened(model)
        self.exe = self.compiled.to(device, strict=True, **dict(options))
        self.device = device
        self.node = _node_id()
        self._lock = threading.Lock()
        self._served = 0
        self._recent: deque[int] = deque(maxlen=4096)  # request ids answered, for diagnosis

    def describe(self) -> dict[str, Any]:
        """Where the actor runs and what placing the model there did."""
        report = self.exe.verification
        return {
            "node": self.node,
            "pid": os.getpid(),
            "device": self.exe.device.to_dict(),
            "lowering": [s.to_dict() for s in self.exe.lowering],
            "placement": [p.to_dict() for p in self.exe.placement],
            "verified": None if report is None else report.summary(),
        }

    def run(self, request: int, feeds: Mapping[str, Any], names: Sequence[str]) -> tuple[int, list[Any]]:
        """``(request, outputs in the order of names)``: the request id comes back with its answer."""
        outputs = self.exe.run(feeds, names)
        with self._lock:
            self._served += 1
            self._recent.append(request)
        return request, [outputs[n] for n in names]

    def served(self) -> tuple[int, list[int]]:
        """How many requests this process answered, and the ids of the latest."""
        with self._lock:
            return self._served, list(self._recent)

    def check_health(self, burn_in: int = 2) -> dict[str, Any]:
        """The HAL's canary check (:func:`hal.doctor.check`) on this device with the served model
        as the canary: errors, hangs, non-finite outputs, agreement with the reference and
        determinism. Records nothing."""
        from hal.doctor import check
        from hal.verification import seeded_feeds

        feeds = seeded_feeds(self.compiled.inputs)
        report = check(self.exe.device, burn_in=burn_in, models={self.compiled.model.name: (self.compiled, feeds)})
        return {"status": report.status, "reasons": list(report.reasons), "node": self.node}
