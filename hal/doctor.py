"""Health checks: ``hal doctor`` runs canary models on each device and records what it measured.

    from hal.doctor import doctor

    for report in doctor(["ort:cpu"], burn_in=20):
        print(report.device, report.health.quarantined, report.health.reason)

Per device, for each canary (the small generated models of :func:`hal.testing.models.zoo`, on
their seeded inputs), placed as ``to(device, strict=True, verify=False)`` would, bypassing the
device's quarantine (a doctor run is how a device leaves it):

- **errors**: a run that raises; a canary the device cannot even prepare counts as one failed run
  (a model the device's declared capabilities refuse is skipped, not held against it);
- **hangs**: each run (and each preparation, 10 times as long) is bounded by
  ``HAL_DOCTOR_TIMEOUT_S`` seconds (default :data:`DEFAULT_TIMEOUT_S`); a run past it is
  abandoned (its thread left behind: Python cannot stop it), the device marked and not run again;
- **finiteness**: a run whose floating outputs hold NaN or infinity where the reference's do not;
- **agreement**: the first good run against the reference (:mod:`hal.verification`: the ONNX
  reference evaluator, or ``ort:cpu``), with the per-type tolerances;
- **determinism**: every good run of the same input must give the same bits as the first;
- **latency jitter**: p90/p50 of each canary's run times; the device's figure is the worst.

Plugins add their own measurements through ``hal_probe_health`` (their probes and failures are
added, a quarantine they report is kept). The result becomes the device's
:class:`~hal.capabilities.Health`, recorded by :func:`hal.health.record` (thresholds there), so
every process sees it; a quarantined device is refused by ``to()`` until a doctor run passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import asdict, evolve, frozen

from hal import health as health_store
from hal._bounds import BoundExceeded, bounded, env_seconds
from hal._plugins import registry
from hal.backend import CompileOptions
from hal.capabilities import Health
from hal.compiled import CompiledModel
from hal.compiled import compile as compile_model
from hal.errors import HalError, InputError, LoweringError
from hal.verification import judge

if TYPE_CHECKING:
    import numpy as np

    from hal.backend import Device

__all__ = ["DEFAULT_BURN_IN", "DEFAULT_TIMEOUT_S", "CanaryResult", "DeviceReport", "canaries", "doctor"]

log = logging.getLogger("hal.doctor")

#: Runs of each canary per device.
DEFAULT_BURN_IN = 10
#: Seconds one run may take before it counts as a hang (``HAL_DOCTOR_TIMEOUT_S``).
DEFAULT_TIMEOUT_S = 10.0

#: ``progress(device, canary, done, total)`` after each canary.
Progress = Callable[[str, str, int, int], None]


@frozen
class CanaryResult:
    """One canary on one device. ``status``: ``ran``, ``skipped`` (the device's capabilities
    refuse the model), ``error`` (it could not be prepared) or ``hung``."""

    model: str
    status: str
    runs: int = 0
    errors: int = 0
    hangs: int = 0
    nonfinite: int = 0
    varied: int = 0  # good runs whose bits differ from the first good run's
    agreement: str = "skipped"  # passed, failed, skipped (no reference, or no good run)
    p50_s: float | None = None
    p90_s: float | None = None
    detail: str | None = None

    @property
    def failures(self) -> int:
        return self.errors + self.hangs + self.nonfinite + (self.agreement == "failed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@frozen
class DeviceReport:
    """A device's doctor result: its new :class:`Health`, each canary, and the reasons it is
    quarantined (empty when healthy). ``status``: ``healthy``, ``quarantined`` or ``unavailable``
    (not checked, nothing recorded)."""

    device: str
    status: str
    health: Health
    canaries: tuple[CanaryResult, ...] = ()
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "status": self.status, "health": asdict(self.health),
            "error_rate": self.health.error_rate, "canaries": [c.to_dict() for c in self.canaries],
            "reasons": list(self.reasons), "seconds": self.seconds,
        }


def canaries() -> dict[str, tuple[CompiledModel, Mapping[str, Any]]]:
    """The canary models, compiled, with their seeded inputs: ``hal.testing.models.zoo()``."""
    from hal.testing.models import zoo

    return {name: (compile_model(proto), feeds) for name, (proto, feeds) in zoo(small=True).items()}


def _nonfinite(outputs: Mapping[str, Any], expected: Mapping[str, Any] | None) -> bool:
    import numpy as np

    for name, value in outputs.items():
        array = np.asarray(value)
        if array.dtype.kind != "f" and "float" not in str(array.dtype):
            continue
        if np.isfinite(array.astype(np.float32)).all():
            continue
        want = None if expected is None else expected.get(name)
        if want is None or np.isfinite(np.asarray(want).astype(np.float32)).all():
            return True
    return False


def _same_bits(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    import numpy as np

    return all(np.asarray(a[n]).tobytes() == np.asarray(b[n]).tobytes() for n in a)


def _canary(
    name: str, compiled: CompiledModel, feeds: Mapping[str, Any], device: Device, burn_in: int, timeout: float
) -> CanaryResult:
    import numpy as np

    backend = registry().backend(device.backend)
    try:
        exe = bounded(
            lambda: compiled._prepare(backend, device, CompileOptions(), False, None),  # noqa: SLF001 - bypasses quarantine on purpose
            10 * timeout, f"hal-doctor-prepare-{device.id}",
        )
    except LoweringError as exc:
        return CanaryResult(name, "skipped", detail=f"the device's capabilities refuse it: {exc}")
    except BoundExceeded:
        return CanaryResult(name, "hung", runs=1, hangs=1, detail=f"preparing it took over {10 * timeout:g} s")
    except HalError as exc:
        return CanaryResult(name, "error", runs=1, errors=1, detail=f"cannot be prepared: {exc}")
    reference = compiled._reference(device.id)  # noqa: SLF001 - the model's own reference
    try:
        expected: tuple[dict[str, np.ndarray], str] | HalError = reference.run(feeds, key="doctor")
    except HalError as exc:
        expected = exc
    want = expected[0] if isinstance(expected, tuple) else None
    runs = errors = nonfinite = varied = 0
    first: dict[str, Any] | None = None
    times: list[float] = []
    details: list[str] = []
    for index in range(burn_in):
        runs += 1
        start = time.perf_counter()
        try:
            outputs = bounded(lambda: exe.run(dict(feeds)), timeout, f"hal-doctor-run-{device.id}")
        except BoundExceeded:
            details.append(f"run {index + 1} did not finish within {timeout:g} s (HAL_DOCTOR_TIMEOUT_S); abandoned")
            return _result(name, "hung", runs, errors, 1, nonfinite, varied, "skipped", times, details)
        except HalError as exc:
            errors += 1
            if len(details) < 3:
                details.append(f"run {index + 1} raised: {exc}")
            continue
        if index or burn_in == 1:  # the first run pays one-time costs: not a latency
            times.append(time.perf_counter() - start)
        if _nonfinite(outputs, want):
            nonfinite += 1
            if len(details) < 3:
                details.append(f"run {index + 1} returned NaN or infinity where the reference does not")
            continue
        if first is None:
            first = outputs
        elif not _same_bits(outputs, first):
            varied += 1
    agreement = "skipped"
    if first is not None:
        answer = first
        report = judge(device.id, lambda _feeds: answer, feeds, reference, compiled.model.outputs, expected=expected)
        agreement = {"passed": "passed", "failed": "failed"}.get(report.status, "skipped")
        if agreement == "failed":
            details.append(report.summary())
    if varied:
        details.append(f"{varied} of {runs} runs of the same input gave different bits from the first")
    return _result(name, "ran", runs, errors, 0, nonfinite, varied, agreement, times, details)


def _result(name: str, status: str, runs: int, errors: int, hangs: int, nonfinite: int, varied: int,
            agreement: str, times: Sequence[float], details: Sequence[str]) -> CanaryResult:
    import numpy as np

    p50 = p90 = None
    if times:
        p50, p90 = (float(v) for v in np.percentile(times, [50, 90]))
    return CanaryResult(name, status, runs, errors, hangs, nonfinite, varied, agreement, p50, p90, "; ".join(details) or None)


def _plugin_health(device: Device) -> list[Health]:
    try:
        found = registry().hooks.probe_health(device)
    except Exception as exc:  # noqa: BLE001 - a plugin's bug: reported, the doctor goes on
        log.warning("hal_probe_health failed for %s: %s: %s", device.id, type(exc).__name__, exc)
        return []
    return [h for h in found if isinstance(h, Health)]


def check(device: Device, *, burn_in: int = DEFAULT_BURN_IN, timeout: float | None = None,
          models: Mapping[str, tuple[CompiledModel, Mapping[str, Any]]] | None = None,
          progress: Progress | None = None) -> DeviceReport:
    """Run the canaries on one device and judge it (see the module docstring); records nothing."""
    timeout = env_seconds("HAL_DOCTOR_TIMEOUT_S", DEFAULT_TIMEOUT_S) if timeout is None else timeout
    start = time.perf_counter()
    if not device.available:
        return DeviceReport(device.id, "unavailable", device.capabilities.stability.health,
                            reasons=(f"unavailable: {device.reason}",))
    caps = device.capabilities
    clean = evolve(device, capabilities=evolve(caps, stability=evolve(caps.stability, health=Health())))
    models = canaries() if models is None else models
    results: list[CanaryResult] = []
    for index, (name, (compiled, feeds)) in enumerate(models.items()):
        result = _canary(name, compiled, feeds, clean, burn_in, timeout)
        results.append(result)
        if progress is not None:
            progress(device.id, name, index + 1, len(models))
        if result.status == "hung":
            break  # a hung device is not run again: its thread may still hold it
    probes = sum(r.runs for r in results)
    failures = sum(r.failures for r in results)
    reasons: list[str] = []
    for r in results:
        if r.hangs:
            reasons.append(f"{r.model}: hung ({r.detail})")
        if r.agreement == "failed":
            reasons.append(f"{r.model}: disagrees with the reference ({r.detail})")
        if r.varied and caps.stability.deterministic is not False:
            reasons.append(f"{r.model}: the same input gave different bits in {r.varied} of {r.runs} runs")
    rate = failures / probes if probes else 0.0
    if rate > health_store.MAX_ERROR_RATE:
        reasons.append(f"{failures} of {probes} canary runs failed (error rate {rate:.1%} > {health_store.MAX_ERROR_RATE:.0%})")
    plugin_quarantined = False
    for extra in _plugin_health(clean):
        probes += extra.probes
        failures += extra.failures
        if extra.quarantined:
            plugin_quarantined = True
            reasons.append(f"a plugin's own probe quarantined it{': ' + extra.reason if extra.reason else ''}")
    good = [r for r in results if r.status == "ran" and r.runs - r.errors - r.nonfinite >= 2]
    deterministic = None if not good else not any(r.varied for r in good)
    jitters = [r.p90_s / r.p50_s for r in results if r.p50_s and r.p90_s]
    quarantined = bool(reasons) or plugin_quarantined
    ran = [r for r in results if r.status != "skipped"]
    summary = (
        "; ".join(reasons) if quarantined
        else f"healthy: {probes} runs of {len(ran)} canaries, {failures} failed, outputs agree"
        + ("" if deterministic is None else (", same bits every run" if deterministic else ", bits vary (declared)"))
    )
    if not ran and not quarantined:
        summary = "no canary could be placed on it (its capabilities refuse every one): nothing measured"
    health = Health(
        probes=probes, failures=failures, deterministic=deterministic,
        latency_jitter=max(jitters) if jitters else None, quarantined=quarantined,
        checked_at=time.time(), reason=summary,
    )
    return DeviceReport(device.id, "quarantined" if quarantined else "healthy", health, tuple(results),
                        tuple(reasons), time.perf_counter() - start)


def doctor(
    devices: Sequence[str] | None = None,
    *,
    burn_in: int = DEFAULT_BURN_IN,
    timeout: float | None = None,
    record: bool = True,
    progress: Progress | None = None,
) -> list[DeviceReport]:
    """Check each device (default: every available one, quarantined ones included) and, with
    ``record``, store each result as the device's health (:func:`hal.health.record`) and give the
    devices of this process their new health."""
    if not isinstance(burn_in, int) or burn_in < 1:
        msg = f"burn_in must be a whole number of runs >= 1, got {burn_in!r}"
        raise InputError(msg)
    reg = registry()
    targets = [reg.device(d, require_available=False) for d in devices] if devices else [d for d in reg.devices() if d.available]
    models = canaries()
    reports = []
    for device in targets:
        report = check(device, burn_in=burn_in, timeout=timeout, models=models, progress=progress)
        if record and report.status != "unavailable":
            health_store.record(device.id, report.health, report.to_dict())
        reports.append(report)
    if record:
        reg.reapply_health()
    return reports
