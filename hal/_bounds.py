"""Bounds on time: seconds read from the environment, and calls that cannot hang the caller.

One place for what plugin loading, device discovery, health checks, verification and selection
all need: a ``HAL_*`` setting in seconds checked as it is read (a :class:`SettingError` naming the
variable), and a call waited for on a daemon thread for at most so long.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any

from hal.errors import SettingError

__all__ = ["BoundExceeded", "bounded", "env_seconds"]


def env_seconds(name: str, default: float, *, zero: str | None = None) -> float:
    """A finite number of seconds from the environment variable ``name`` (``default`` when unset
    or blank), or a :class:`SettingError` naming it. Positive only, unless ``zero`` says what 0
    means (``"turns the evaluator off"``): then 0 is accepted too."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (zero is not None and value == 0))):
        what = "a number of seconds >= 0" if zero is not None else "a positive number of seconds"
        also = f" (0 {zero})" if zero is not None else ""
        msg = f"{name}={raw!r} is not {what}; set it to e.g. {default:g}{also}, or unset it"
        raise SettingError(msg)
    return value


class BoundExceeded(Exception):
    """A :func:`bounded` call did not finish in time (its thread is left behind)."""


def bounded(fn: Callable[[], Any], seconds: float, name: str) -> Any:
    """``fn()`` on a daemon thread, waited for at most ``seconds``: its result, or its exception
    raised here, or :class:`BoundExceeded`. A call that hangs (a plugin's import, a device's run)
    cannot hang the caller; Python cannot stop the thread, which is left behind, idle or not."""
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise BoundExceeded
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
