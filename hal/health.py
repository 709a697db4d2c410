"""Measured health kept between processes: each device's last ``hal doctor`` result.

``hal doctor`` (:mod:`hal.doctor`) measures a device and :func:`record` stores the result as the
device's :class:`~hal.capabilities.Health` in ``<cache root>/health/devices.json``, under a file
lock (``filelock``) so that concurrent doctors leave one valid file; the file itself is replaced
atomically, so readers take no lock. The registry applies it to every device it discovers
(:func:`with_health`), so ``hal.devices()``, ranking and ``to()`` see it.

Thresholds (a device past any of them is quarantined until a doctor run passes again):

- :data:`MAX_ERROR_RATE`: the share of canary runs that raised, returned non-finite outputs where
  the reference has none, or did not finish;
- any run that did not finish within its timeout (a hang);
- any canary whose outputs disagree with the reference beyond its tolerance
  (:mod:`hal.verification`);
- answers that vary between runs of the same input, unless the device declares that they may
  (``Stability.deterministic=False``).

Latency jitter (p90/p50 of the canary runs) is recorded, not judged: the ``stable`` policy ranks
by it.

Health is not part of what a model is lowered for: :func:`without_health` is the capabilities
lowering and selection key their caches by, so a doctor run recompiles nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import asdict, evolve

from hal._paths import cache_root
from hal.capabilities import Capabilities, Health
from hal.errors import HalError

if TYPE_CHECKING:
    from hal.backend import Device

__all__ = [
    "LOCK_TIMEOUT_S",
    "MAX_ERROR_RATE",
    "clear",
    "health_file",
    "quarantine_message",
    "read",
    "record",
    "with_health",
    "without_health",
]

log = logging.getLogger("hal.health")

#: A device whose canary runs fail more often than this is quarantined.
MAX_ERROR_RATE = 0.02
#: Seconds a writer waits for another process's lock before giving up with a HalError.
LOCK_TIMEOUT_S = 30.0
#: Bump when the file's layout changes; a file of another format is read as empty.
_FORMAT = 1


def health_file() -> Path:
    """Where health records live: ``<cache root>/health/devices.json``."""
    return cache_root() / "health" / "devices.json"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("health records %s unreadable (%s); treating every device as not yet checked", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("devices"), dict):
        return {}
    return data["devices"]


def _health(entry: Any) -> Health | None:
    try:
        fields = dict(entry["health"])
        return Health(**{k: v for k, v in fields.items() if k in _HEALTH_FIELDS})
    except (KeyError, TypeError, ValueError):
        return None


_HEALTH_FIELDS = frozenset(a.name for a in Health.__attrs_attrs__)  # type: ignore[attr-defined]


def read() -> dict[str, dict[str, Any]]:
    """Every device's record, by id: ``{"health": {...}, "report": {...}}`` (the report as
    :meth:`hal.doctor.DeviceReport.to_dict` wrote it)."""
    return _read_file(health_file())


def record(device_id: str, health: Health, report: Mapping[str, Any] | None = None) -> None:
    """Store ``health`` (and the doctor's ``report``) for ``device_id``, replacing its last record.

    Read-modify-write under a file lock: another process recording another device at the same
    time keeps its record. Raises :class:`~hal.errors.HalError` naming the file when the lock is
    not had within :data:`LOCK_TIMEOUT_S` or the file cannot be written.
    """
    from filelock import FileLock, Timeout

    from hal.cache import atomic_write

    path = health_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            devices = _read_file(path)
            devices[device_id] = {"health": asdict(health), "report": dict(report or {})}
            text = json.dumps({"format": _FORMAT, "devices": devices}, indent=1, sort_keys=True)
            atomic_write(path, text.encode())
    except Timeout:
        msg = f"cannot record the health of {device_id}: {path}.lock held by another process for {LOCK_TIMEOUT_S:g} s; try again"
        raise HalError(msg) from None
    except OSError as exc:
        msg = f"cannot record the health of {device_id} in {path}: {exc.strerror or exc}; set HAL_CACHE_DIR to a writable directory"
        raise HalError(msg) from None


def clear(device_id: str | None = None) -> None:
    """Forget one device's record, or every record."""
    from filelock import FileLock

    from hal.cache import atomic_write

    path = health_file()
    if not path.exists():
        return
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        devices = {} if device_id is None else _read_file(path)
        devices.pop(device_id or "", None)
        atomic_write(path, json.dumps({"format": _FORMAT, "devices": devices}, indent=1, sort_keys=True).encode())


def with_health(devices: Iterable[Device]) -> list[Device]:
    """``devices``, each with its recorded health as ``capabilities.stability.health`` (one read
    of the file for all). A device with no record keeps what discovery gave it."""
    devices = list(devices)
    if not devices:
        return devices
    records = read()
    out = []
    for device in devices:
        health = _health(records[device.id]) if device.id in records else None
        if health is None or health == device.capabilities.stability.health:
            out.append(device)
            continue
        caps = device.capabilities
        out.append(evolve(device, capabilities=evolve(caps, stability=evolve(caps.stability, health=health))))
    return out


def without_health(caps: Capabilities) -> Capabilities:
    """``caps`` with health left out (as never measured): what lowering, verification and
    selection key their caches by."""
    if caps.stability.health == Health():
        return caps
    return evolve(caps, stability=evolve(caps.stability, health=Health()))


def quarantine_message(device: Device) -> str:
    """Why ``device`` is refused, naming its last doctor result and how to test it again."""
    health = device.capabilities.stability.health
    when = (
        time.strftime(" on %Y-%m-%d %H:%M:%S", time.localtime(health.checked_at))
        if health.checked_at is not None else ""
    )
    why = health.reason or f"{health.failures} of {health.probes} probes failed"
    return (
        f"{device.id} is quarantined: its last health check{when} failed ({why}); "
        f"run `hal doctor --device {device.id}` to test it again (a passing run lifts the quarantine), "
        "or choose another device"
    )
