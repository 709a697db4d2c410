"""Failover: a :class:`Pool` answers each request on the first healthy device of a list.

``compiled.to(["sim:ascend-910c:0", "sim:h100:0", "ort:cpu"], deadline_s=2.0)`` (or
``hal.Pool([exe, ...])``) returns a pool. A request is checked once (the model's inputs, by
:meth:`hal.Executable.check`) and tried on the devices in order. A device *fails* a request when
it raises, does not answer within its share of the deadline, or answers with non-finite floats
where a later device answers the same request with finite ones (a second opinion: when no device
answers finite, the first non-finite answer is returned and nobody is blamed). A failed request
moves on to the next device while the caller's deadline lasts; the caller gets exactly one
answer, or a :class:`~hal.errors.FailoverError` naming every device's failure.

Each device has a circuit :class:`Breaker`: ``closed`` (used) until ``failures`` consecutive
failures open it; ``open`` (skipped) for ``cool_down_s``; then ``half-open``: one request is let
through as a trial, which closes it on success and opens it again on failure.

Deadlines: Python cannot stop a thread, so with a deadline each device runs requests on its own
daemon threads and the caller waits for at most the attempt's share of the time left (the time
left divided by the devices still to try, unless ``attempt_s`` says otherwise). A call that
overruns is abandoned: counted (``timed_out``), its late answer dropped where it lands, never
delivered; an isolated device's worker process is killed and restarted instead
(:mod:`hal.isolation`). Without a deadline a request runs on the caller's thread and a hang is
not cut.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from attrs import field, frozen

from hal.errors import FailoverError, HalError, InputError
from hal.executable import Executable, _is_float
from hal.lowering import LoweringStep, StepKind

if TYPE_CHECKING:
    from hal.backend import Device
    from hal.estimate import Estimate
    from hal.lowering import Placement
    from hal.model import TensorInfo

__all__ = ["Breaker", "BreakerSettings", "DeviceStats", "Pool"]

log = logging.getLogger("hal.pool")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


def check_seconds(name: str, value: Any) -> None:
    """An InputError naming ``name`` unless ``value`` is a positive, finite number of seconds."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        msg = f"{name} must be a positive number of seconds, got {value!r}"
        raise InputError(msg)


def _check_count(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        msg = f"{name} must be an integer of at least 1, got {value!r}"
        raise InputError(msg)


def _positive(_instance: Any, attribute: Any, value: Any) -> None:
    check_seconds(attribute.name, value)


def _at_least_one(_instance: Any, attribute: Any, value: Any) -> None:
    _check_count(attribute.name, value)


@frozen(kw_only=True)
class BreakerSettings:
    """When a device's circuit breaker opens and for how long: after ``failures`` consecutive
    failed requests, for ``cool_down_s`` seconds before a half-open trial."""

    failures: int = field(default=3, validator=_at_least_one)
    cool_down_s: float = field(default=5.0, validator=_positive)


class Breaker:
    """One device's circuit breaker (thread-safe). ``allow()`` asks whether a request may go to
    the device (in ``half-open`` it lets exactly one through, the trial); every allowed request
    ends with :meth:`succeeded` or :meth:`failed`."""

    def __init__(
        self, settings: BreakerSettings | None = None, clock: Callable[[], float] = time.monotonic, name: str = "device"
    ) -> None:
        self.settings = settings or BreakerSettings()
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0  # consecutive
        self._opened_at = 0.0
        self._trial = False  # a half-open trial is in flight

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.settings.cool_down_s:
                return HALF_OPEN  # due for a trial; it becomes so on the next allow()
            return self._state

    def ready(self) -> bool:
        """Whether :meth:`allow` would let a request through now (changes nothing)."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN:
                return self._clock() - self._opened_at >= self.settings.cool_down_s
            return not self._trial

    def allow(self) -> bool:
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN:
                if self._clock() - self._opened_at < self.settings.cool_down_s:
                    return False
                self._state = HALF_OPEN
            if self._trial:
                return False
            self._trial = True
            return True

    def succeeded(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._trial = False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN or self._failures >= self.settings.failures:
                if self._state != OPEN:
                    log.warning("%s: circuit breaker opened after %d consecutive failures", self.name, self._failures)
                self._state = OPEN
                self._opened_at = self._clock()
            self._trial = False

    def released(self) -> None:
        """An allowed request that never reached the device (the deadline passed first)."""
        with self._lock:
            self._trial = False


@frozen
class DeviceStats:
    """One device's share of a pool's requests: ``served`` (answers delivered), ``failed``
    (errors, timeouts and non-finite answers a later device contradicted), ``retried`` (requests
    it took after another device had failed them), ``timed_out`` (calls abandoned at the
    deadline), ``late`` (abandoned calls that answered afterwards: dropped), the breaker's state
    and the last failure."""

    device: str
    served: int
    failed: int
    retried: int
    timed_out: int
    late: int
    nonfinite: int
    breaker: str
    last_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "served": self.served, "failed": self.failed, "retried": self.retried,
            "timed_out": self.timed_out, "late": self.late, "nonfinite": self.nonfinite,
            "breaker": self.breaker, "last_error": self.last_error,
        }


class _Call:
    """One request handed to a device's threads; the caller waits on ``done``."""

    __slots__ = ("abandoned", "args", "done", "error", "fn", "lock", "started", "value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.lock = threading.Lock()  # orders "answered" against "abandoned": one of them wins
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.started = False
        self.abandoned = False
        self.value: Any = None
        self.error: BaseException | None = None


class _Threads:
    """A device's daemon threads (a ThreadPoolExecutor's threads are joined at exit: one stuck in
    a hung driver call would keep the process from exiting)."""

    def __init__(self, name: str, size: int, on_late: Callable[[], None]) -> None:
        self._name = name
        self._size = size
        self._limit = 4 * size  # replacements for stuck threads stop here
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._count = 0
        self._on_late = on_late

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Call:
        call = _Call(fn, args)
        with self._lock:
            if self._count < self._size:
                self._spawn()
        self._queue.put(call)
        return call

    def replace_stuck(self) -> None:
        """A call was abandoned while running: its thread may never return, so add one."""
        with self._lock:
            if self._count < self._limit:
                self._spawn()

    def close(self) -> None:
        with self._lock:
            for _ in range(self._count):
                self._queue.put(None)

    def _spawn(self) -> None:
        self._count += 1
        threading.Thread(target=self._serve, name=f"hal-pool-{self._name}-{self._count}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            if call.abandoned:  # its caller gave up before it started
                continue
            call.started = True
            try:
                call.value = call.fn(*call.args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                call.error = exc
            with call.lock:
                call.done.set()
                late = call.abandoned
            if late:
                self._on_late()


class Counted:
    """What failover keeps of one member (a pool's device, a fleet's actor): ``id``, its
    :class:`Breaker`, its ``exe`` (the :class:`~hal.Executable` that checks its answers), counts
    (``served``, ``failed``, ``retried``, ``timed_out``, ``late``, ``nonfinite`` and any ``extra``)
    and the last failure."""

    def __init__(self, name: str, exe: Executable, settings: BreakerSettings, extra: Sequence[str] = ()) -> None:
        self.id = name
        self.exe = exe
        self.breaker = Breaker(settings, name=name)
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(("served", "failed", "retried", "timed_out", "late", "nonfinite", *extra), 0)
        self.last_error: str | None = None

    def count(self, what: str, error: str | None = None) -> None:
        with self._lock:
            self.counts[what] += 1
            if error is not None:
                self.last_error = error

    def stats(self) -> DeviceStats:
        with self._lock:
            c = dict(self.counts)
            last = self.last_error
        return DeviceStats(self.id, c["served"], c["failed"], c["retried"], c["timed_out"], c["late"],
                           c["nonfinite"], self.breaker.state, last)


class _Member(Counted):
    """One device of a pool: its executable, breaker, threads and counts."""

    def __init__(self, exe: Executable, settings: BreakerSettings, threads: int) -> None:
        super().__init__(exe.device.id, exe, settings)
        self._threads = _Threads(self.id, threads, lambda: self.count("late"))

    def call(self, feeds: Any, names: Any, specs: Any, timeout: float | None) -> tuple[str, Any]:
        """``("ok", outputs)``, ``("error", reason)`` or ``("timeout", reason)``."""
        if timeout is None:
            try:
                return "ok", self.exe.run_checked(feeds, names, specs)
            except Exception as exc:  # noqa: BLE001 - any runner failure is the device's
                return "error", _reason(exc)
        call = self._threads.submit(self.exe.run_checked, feeds, names, specs)
        if not call.done.wait(timeout):
            with call.lock:
                if not call.done.is_set():
                    call.abandoned = True
            if call.abandoned:
                if call.started:
                    self._threads.replace_stuck()
                    abandon = getattr(self.exe.runner, "abandon", None)
                    if abandon is not None:  # an isolated worker: kill it, it may be stuck for good
                        abandon()
                return "timeout", f"no answer within {timeout:.3g} s (abandoned)"
        if call.error is not None:
            return "error", _reason(call.error)
        return "ok", call.value

    def close(self) -> None:
        self._threads.close()
        close = getattr(self.exe.runner, "close", None)
        if close is not None:
            close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, HalError) and first else f"{type(exc).__name__}: {first}".rstrip(": ")


def _finite(value: Any) -> bool:
    """Whether every floating element of an answer (arrays, sequences of them, None) is finite."""
    if value is None:
        return True
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, np.ndarray) and _is_float(value.dtype):
        try:
            return bool(np.isfinite(value).all())
        except TypeError:  # a format numpy cannot test (no NaN encoding): finite by construction
            return True
    return True


class Dispatcher:
    """What a :class:`Pool` and a Ray fleet's executable share: members (:class:`Counted`) of one
    model, the :class:`hal.Executable` surface they show (``inputs``, ``outputs``, ``devices``, a
    context manager that closes), per-member :meth:`stats`, request :meth:`totals`, and
    :meth:`_dispatch`, one request through :func:`failover` with those counts kept."""

    _members: tuple[Any, ...]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "answered": 0, "failed": 0}

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._members[0].exe.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._members[0].exe.outputs

    @property
    def devices(self) -> tuple[Device, ...]:
        """Each member's device, in the members' order."""
        return tuple(m.exe.device for m in self._members)

    def stats(self) -> dict[str, DeviceStats]:
        """Per member, in order: :class:`DeviceStats`."""
        return {m.id: m.stats() for m in self._members}

    def totals(self) -> dict[str, int]:
        """Requests taken, answered and failed (with a FailoverError) so far."""
        with self._lock:
            return dict(self._counts)

    def _dispatch(self, members: Sequence[Any], attempt: Callable[[Any, float | None], tuple[str, Any]],
                  count: Callable[..., None], **options: Any) -> Any:
        """One request through :func:`failover` (``options`` are its keywords), counted."""
        with self._lock:
            self._counts["requests"] += 1
        try:
            value = failover(members, attempt, count, **options)
        except FailoverError:
            with self._lock:
                self._counts["failed"] += 1
            raise
        with self._lock:
            self._counts["answered"] += 1
        return value


class Pool(Dispatcher):
    """Executables of one model on several devices, used in order with failover.

    ``run(feeds, output_names=None)`` is :meth:`hal.Executable.run`'s, safe from many threads.
    ``deadline_s``: the most a request may take, every retry included (None: no bound, and a
    hang is not cut). ``attempt_s``: the most one device may take (default: the time left shared
    between the devices still to try). ``breaker``: :class:`BreakerSettings`. ``threads``: how many
    requests one device runs at once (with a deadline). ``left_out``: ``(device id, reason)`` of
    devices that could not take the model, shown in :attr:`lowering`.
    """

    def __init__(
        self,
        executables: Sequence[Executable],
        *,
        deadline_s: float | None = None,
        attempt_s: float | None = None,
        breaker: BreakerSettings | None = None,
        threads: int = 8,
        left_out: Sequence[tuple[str, str]] = (),
    ) -> None:
        members = list(executables)
        if not members or not all(isinstance(e, Executable) for e in members):
            msg = "a Pool takes a non-empty list of hal.Executable (from compiled.to(device)) of one model"
            raise InputError(msg)
        ids = [e.device.id for e in members]
        if len(set(ids)) != len(ids):
            msg = f"a Pool takes each device once, got {ids}"
            raise InputError(msg)
        first = members[0]
        for other in members[1:]:
            if (other.inputs, other.outputs) != (first.inputs, first.outputs):
                msg = f"{other.device.id}'s executable has other inputs or outputs than {first.device.id}'s: a Pool runs one model"
                raise InputError(msg)
        for name, value in (("deadline_s", deadline_s), ("attempt_s", attempt_s)):
            if value is not None:
                check_seconds(name, value)
        _check_count("threads", threads)
        super().__init__()
        self.deadline_s = deadline_s
        self.attempt_s = attempt_s
        self.breaker_settings = breaker or BreakerSettings()
        self._members = tuple(_Member(e, self.breaker_settings, threads) for e in members)
        self.left_out = tuple((str(d), str(r)) for d, r in left_out)

    def __repr__(self) -> str:
        return f"<hal.Pool of {', '.join(m.id for m in self._members)}: {len(self.inputs)} inputs, {len(self.outputs)} outputs>"

    # -- what an Executable has (inputs, outputs, devices: Dispatcher's) ---------------------------

    @property
    def executables(self) -> tuple[Executable, ...]:
        return tuple(m.exe for m in self._members)

    @property
    def device(self) -> Device:
        """The first device (requests go there while it is healthy)."""
        return self._members[0].exe.device

    @property
    def placement(self) -> tuple[Placement, ...]:
        return tuple(p for m in self._members for p in m.exe.placement)

    @property
    def lowering(self) -> tuple[LoweringStep, ...]:
        """A step per device left out of the pool, then the first device's steps."""
        skipped = tuple(LoweringStep(StepKind.FALLBACK, f"{d} left out of the pool: {r}") for d, r in self.left_out)
        return (*skipped, *self._members[0].exe.lowering)

    @property
    def verification(self) -> Any:
        return self._members[0].exe.verification

    def estimate(self, shapes: Mapping[str, Any] | None = None) -> Estimate:
        """The first device's estimate (see :meth:`hal.Executable.estimate`)."""
        return self._members[0].exe.estimate(shapes)

    def close(self) -> None:
        """Stop the devices' threads and isolated workers (idle ones exit; stuck ones are left)."""
        for member in self._members:
            member.close()

    # -- running -------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Run the model on the first healthy device, failing over (see the module's docs).
        Raises :class:`~hal.errors.InputError` for bad feeds (no device is tried) and
        :class:`~hal.errors.FailoverError` when no device answered within the deadline."""
        feeds, names, specs = self._members[0].exe.check(feeds, output_names)
        return self._dispatch(
            self._members,
            lambda member, timeout: member.call(feeds, names, specs, timeout),
            lambda member, what, error=None: member.count(what, error),
            deadline_s=self.deadline_s,
            attempt_s=self.attempt_s,
            nobody="no device of the pool answered",
            hint="see pool.stats(), and hal devices for their health",
        )


def failover(
    members: Sequence[Any],
    attempt: Callable[[Any, float | None], tuple[str, Any]],
    count: Callable[..., None],
    *,
    deadline_s: float | None,
    attempt_s: float | None = None,
    nobody: str,
    hint: str,
) -> Any:
    """One request, tried on ``members`` in order (a :class:`Pool`'s devices, a Ray fleet's
    actors: anything with ``id`` and ``breaker``) until one answers; the module's docs say how.

    ``attempt(member, timeout)`` returns ``("ok", outputs)``, ``("error", reason)`` or
    ``("timeout", reason)``; ``count(member, what, error=None)`` keeps the member's counts.
    Returns the outputs, or raises :class:`~hal.errors.FailoverError` whose message starts with
    ``nobody`` and ends with ``hint``, with ``failures``: ``(member id, reason)`` per member."""
    start = time.monotonic()
    deadline = None if deadline_s is None else start + deadline_s
    failures: list[tuple[str, str]] = []
    doubtful: list[tuple[Any, Any]] = []  # non-finite answers, awaiting a second opinion
    tried = 0
    for index, member in enumerate(members):
        if not member.breaker.allow():
            failures.append((member.id, f"skipped: circuit breaker open (last failure: {member.last_error})"))
            continue
        timeout = None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                member.breaker.released()
                failures.append((member.id, f"not tried: the {deadline_s:g} s deadline had passed"))
                continue
            share = left / (1 + sum(1 for m in members[index + 1:] if m.breaker.ready()))
            timeout = share if attempt_s is None else min(left, attempt_s)
        if tried:
            count(member, "retried")
        tried += 1
        kind, value = attempt(member, timeout)
        if kind == "ok":
            if _finite(value):
                member.breaker.succeeded()
                count(member, "served")
                for other, _ in doubtful:  # contradicted by a finite answer
                    other.breaker.failed()
                    count(other, "failed", f"non-finite outputs where {member.id} answered finite ones")
                return value
            count(member, "nonfinite")
            doubtful.append((member, value))
            failures.append((member.id, "returned non-finite outputs"))
            continue
        member.breaker.failed()
        count(member, "failed", value)
        if kind == "timeout":
            count(member, "timed_out")
        failures.append((member.id, value))
    if doubtful:  # nobody answered finite: the first non-finite answer stands, nobody is blamed
        for other, _ in doubtful:
            other.breaker.succeeded()
        first, answer = doubtful[0]
        count(first, "served")
        return answer
    parts = "; ".join(f"{d}: {r}" for d, r in failures)
    late = "" if deadline is None or time.monotonic() < deadline else f" within the {deadline_s:g} s deadline"
    error = FailoverError(f"{nobody}{late}: {parts}; {hint}")
    error.failures = tuple(failures)
    raise error


def _why(exc: HalError) -> str:
    """A device's reason for not joining: ``to(device, fallback=None)`` wraps it; unwrap it."""
    cause = exc.__cause__
    return str(cause if isinstance(cause, HalError) else exc)


def _isolated_ids(isolate: Any, ids: Sequence[str]) -> set[str]:
    if isinstance(isolate, bool):
        return set(ids) if isolate else set()
    if isinstance(isolate, str) or not all(isinstance(i, str) for i in isolate):
        msg = f"isolate= takes True, False or a list of the pool's device ids, got {isolate!r}"
        raise InputError(msg)
    unknown = sorted(set(isolate) - set(ids))
    if unknown:
        msg = f"isolate= names {unknown}, which are not in the pool's devices {list(ids)}"
        raise InputError(msg)
    return set(isolate)


def isolation_options(device: Any, deadline_s: Any, isolate: Any, breaker: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """``to(one device, isolate=..., deadline_s=...)``: the backend options carrying the
    isolation (:data:`hal.isolation.KEY`), or an InputError for what only a pool takes."""
    from hal.isolation import KEY, Isolation

    if breaker is not None:
        msg = "breaker= configures a pool's circuit breakers: pass a list of devices, e.g. to([device, 'ort:cpu'], breaker=...)"
        raise InputError(msg)
    if not isinstance(isolate, bool):
        msg = f"isolate= takes True or False for one device, got {isolate!r}; a list of ids is for a pool"
        raise InputError(msg)
    if deadline_s is not None:
        check_seconds("deadline_s", deadline_s)
        if not isolate:
            msg = (
                f"deadline_s bounds a request in a pool (a list of devices) or in an isolated worker (isolate=True); "
                f"a call on {getattr(device, 'id', device)} in this process cannot be stopped: pass either"
            )
            raise InputError(msg)
    if not isolate:
        return extra
    return {**extra, KEY: Isolation(deadline_s)}


def pool_for(
    compiled: Any,
    targets: Sequence[Any],
    *,
    fallback: str | None,
    strict: bool,
    policy: str | None,
    deadline_s: float | None,
    isolate: Any,
    breaker: Any,
    **options: Any,
) -> Pool:
    """``compiled.to([device, ...])``: every listed device that takes the model joins the pool,
    in order; the others are left out with their reason (a WARNING, and a ``fallback`` step in
    ``pool.lowering``). When none does, ``to()``'s fallback applies as it did to a list before
    pools: the first device ``fallback`` offers that takes it is the pool's only device; with
    ``strict`` or ``fallback=None`` the first device's error is raised."""
    if policy is not None:
        msg = f"policy={policy!r} ranks devices for to('auto'); a device or a list is tried as given"
        raise InputError(msg)
    if breaker is not None and not isinstance(breaker, BreakerSettings):
        msg = f"breaker= takes a hal.pool.BreakerSettings(failures=..., cool_down_s=...), got {breaker!r}"
        raise InputError(msg)
    if deadline_s is not None:
        check_seconds("deadline_s", deadline_s)
    from hal.backend import Device
    from hal.errors import CompileError, UnavailableDeviceError

    ids = [t.id if isinstance(t, Device) else t for t in targets]
    isolated = _isolated_ids(isolate, ids)

    def place(device_id: str) -> Executable:
        alone = device_id in isolated
        return compiled.to(device_id, fallback=None, strict=strict, isolate=alone,
                           deadline_s=deadline_s if alone else None, **options)

    members: list[Executable] = []
    failures: list[tuple[str, HalError]] = []
    for device_id in dict.fromkeys(ids):
        try:
            members.append(place(device_id))
        except (CompileError, UnavailableDeviceError) as exc:
            failures.append((device_id, exc))
    if not members:
        if strict or fallback is None:
            raise failures[0][1]
        for device in compiled._fallbacks(fallback, {d for d, _ in failures}):  # noqa: SLF001 - to()'s own fallback
            try:
                members.append(place(device.id))
                break
            except (CompileError, UnavailableDeviceError) as exc:
                failures.append((device.id, exc))
        if not members:
            from hal.errors import CompileError as _CompileError

            msg = f"no device could compile {compiled.model.name!r}: " + "; ".join(f"{d}: {_why(e)}" for d, e in failures)
            raise _CompileError(msg)
    for device_id, exc in failures:
        log.warning("pool: %s left out: %s", device_id, _why(exc))
    return Pool(members, deadline_s=deadline_s, breaker=breaker, left_out=[(d, _why(e)) for d, e in failures])
