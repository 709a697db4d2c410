"""Injected faults and pacing: the runner a simulated device hands the core.

Which fault request ``k`` of device ``d`` gets is a pure function of ``(seed, d, k)``
(:func:`fault_for`): ``numpy.random.default_rng((seed, stable_hash(d), k))`` draws one number, and
the configured rates cut ``[0, 1)`` into error, hang, nan, slow, crash and none, in that order. Requests
are numbered under a lock per device, so the same seed gives the same faults on the same sequence
of requests in any process and from any number of threads. ``die_after=N`` is not drawn: runs
``N + 1`` onwards raise, and the device stays dead (its later ``prepare`` raises
:class:`~hal.plugin.UnavailableDeviceError`).

What each fault does to a run:

``error``  raises :class:`~hal.plugin.RunError` naming the injected fault and the request number.
``hang``   blocks for ``hang_s`` seconds (default 3600: longer than any deadline should allow), then
           raises RunError as a driver watchdog would; a deadline above it is what is being tested.
``nan``    runs, then returns every floating output filled with NaN (formats without a NaN, such as
           float4_e2m1, and non-float outputs are returned as computed).
``slow``   runs, then sleeps so the run takes ``slow_factor`` (default 10) times as long.
``crash``  ends the process at once (``os._exit(70)``), as a segfaulting driver would: meant for a
           device run isolated (``to(device, isolate=True)``), whose worker process it ends.

Pacing (``HAL_SIM_PACE=1``): a run that finishes before its roofline estimate
(:func:`hal.plugin.estimate` for the model as lowered for the device, on the feeds' shapes) sleeps
for the rest, so selection and failover see the simulated chip's speed. Estimates are kept per
set of feed shapes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from hal.plugin import Capabilities, Estimate, HalError, LoweredModel, NumberFormat, RunError, estimate
from hal_sim.settings import FaultSpec

__all__ = ["DeviceState", "SimRunner", "fault_for", "stable_hash"]

log = logging.getLogger("hal_sim")

ERROR, HANG, NAN, SLOW, CRASH, DIE = "error", "hang", "nan", "slow", "crash", "die"
#: The exit status of a process a ``crash`` fault ends.
CRASH_STATUS = 70

#: Float formats with no NaN encoding: a nan fault leaves them as computed.
_NO_NAN = frozenset({NumberFormat.FLOAT4_E2M1, NumberFormat.FLOAT6_E2M3, NumberFormat.FLOAT6_E3M2})


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def fault_for(seed: int, device_id: str, request: int, spec: FaultSpec) -> str | None:
    """The fault request number ``request`` (from 0) of ``device_id`` gets: ``"error"``,
    ``"hang"``, ``"nan"``, ``"slow"``, ``"crash"``, ``"die"`` or None. Pure: the same arguments, the same answer."""
    if spec.die_after is not None and request >= spec.die_after:
        return DIE
    if not (spec.error or spec.hang or spec.nan or spec.slow or spec.crash):
        return None
    u = float(np.random.default_rng((seed, stable_hash(device_id), request)).random())
    edge = 0.0
    for name in (ERROR, HANG, NAN, SLOW, CRASH):  # crash last: adding it moved no other fault
        edge += getattr(spec, name)
        if u < edge:
            return name
    return None


class DeviceState:
    """What one simulated device remembers across its executables: how many requests it has had
    and whether it has died."""

    def __init__(self, device_id: str, faults: FaultSpec | None, seed: int) -> None:
        self.device_id = device_id
        self.faults = faults
        self.seed = seed
        self.requests = 0
        self.dead = False
        self._lock = threading.Lock()

    def next_fault(self) -> tuple[int, str | None]:
        """Number the next request and say which fault it gets."""
        with self._lock:
            request = self.requests
            self.requests += 1
        if self.faults is None:
            return request, None
        fault = fault_for(self.seed, self.device_id, request, self.faults)
        if fault == DIE:
            self.dead = True
        return request, fault


class SimRunner:
    """Runs the onnxruntime runner of an emulated model, with the device's faults and pacing."""

    def __init__(
        self,
        inner: Any,
        model: LoweredModel,
        capabilities: Capabilities,
        state: DeviceState,
        *,
        pace: bool,
    ) -> None:
        self.inner = inner
        self.state = state
        self.pace = pace
        self._model = model
        self._capabilities = capabilities
        self._estimates: dict[tuple[Any, ...], float] = {}
        self._estimate_lock = threading.Lock()
        self._nan_outputs = {
            o.name for o in model.outputs if o.format.is_float and o.format not in _NO_NAN
        }
        self._paced_warning = False

    def estimate_seconds(self, feeds: dict[str, Any]) -> float:
        """The roofline estimate for these feeds' shapes, computed once per set of shapes (0 when
        the device declares no figure to estimate from)."""
        key = tuple(sorted((name, _shape(value)) for name, value in feeds.items()))
        seconds = self._estimates.get(key)
        if seconds is None:
            shapes = {name: shape for name, shape in key if shape is not None}
            try:
                result: Estimate = estimate(self._model, self._capabilities, shapes=shapes)
                seconds = float(result.seconds)
            except HalError as exc:  # no peak, no bandwidth: nothing to pace to
                if not self._paced_warning:
                    log.warning("%s: HAL_SIM_PACE is set but runs are not paced: %s", self.state.device_id, exc)
                    self._paced_warning = True
                seconds = 0.0
            with self._estimate_lock:
                self._estimates[key] = seconds
        return seconds

    def run(self, feeds: dict[str, Any], output_names: Sequence[str]) -> list[Any]:
        state = self.state
        start = time.monotonic()
        request, fault = state.next_fault()
        if fault == DIE:  # every request from die_after on: the device stays dead
            raise RunError(self._died())
        if fault == CRASH:
            log.critical("%s: injected fault 'crash' at request %d: the process exits", state.device_id, request)
            os._exit(CRASH_STATUS)
        if fault == ERROR:
            msg = f"{state.device_id}: injected fault 'error' at request {request} (HAL_SIM_FAULTS, seed {state.seed})"
            raise RunError(msg)
        if fault == HANG:
            hang_s = state.faults.hang_s if state.faults else 0.0
            time.sleep(hang_s)
            msg = (
                f"{state.device_id}: injected fault 'hang' at request {request}: no answer within "
                f"{hang_s:g} s (HAL_SIM_FAULTS, seed {state.seed})"
            )
            raise RunError(msg)
        outputs = list(self.inner.run(feeds, output_names))
        if self.pace:
            remaining = self.estimate_seconds(feeds) - (time.monotonic() - start)
            if remaining > 0:
                time.sleep(remaining)
        if fault == SLOW:
            factor = state.faults.slow_factor if state.faults else 1.0
            time.sleep((factor - 1.0) * (time.monotonic() - start))
        if fault == NAN:
            outputs = [
                _nan_like(value) if name in self._nan_outputs else value for name, value in zip(output_names, outputs)
            ]
        return outputs

    def _died(self) -> str:
        spec = self.state.faults
        after = spec.die_after if spec is not None else 0
        return (
            f"{self.state.device_id}: device died (injected fault die_after={after}: it stays dead; "
            "HAL_SIM_FAULTS, reload the plugins to revive it)"
        )


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _nan_like(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):  # a sequence output
        return [_nan_like(v) for v in value]
    return np.full(value.shape, np.nan, dtype=np.float32).astype(value.dtype)
