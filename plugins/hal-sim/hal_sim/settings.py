"""The environment variables hal-sim reads, parsed and checked (README.md documents them).

All are read when the backend discovers its devices (a new process, or
``hal.plugin.reload_plugins()``), so every device of one discovery sees one configuration.

``HAL_SIM_DEVICES``  ``h100,ascend-910c:2``: the simulated devices, ``profile[:count]``.
``HAL_SIM_PROFILES`` directories of a user's own profiles (:mod:`hal_sim.profile`).
``HAL_SIM_FAULTS``   ``ascend-910c:error=0.05,hang=0.01;h100:die_after=300``: injected faults.
``HAL_SIM_SEED``     an integer (default 0) every injected fault derives from.
``HAL_SIM_PACE``     ``1``: a run takes at least its roofline estimate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from attrs import evolve, frozen

from hal.plugin import SettingError

__all__ = [
    "DEVICES_VARIABLE",
    "FAULTS_VARIABLE",
    "PACE_VARIABLE",
    "SEED_VARIABLE",
    "DeviceRequest",
    "FaultSpec",
    "SimSettingError",
    "faults_for",
    "parse_devices",
    "parse_faults",
    "read_pace",
    "read_seed",
]

DEVICES_VARIABLE = "HAL_SIM_DEVICES"
FAULTS_VARIABLE = "HAL_SIM_FAULTS"
SEED_VARIABLE = "HAL_SIM_SEED"
PACE_VARIABLE = "HAL_SIM_PACE"

#: At most this many devices per profile (the host takes at most 1024 per backend).
MAX_COUNT = 64

_FAULT_SYNTAX = (
    "write KEY:FAULT=VALUE,...;KEY:...  where KEY is a profile name (ascend-910c) or a device id "
    "(sim:h100:1) and FAULT is error, hang, nan, slow or crash (a probability per run, together at most 1), "
    "die_after (runs before the device dies), hang_s (seconds a hang blocks, default 3600) or "
    "slow_factor (how many times longer a slow run takes, default 10); "
    'e.g. HAL_SIM_FAULTS="ascend-910c:error=0.05,hang=0.01;h100:die_after=300"'
)
_DEVICE_SYNTAX = "write PROFILE[:COUNT],... such as HAL_SIM_DEVICES=h100,ascend-910c:2"
_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)*$")


class SimSettingError(SettingError):
    """A hal-sim environment variable has a value it cannot use; the message names the variable,
    the bad part, the syntax and an example."""


@frozen
class DeviceRequest:
    """One entry of ``HAL_SIM_DEVICES``: a profile name and how many devices of it; ``problem``
    says why the entry cannot be used (its devices are then listed unavailable with it)."""

    profile: str
    count: int
    problem: str | None = None


def parse_devices(raw: str) -> list[DeviceRequest]:
    """``HAL_SIM_DEVICES`` as requests, in order. Never raises: an entry that cannot be read
    becomes a request with its ``problem`` (one device, named as nearly as the entry allows)."""
    requests: list[DeviceRequest] = []
    seen: set[str] = set()
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, count_text = part.partition(":")
        name = name.strip()
        safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "unnamed"
        if not name or not _KEY.match(name):
            requests.append(DeviceRequest(safe, 1, f"{DEVICES_VARIABLE} entry {part!r} has no profile name; {_DEVICE_SYNTAX}"))
            continue
        count = 1
        if sep:
            text = count_text.strip()
            if not text.isdigit() or not 1 <= int(text) <= MAX_COUNT:
                problem = (
                    f"{DEVICES_VARIABLE} entry {part!r}: the count {count_text!r} is not a whole number from 1 to "
                    f"{MAX_COUNT}; {_DEVICE_SYNTAX}"
                )
                requests.append(DeviceRequest(name, 1, problem))
                continue
            count = int(text)
        if name in seen:
            problem = f"{DEVICES_VARIABLE} names {name!r} twice; name each profile once with its count; {_DEVICE_SYNTAX}"
            requests = [r if r.profile != name else evolve(r, problem=problem) for r in requests]
            continue
        seen.add(name)
        requests.append(DeviceRequest(name, count))
    return requests


@frozen
class FaultSpec:
    """What to inject into one device's runs. Rates are probabilities per run and exclusive: a
    run gets at most one of error, hang, nan, slow, crash."""

    error: float = 0.0
    hang: float = 0.0
    nan: float = 0.0
    slow: float = 0.0
    crash: float = 0.0
    die_after: int | None = None
    hang_s: float = 3600.0
    slow_factor: float = 10.0

    @property
    def any(self) -> bool:
        return bool(self.error or self.hang or self.nan or self.slow or self.crash) or self.die_after is not None

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k):g}" for k in ("error", "hang", "nan", "slow", "crash") if getattr(self, k)]
        if self.hang:
            parts.append(f"hang_s={self.hang_s:g}")
        if self.slow:
            parts.append(f"slow_factor={self.slow_factor:g}")
        if self.die_after is not None:
            parts.append(f"die_after={self.die_after}")
        return ",".join(parts) or "none"


_RATES = ("error", "hang", "nan", "slow", "crash")
_FAULT_KEYS = (*_RATES, "die_after", "hang_s", "slow_factor")


def parse_faults(raw: str) -> dict[str, dict[str, float | int]]:
    """``HAL_SIM_FAULTS`` as ``{key: {fault: value}}`` (keys are profile names or device ids).
    Raises :class:`SimSettingError` naming the bad part and the syntax."""

    def bad(part: str, problem: str) -> SimSettingError:
        return SimSettingError(f"{FAULTS_VARIABLE}: {part!r} {problem}; {_FAULT_SYNTAX}")

    out: dict[str, dict[str, float | int]] = {}
    for entry in (e.strip() for e in raw.split(";")):
        if not entry:
            continue
        key, sep, params = entry.rpartition(":")
        key = key.strip()
        if not sep or not key or not _KEY.match(key):
            raise bad(entry, "does not start with a profile name or device id and ':'")
        if key in out:
            raise bad(entry, f"names {key!r} a second time (give each key one entry)")
        values: dict[str, float | int] = {}
        for item in (i.strip() for i in params.split(",")):
            if not item:
                continue
            name, eq, text = (s.strip() for s in item.partition("="))
            if not eq or name not in _FAULT_KEYS:
                raise bad(item, f"is not FAULT=VALUE with FAULT one of {', '.join(_FAULT_KEYS)}")
            if name in values:
                raise bad(item, f"sets {name} twice for {key!r}")
            try:
                number = int(text) if name == "die_after" else float(text)
            except ValueError:
                kind = "a whole number" if name == "die_after" else "a number"
                raise bad(item, f"has {text!r} where {kind} belongs") from None
            if name in _RATES and not 0.0 <= number <= 1.0:
                raise bad(item, "is not a probability from 0 to 1")
            if name == "die_after" and number < 0:
                raise bad(item, "is negative (die_after=0 dies at the first run)")
            if name == "hang_s" and not number > 0:
                raise bad(item, "is not a positive number of seconds")
            if name == "slow_factor" and not number >= 1:
                raise bad(item, "is below 1 (a slow run takes slow_factor times as long)")
            values[name] = number
        if not values:
            raise bad(entry, "names no fault")
        out[key] = values
    for key, values in out.items():
        total = sum(float(values.get(r, 0.0)) for r in _RATES)
        if total > 1.0 + 1e-12:
            raise bad(key, f"has error+hang+nan+slow+crash = {total:g}, more than 1 (each run gets at most one fault)")
    return out


def faults_for(parsed: Mapping[str, Mapping[str, float | int]], profile: str, device_id: str) -> FaultSpec | None:
    """The faults of one device: its profile's entry, overridden key by key by its device id's.
    None when neither names it. Raises :class:`SimSettingError` when the merged rates exceed 1."""
    merged: dict[str, float | int] = {**parsed.get(profile, {}), **parsed.get(device_id, {})}
    if not merged:
        return None
    total = sum(float(merged.get(r, 0.0)) for r in _RATES)
    if total > 1.0 + 1e-12:
        msg = (
            f"{FAULTS_VARIABLE}: the entries for {profile!r} and {device_id!r} together give {device_id} "
            f"error+hang+nan+slow+crash = {total:g}, more than 1; lower the rates. {_FAULT_SYNTAX}"
        )
        raise SimSettingError(msg)
    return FaultSpec(**merged)  # type: ignore[arg-type]


def read_seed() -> int:
    raw = os.environ.get(SEED_VARIABLE, "").strip()
    if not raw:
        return 0
    try:
        seed = int(raw)
    except ValueError:
        seed = -1
    if seed < 0:
        msg = f"{SEED_VARIABLE}={raw!r} is not a whole number >= 0; write e.g. {SEED_VARIABLE}=42 (default 0)"
        raise SimSettingError(msg)
    return seed


def read_pace() -> bool:
    raw = os.environ.get(PACE_VARIABLE, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    msg = f"{PACE_VARIABLE}={raw!r} is not 1 or 0; write {PACE_VARIABLE}=1 to pace runs to their estimate"
    raise SimSettingError(msg)
