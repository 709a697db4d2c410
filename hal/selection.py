"""Choosing a device by measurement, and admitting reduced precision by checking it.

``compiled.to("auto", policy="fastest")`` measures the model on each candidate — the available
devices that can run it after lowering and pass verification — and places it on the fastest:

- every candidate is prepared as ``to(device)`` would (verified, with the caller's options), run
  twice untimed, then timed round-robin (per round, each device runs once untimed — the device
  before may leave its thread pool spinning — then :data:`RUNS_PER_ROUND` timed runs, so that a
  change of the machine's load falls on every device alike) for up to :data:`MAX_RUNS` rounds while the rounds
  took under ``HAL_SELECT_BUDGET_S`` seconds (default :data:`DEFAULT_BUDGET_S`; at least one
  round); after :data:`ELIMINATE_AFTER` rounds a device whose quickest run is over
  :data:`ELIMINATE_ABOVE` times the best median so far is timed no more; each device's figure is the median of its runs on seeded
  inputs (or ``example=``);
- a device that cannot be prepared, fails verification or fails while timed is not a candidate;
- the order is remembered in the cache directory (``selection/``, integrity-checked, written
  atomically), keyed by the model's digest, every candidate's id, backend, backend version and
  capabilities (health left out), the precision asked for and the backend options: a warm
  ``to("auto")`` reads it (once per process) and measures nothing; a new device, a changed
  version or changed capabilities measure again.

``precision="relaxed", rtol=R`` (any target): each device is first prepared with
``reduced_precision=True`` (OpenVINO computes fp32 in bf16 on CPUs that have it); that variant
is kept only when its outputs on seeded inputs match the reference within ``rtol`` (the
per-type reduced-precision tolerance when ``rtol`` is None); otherwise the exact variant is
prepared. The verdict is cached like placement verification's.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import evolve, frozen

from hal._bounds import env_seconds
from hal._plugins import registry
from hal.cache import CompileCache, cache_key
from hal.errors import HalError, InputError
from hal.health import without_health
from hal.lowering import LoweringStep, StepKind
from hal.verification import judge, positive_inputs, seeded_feeds

if TYPE_CHECKING:
    from hal.backend import Backend, CompileOptions, Device
    from hal.compiled import CompiledModel
    from hal.executable import Executable

__all__ = ["DEFAULT_BUDGET_S", "MAX_RUNS", "PRECISIONS", "Measurement", "Selection", "budget", "remembered"]

log = logging.getLogger("hal.selection")

#: Seconds the timed rounds of ``fastest`` may take together (``HAL_SELECT_BUDGET_S``).
DEFAULT_BUDGET_S = 3.0
#: Timed runs per device at most.
MAX_RUNS = 15
#: After this many rounds, a device whose median is over ELIMINATE_ABOVE times the best's is
#: timed no more, so the rest of the budget separates the contenders.
ELIMINATE_AFTER = 2
ELIMINATE_ABOVE = 1.5
#: Untimed runs per device before timing.
WARMUP_RUNS = 2
#: Timed runs of one device in a row per round (after one untimed run when devices alternate).
RUNS_PER_ROUND = 2
#: ``precision=`` values ``to()`` takes.
PRECISIONS = ("exact", "relaxed")
#: Bump when what a remembered selection means changes.
_FORMAT = 1


def budget() -> float:
    """``HAL_SELECT_BUDGET_S``, checked."""
    return env_seconds("HAL_SELECT_BUDGET_S", DEFAULT_BUDGET_S, zero="measures nothing")


@frozen
class Measurement:
    """One candidate measured by ``fastest``: the median wall time of ``exe.run`` over ``runs``
    runs (``p50_s``), or why it is not a candidate (``problem``)."""

    device: str
    p50_s: float | None = None
    runs: int = 0
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "p50_s": self.p50_s, "runs": self.runs, "problem": self.problem}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        p50 = data.get("p50_s")
        return cls(str(data["device"]), None if p50 is None else float(p50), int(data.get("runs", 0)), data.get("problem"))


@frozen
class Selection:
    """What ``fastest`` chose: the devices in order (fastest first; those with a problem left
    out), each one's measurement, when it was measured."""

    order: tuple[str, ...]
    measurements: tuple[Measurement, ...]
    measured_at: float
    budget_s: float

    def measurement(self, device: str) -> Measurement | None:
        return next((m for m in self.measurements if m.device == device), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "order": list(self.order), "measurements": [m.to_dict() for m in self.measurements],
            "measured_at": self.measured_at, "budget_s": self.budget_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        if data.get("format") != _FORMAT:
            msg = f"selection format {data.get('format')!r}"
            raise ValueError(msg)
        return cls(
            tuple(str(d) for d in data["order"]), tuple(Measurement.from_dict(m) for m in data["measurements"]),
            float(data["measured_at"]), float(data["budget_s"]),
        )


def _store() -> CompileCache:
    from hal._paths import cache_root

    return CompileCache(cache_root() / "selection")


#: key -> Selection, per process: a warm to("auto") reads the file once.
_MEMORY: dict[str, Selection] = {}
_MEMORY_LOCK = threading.Lock()
#: (digest, devices, options) -> key: the key's JSON of every device's capabilities, once.
_KEYS: dict[Any, str] = {}


def _key(compiled: CompiledModel, devices: Sequence[Device], options: CompileOptions, precision: str,
         rtol: float | None, example: Mapping[str, Any] | None) -> str:
    from hal.compiled import _feeds_digest, _version_of

    backends = registry().backends()
    versions = tuple(_version_of(backends[d.backend]) for d in devices)
    extra = repr(sorted((str(k), repr(v)) for k, v in options.extra.items()))
    feeds = "seeded" if example is None else _feeds_digest(seeded_feeds(compiled.model.inputs, example=example))
    memo = (compiled.digest, tuple(devices), versions, extra, options.reduced_precision, precision, rtol, feeds)
    key = _KEYS.get(memo)
    if key is None:
        key = cache_key(
            selection=_FORMAT,
            model=compiled.digest,
            devices=[
                [d.id, d.backend, version, cache_key(caps=without_health(d.capabilities).to_dict())]
                for d, version in zip(devices, versions)
            ],
            extra=extra,
            reduced_precision=options.reduced_precision,
            precision=precision,
            rtol=rtol,
            feeds=feeds,
        )
        _KEYS[memo] = key
    return key


def remembered(key: str) -> Selection | None:
    """The selection stored under ``key`` (memory first, then the cache directory), or None."""
    with _MEMORY_LOCK:
        found = _MEMORY.get(key)
    if found is not None:
        return found
    payload = _store().get(key)
    if payload is None:
        return None
    try:
        found = Selection.from_dict(json.loads(payload))
    except Exception:  # noqa: BLE001 - an entry from another version: measure again
        return None
    with _MEMORY_LOCK:
        _MEMORY[key] = found
    return found


def fastest(
    compiled: CompiledModel,
    ranked: list[Device],
    options: CompileOptions,
    verify: bool | str,
    example: Mapping[str, Any] | None,
    precision: str,
    rtol: float | None,
) -> tuple[list[Device], dict[str, Executable], dict[str, LoweringStep]]:
    """``ranked`` (the default order) reordered fastest first, the executables prepared while
    measuring (none when the order was remembered) and the ``selected`` step for each."""
    if len(ranked) < 2:  # nothing to choose between
        return ranked, {}, {}
    key = _key(compiled, ranked, options, precision, rtol, example)
    found = remembered(key)
    by_id = {d.id: d for d in ranked}
    if found is not None and set(found.order) <= set(by_id):
        return [by_id[i] for i in found.order], {}, _notes(found, remembered=True)
    selection, prepared = measure(compiled, ranked, options, verify, example, precision, rtol)
    try:
        _store().put(key, json.dumps(selection.to_dict()).encode())
    except OSError as exc:  # a read-only cache: remembered in this process only
        log.warning("cannot remember the selection (%s); it is kept for this process only", exc)
    with _MEMORY_LOCK:
        _MEMORY[key] = selection
    for m in selection.measurements:
        if m.problem is not None:
            log.warning("fastest: %s is not a candidate: %s", m.device, m.problem)
    return [by_id[i] for i in selection.order], prepared, _notes(selection, remembered=False)


def _notes(selection: Selection, *, remembered: bool) -> dict[str, LoweringStep]:
    """The ``selected`` step each candidate's executable gets: its figure against the fastest."""
    if not selection.order:
        return {}
    best = selection.measurement(selection.order[0])
    assert best is not None and best.p50_s is not None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(selection.measured_at))
    notes = {}
    for place, device_id in enumerate(selection.order):
        mine = selection.measurement(device_id)
        assert mine is not None and mine.p50_s is not None
        standing = "the fastest" if place == 0 else f"{mine.p50_s / best.p50_s:.2f}x the fastest's ({selection.order[0]})"
        source = f"remembered from {when}" if remembered else "measured now"
        notes[device_id] = LoweringStep(StepKind.SELECTED, (
            f"policy fastest: p50 {mine.p50_s * 1e3:.3g} ms over {mine.runs} runs, {standing} "
            f"of {len(selection.order)} candidates ({source})"
        ))
    return notes


def measure(
    compiled: CompiledModel,
    devices: Sequence[Device],
    options: CompileOptions,
    verify: bool | str,
    example: Mapping[str, Any] | None,
    precision: str = "exact",
    rtol: float | None = None,
) -> tuple[Selection, dict[str, Executable]]:
    """Prepare each device, then time them round-robin (see the module docstring)."""
    seconds = budget()
    reg = registry()
    prepared: dict[str, Executable] = {}
    problems: dict[str, str] = {}
    for device in devices:
        try:
            exe = prepare(compiled, reg.backend(device.backend), device, options, verify, example, precision, rtol)
        except HalError as exc:
            problems[device.id] = f"cannot be placed: {exc}"
            continue
        prepared[device.id] = exe
    feeds = seeded_feeds(compiled.model.inputs, example=example)
    times: dict[str, list[float]] = {d: [] for d in prepared}
    for device_id, exe in list(prepared.items()):  # untimed runs: first-run allocations, JIT
        try:
            for _ in range(WARMUP_RUNS):
                exe.run(feeds)
        except HalError as exc:
            problems[device_id] = f"failed while measured: {exc}"
            del prepared[device_id], times[device_id]
    start = time.perf_counter()
    rounds = 0
    timing = dict(prepared)
    while timing and rounds * RUNS_PER_ROUND < MAX_RUNS and (rounds == 0 or time.perf_counter() - start < seconds):
        if rounds >= ELIMINATE_AFTER and len(timing) > 1:
            # The budget goes to the contenders: a device clearly slower than the best so far
            # keeps its figure and is timed no more.
            # By each device's quickest run: a busy machine only ever adds time, so a device
            # is dropped only when even its best run is clearly behind.
            best = min(statistics.median(times[d]) for d in timing)
            timing = {d: e for d, e in timing.items() if min(times[d]) <= ELIMINATE_ABOVE * best}
        for device_id, exe in list(timing.items()):
            try:
                if len(timing) > 1:
                    # Untimed: the device before may leave its thread pool spinning (onnxruntime
                    # does, for a while after each run), which would be charged to this one.
                    exe.run(feeds)
                for _ in range(RUNS_PER_ROUND):
                    t0 = time.perf_counter()
                    exe.run(feeds)
                    times[device_id].append(time.perf_counter() - t0)
            except HalError as exc:
                problems[device_id] = f"failed while measured: {exc}"
                del prepared[device_id], times[device_id], timing[device_id]
                continue
        rounds += 1
    measurements = [Measurement(d, statistics.median(t), len(t)) for d, t in times.items()]
    measurements += [Measurement(d, problem=p) for d, p in problems.items()]
    order = tuple(m.device for m in sorted((m for m in measurements if m.p50_s is not None), key=lambda m: m.p50_s))
    position = {d.id: i for i, d in enumerate(devices)}
    measurements.sort(key=lambda m: position[m.device])
    selection = Selection(order, tuple(measurements), time.time(), seconds)
    return selection, prepared


# -- precision ---------------------------------------------------------------------------------


def check_precision(precision: str, rtol: float | None) -> None:
    if precision not in PRECISIONS:
        msg = f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}"
        raise InputError(msg)
    if rtol is not None and (not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or rtol < 0):
        msg = f"rtol={rtol!r} is not a finite number >= 0"
        raise InputError(msg)
    if rtol is not None and precision != "relaxed":
        msg = "rtol= is the tolerance of precision='relaxed'; pass precision='relaxed' with it"
        raise InputError(msg)


def prepare(
    compiled: CompiledModel,
    backend: Backend,
    device: Device,
    options: CompileOptions,
    verify: bool | str,
    example: Mapping[str, Any] | None,
    precision: str = "exact",
    rtol: float | None = None,
) -> Executable:
    """``device``'s executable: the exact variant, or with ``precision="relaxed"`` the
    reduced-precision one where its outputs were checked within ``rtol``."""
    if precision == "exact" or options.reduced_precision:
        return compiled._prepare(backend, device, options, verify, example)  # noqa: SLF001 - its own helper
    from hal.compiled import _cached_report, _feeds_digest, _verdicts, _version_of

    relaxed = evolve(options, reduced_precision=True)
    lowering_key = compiled._lowering(device, True).key  # noqa: SLF001
    feeds_key = "seeded" if example is None else _feeds_digest(seeded_feeds(compiled.model.inputs, example=example))
    key = cache_key(
        relaxed=2, lowering=lowering_key, device=device.id, backend=backend.name,  # 2: as _VERIFY_FORMAT 2
        backend_version=_version_of(backend), rtol=rtol, feeds=feeds_key,
    )
    report = _cached_report(key)
    exe = None
    if report is None or report.passed:
        exe = compiled._prepare(backend, device, relaxed, False, example)  # noqa: SLF001
    if report is None:
        assert exe is not None
        feeds = seeded_feeds(compiled.model.inputs, example=example, positive=positive_inputs(compiled.model.proto))
        report = judge(
            device.id, exe.run, feeds, compiled._reference(device.id), compiled.model.outputs,  # noqa: SLF001
            key=feeds_key, real_inputs=example is not None, reduced_precision=True, rtol=rtol,
        )
        _verdicts().put(key, json.dumps(report.to_dict()).encode())
    tolerance = "the reduced-precision tolerance" if rtol is None else f"rtol={rtol:g}"
    if report.passed and exe is not None:
        exe.lowering = (*exe.lowering, LoweringStep(StepKind.VERIFIED, f"reduced precision admitted within {tolerance}: {report.summary()}"))
        exe.verification = report
        return exe
    why = report.summary() if report.status != "failed" else report.error().args[0].split(". The device")[0]
    log.info("%s: reduced precision not admitted (%s); preparing the exact variant", device.id, why)
    exact = compiled._prepare(backend, device, options, verify, example)  # noqa: SLF001
    exact.lowering = (LoweringStep(StepKind.VERIFIED, f"reduced precision not admitted within {tolerance} ({why}); exact variant"), *exact.lowering)
    return exact


def admitted_reduced(exe: Executable) -> bool:
    """Whether ``exe`` is a reduced-precision variant admitted by ``precision="relaxed"``."""
    return any(s.kind is StepKind.VERIFIED and s.detail.startswith("reduced precision admitted") for s in exe.lowering)


# -- explaining auto -----------------------------------------------------------------------------


@frozen
class Candidate:
    """One device as ``hal explain --device auto`` shows it: its place (1 = chosen; None when
    not a candidate), verdict, figures and why it stands where it does."""

    device: str
    place: int | None
    verdict: Any  # hal.ranking.Verdict
    p50_s: float | None = None
    runs: int = 0
    estimate_s: float | None = None
    estimate_note: str | None = None
    health: Any = None  # hal.capabilities.Health
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        from attrs import asdict

        return {
            "device": self.device, "place": self.place, "verdict": self.verdict.to_dict(),
            "measured_p50_s": self.p50_s, "measured_runs": self.runs,
            "estimate_s": self.estimate_s, "estimate_note": self.estimate_note,
            "health": None if self.health is None else asdict(self.health), "why": self.why,
        }


_KIND_WORDS = {"gpu": "an accelerator", "npu": "an accelerator", "cpu": "a CPU", "simulated": "simulated"}


def _default_why(device: Device, verdict: Any) -> str:
    changes = [s for s in verdict.steps if not s.kind.keeps_meaning]
    parts = [
        f"lowering changes how it computes ({len(changes)} step{'s' if len(changes) != 1 else ''})" if changes
        else "runs the model as written",
        _KIND_WORDS.get(device.kind.value, device.kind.value),
        f"maturity {device.capabilities.stability.maturity.value}",
    ]
    if device.id == "ort:cpu":
        parts.append("the reference runtime, first among equals")
    return ", ".join(parts)


def _health_why(device: Device) -> str:
    health = device.capabilities.stability.health
    if not health.probes:
        return "never checked (run `hal doctor`)"
    jitter = "" if health.latency_jitter is None else f", jitter p90/p50 {health.latency_jitter:.2f}"
    bits = {True: ", same bits every run", False: ", bits vary", None: ""}[health.deterministic]
    return f"{health.failures} of {health.probes} canary runs failed{bits}{jitter}"


def explain_auto(
    compiled: CompiledModel,
    policy: str | None = None,
    *,
    reduced_precision: bool = False,
    precision: str = "exact",
    rtol: float | None = None,
) -> tuple[Executable | None, HalError | None, list[Candidate]]:
    """Place ``compiled`` with ``to("auto", policy=policy)`` and describe every device: the
    chosen executable (or the error), and one :class:`Candidate` per device, ranked ones first in
    their order."""
    from hal.backend import CompileOptions
    from hal.errors import DeviceError
    from hal.estimate import estimate
    from hal.ranking import BUILTIN_POLICIES, assess, fp8_as_written, rank

    exe: Executable | None = None
    error: HalError | None = None
    try:
        exe = compiled.to("auto", policy=policy, reduced_precision=reduced_precision, precision=precision, rtol=rtol)
    except HalError as exc:
        error = exc
    reg = registry()
    devices = reg.devices()
    lower = compiled._steps_for  # noqa: SLF001 - the one lowering per device
    verdicts = {d.id: assess(compiled.model, d, lower) for d in devices}
    default = [d for d, _ in rank(compiled.model, devices, None, lower)]
    ranked = [d for d, _ in rank(compiled.model, devices, None if policy == "fastest" else policy, lower)]
    selection = None
    if policy == "fastest" and len(default) > 1:
        options = CompileOptions(reduced_precision=reduced_precision)
        selection = remembered(_key(compiled, default, options, precision, rtol, None))
        if selection is not None:
            by_id = {d.id: d for d in default}
            ranked = [by_id[i] for i in selection.order if i in by_id]
    plugin = reg.policies().get(policy) if policy and policy not in BUILTIN_POLICIES else None
    feeds = seeded_feeds(compiled.model.inputs)
    shapes = {k: v.shape for k, v in feeds.items() if hasattr(v, "shape")}
    out = []
    place = {d.id: i + 1 for i, d in enumerate(ranked)}
    for device in sorted(devices, key=lambda d: place.get(d.id, len(devices) + 1)):
        verdict = verdicts[device.id]
        est = note = None
        if verdict.status != "cannot":
            try:
                est = estimate(compiled._lowered(device)[0], device.capabilities, shapes).seconds  # noqa: SLF001
            except DeviceError as exc:
                note = str(exc).split(";")[0]
            except HalError as exc:
                note = f"no estimate: {exc}"
        measured = selection.measurement(device.id) if selection is not None else None
        if verdict.status == "cannot":
            why = f"not a candidate: {verdict.reason}"
        elif measured is not None and measured.problem is not None:
            why = f"not a candidate: {measured.problem}"
        elif policy == "fastest" and measured is not None and selection is not None:
            best = selection.measurement(selection.order[0])
            ratio = measured.p50_s / best.p50_s if best and best.p50_s and measured.p50_s else 1.0
            why = "measured fastest" if place.get(device.id) == 1 else f"measured {ratio:.2f}x the fastest's time"
        elif policy == "fastest":
            why = "the only candidate: nothing to measure against" if len(default) == 1 else "not measured"
        elif policy == "stable":
            why = f"health: {_health_why(device)}; then {_default_why(device, verdict)}"
        elif policy == "native-fp8":
            kept = "keeps the model's FP8 as written" if fp8_as_written(verdict) else "converts the model's FP8"
            why = f"{kept}; then {_default_why(device, verdict)}"
        elif plugin is not None:
            why = (f"placed by policy {policy!r} of plugin {plugin.plugin}" if device.id in place
                   else f"left out by policy {policy!r} of plugin {plugin.plugin}")
        else:
            why = _default_why(device, verdict)
        out.append(Candidate(
            device.id, place.get(device.id), verdict,
            None if measured is None else measured.p50_s, 0 if measured is None else measured.runs,
            est, note, device.capabilities.stability.health, why,
        ))
    return exe, error, out
