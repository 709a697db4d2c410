"""Every device side by side on one model, each figure relative to a baseline: ``hal bench``.

    from hal.bench import bench

    report = bench("model.onnx", ["sim:h100:0", "sim:ascend-910c:0", "ort:cpu"])
    for row in report.rows:
        print(row.device, row.speed, row.estimated_speed)  # x the baseline (the first device)

Per device, one after another, in this process:

- **cold to()**: the first placement, ``compiled.to(device, strict=True)``, of a model object
  fresh from compile (nothing remembered in memory) with every on-disk cache empty: the HAL's
  caches (lowered model, verification verdict, each backend's artifacts) point at a new
  temporary directory for the device (:func:`hal._paths.cache_root_at`; ``os.environ`` is not
  touched). Verification runs (the default of ``to()``), so it is in the figure. What a process
  keeps without a cache is not cold: runtimes already imported, device discovery (done before
  any timing), a backend's own in-memory state.
- **warm to()**: the same again with another fresh model object, the cache the cold placement
  just filled: what a new process pays once its cache is warm (plus what the backend keeps in
  memory between placements in one process).
- **latency**: wall time per ``exe.run(feeds)`` on the warm executable, after
  :data:`WARMUP_RUNS` untimed runs, over ``runs`` runs (default :data:`DEFAULT_RUNS`) or as many
  as fit in ``seconds``: p50, p90, p99 (numpy's linear percentiles). The loop is as tight as a
  caller's own: one ``perf_counter`` and one list append per run (a run's latency is the time
  from its start to the next run's start); progress is reported between chunks of about
  :data:`PROGRESS_EVERY` seconds, never per run.
- **throughput**: ``batch * runs / elapsed`` samples per second, one caller, no concurrency.
- **peak memory**: how far the process's resident set rose above where it stood before warm
  ``to()``, until the last run: Linux's VmHWM after resetting it (``/proc/self/clear_refs``),
  where allowed; else the highest of ``/proc/self/statm`` sampled every
  :data:`SAMPLE_INTERVAL` seconds by a thread (which can miss a short peak); else None. Memory
  freed by an earlier device and kept by the allocator is reused without showing as growth.
  ``BenchReport.memory_method`` says which was used.
- **estimate**: ``exe.estimate(feeds)`` (:mod:`hal.estimate`, a roofline from the device's
  declared figures), never a measurement; None, with the reason, where the device declares none.

Relative figures: ``speed`` = the baseline's p50 / the device's p50 (measured; 2.0 is twice as
fast), ``estimated_speed`` the same from the two estimates. The baseline's own are exactly 1.

``strict=True`` means the device measured is the device named: a device that cannot take the
model (:class:`~hal.errors.LoweringError`, :class:`~hal.errors.UnavailableDeviceError`,
:class:`~hal.errors.CompileError`, including a failed verification) or fails while running gets a
row saying why, and the others still run. Nothing else should place or run models in other
threads of the process meanwhile: the cache directory is process-wide for the cold placement,
and the timings share the cores.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import evolve, field, frozen

from hal._paths import cache_root_at
from hal._plugins import registry
from hal.compiled import CompiledModel
from hal.compiled import compile as compile_model
from hal.errors import CompileError, DeviceError, HalError, InputError, OutputPathError, RunError, UnavailableDeviceError
from hal.lowering import StepKind

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from hal.estimate import Estimate
    from hal.executable import Executable
    from hal.model import Model, TensorInfo

__all__ = ["DEFAULT_RUNS", "BenchReport", "DeviceBench", "Latency", "bench", "check_plot", "plot"]

#: Timed runs when neither ``runs`` nor ``seconds`` is given.
DEFAULT_RUNS = 100
#: Untimed runs before timing (first-run allocation, JIT, caches warming).
WARMUP_RUNS = 5
#: Warm-up stops early, after at least one run, once it has taken this long (slow devices).
WARMUP_SECONDS = 2.0
#: Seconds between progress reports while timing (runs are timed in chunks of about this long).
PROGRESS_EVERY = 0.1
#: Interval of the sampling thread, where the peak cannot be read from the kernel.
SAMPLE_INTERVAL = 0.005

#: ``progress(device, stage, done, total)``: stage is ``"cold to()"``, ``"warm to()"``,
#: ``"warm-up"``, ``"runs"`` or ``"done"``; for ``"runs"``, ``done`` and ``total`` count runs, or
#: seconds when ``seconds`` was given; elsewhere both are 0.
Progress = Callable[[str, str, float, float], None]


@frozen
class Latency:
    """Measured wall time of ``exe.run``, in seconds: percentiles over ``runs`` timed runs that
    took ``elapsed`` together."""

    p50: float
    p90: float
    p99: float
    mean: float
    runs: int
    elapsed: float

    @classmethod
    def from_times(cls, times: np.ndarray, elapsed: float) -> Latency:
        import numpy as np

        p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
        return cls(p50, p90, p99, float(times.mean()), int(times.size), elapsed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "p50_s": self.p50, "p90_s": self.p90, "p99_s": self.p99, "mean_s": self.mean,
            "runs": self.runs, "elapsed_s": self.elapsed,
        }


@frozen
class DeviceBench:
    """One device's figures. ``error`` says why the device could not take the model or failed
    while running (its measured figures are then None); ``estimate_note`` why it has no
    estimate. Measured: ``cold_to``, ``warm_to`` (seconds), ``latency``, ``throughput`` (samples
    per second), ``peak_memory`` (bytes), ``speed`` (the baseline's p50 / this p50). Estimated,
    never measured: ``estimate`` and ``estimated_speed``. ``verification`` is the status of the
    cold placement's check against the reference (``passed``, ``skipped``), ``lowering`` what
    lowering changed for this device."""

    device: str
    error: str | None = None
    cold_to: float | None = None
    warm_to: float | None = None
    latency: Latency | None = None
    throughput: float | None = None
    peak_memory: int | None = None
    verification: str | None = None
    verification_summary: str | None = None
    lowering: tuple[str, ...] = field(default=(), converter=tuple)
    estimate: Estimate | None = None
    estimate_note: str | None = None
    speed: float | None = None
    estimated_speed: float | None = None

    @property
    def measured(self) -> bool:
        return self.latency is not None

    def to_dict(self) -> dict[str, Any]:
        est = self.estimate
        return {
            "device": self.device,
            "error": self.error,
            "verification": self.verification,
            "verification_summary": self.verification_summary,
            "lowering": list(self.lowering),
            "measured": {
                "cold_to_s": self.cold_to,
                "warm_to_s": self.warm_to,
                "latency": self.latency.to_dict() if self.latency else None,
                "throughput_samples_per_s": self.throughput,
                "peak_memory_bytes": self.peak_memory,
                "speed_vs_baseline": self.speed,
            },
            "estimated": {
                "kind": "estimated",
                "seconds": est.seconds if est else None,
                "speed_vs_baseline": self.estimated_speed,
                "bound_by": est.bound_by() if est else None,
                "assumptions": list(est.assumptions) if est else None,
                "note": self.estimate_note,
            },
        }


@frozen
class BenchReport:
    """Every device's figures, in the order asked (the baseline first when it was not asked for).

    ``batch`` is the samples per run used for throughput, ``feeds`` each input's element type
    and shape, ``runs``/``seconds`` the budget asked for, ``compile_seconds`` the one
    hardware-independent ``hal.compile`` (None when a compiled model was given),
    ``memory_method`` how peak memory was read (None: not available here)."""

    model: str
    digest: str
    baseline: str
    batch: int
    feeds: tuple[tuple[str, str, tuple[int, ...]], ...] = field(converter=tuple)
    runs: int | None
    seconds: float | None
    compile_seconds: float | None
    memory_method: str | None
    rows: tuple[DeviceBench, ...] = field(converter=tuple)

    def row(self, device: str) -> DeviceBench:
        for r in self.rows:
            if r.device == device:
                return r
        msg = f"device {device!r} is not in this report; it has {', '.join(r.device for r in self.rows)}"
        raise DeviceError(msg)

    def lines(self) -> list[str]:
        """One line per device: ``sim:ascend-910c:0 = 0.62 x sim:h100:0 (estimated)``, measured
        and estimated apart."""
        out = []
        for r in self.rows:
            if r.device == self.baseline:
                out.append(f"{r.device}: the baseline")
                continue
            if r.error is not None:
                out.append(f"{r.device}: not measured: {r.error}")
                continue
            if r.speed is not None:
                out.append(f"{r.device} = {r.speed:.2f} x {self.baseline} (measured p50)")
            if r.estimated_speed is not None:
                out.append(f"{r.device} = {r.estimated_speed:.2f} x {self.baseline} (estimated)")
        base = next((r for r in self.rows if r.device == self.baseline), None)
        others = [r.device for r in self.rows if r.estimate is not None and r.device != self.baseline]
        if base is not None and base.estimate is None and others:
            out.append(
                f"no estimated speeds: the baseline {self.baseline} has no estimate ({base.estimate_note or base.error}); "
                f"choose a baseline that declares figures, e.g. --baseline {others[0]}"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "digest": self.digest,
            "baseline": self.baseline,
            "batch": self.batch,
            "feeds": [{"name": n, "format": f, "shape": list(s)} for n, f, s in self.feeds],
            "runs": self.runs,
            "seconds": self.seconds,
            "warmup_runs": WARMUP_RUNS,
            "compile_seconds": self.compile_seconds,
            "memory_method": self.memory_method,
            "devices": [r.to_dict() for r in self.rows],
        }


# -- feeds -------------------------------------------------------------------------------------


def _feeds(inputs: Sequence[TensorInfo], batch: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs (:func:`hal.testing.models.random_feeds`) with the first dimension set to
    ``batch`` where it is symbolic; other symbolic dimensions are 1."""
    from onnx import helper

    from hal.capabilities import ValueKind
    from hal.testing.models import random_feeds

    values = []
    for info in inputs:
        if info.kind is not ValueKind.TENSOR or info.shape is None:
            what = info.describe()
            msg = f"input {info.name!r} is {what}: hal bench feeds tensors of known rank; bench the model from Python with your own feeds"
            raise InputError(msg)
        shape = list(info.shape)
        if batch is not None and shape:
            first = shape[0]
            if isinstance(first, int) and first > 0 and first != batch:
                msg = f"--batch {batch}: input {info.name!r} has a static first dimension of {first}; leave --batch out or export the model with a symbolic batch dimension"
                raise InputError(msg)
            shape[0] = batch
        values.append(helper.make_tensor_value_info(info.name, info.format.onnx_type, [d if isinstance(d, int) and d > 0 else None for d in shape]))
    # A model of inputs only: random_feeds reads nothing else, and the weights stay where they are.
    shell = helper.make_model(helper.make_graph([], "inputs", values, []))
    return random_feeds(shell, seed=seed)


# -- peak memory -------------------------------------------------------------------------------


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux 4.0+), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM:") is not None


class _PeakRss:
    """Peak resident-set growth of this process over a block: :attr:`method` says how it is read."""

    def __init__(self) -> None:
        self.method: str | None = None
        self.peak: int | None = None
        self._start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._highest = 0

    def __enter__(self) -> _PeakRss:
        gc.collect()
        if _reset_hwm():
            self.method = "RSS growth to the peak, from Linux VmHWM reset at the start"
            self._start = (_status_kib("VmRSS:") or 0) * 1024
        elif (rss := _rss_bytes()) is not None:
            self.method = f"RSS growth to the peak, /proc/self/statm sampled every {SAMPLE_INTERVAL * 1e3:g} ms"
            self._start = self._highest = rss
            self._thread = threading.Thread(target=self._sample, name="hal-bench-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            rss = _rss_bytes()
            if rss is not None and rss > self._highest:
                self._highest = rss

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            self.peak = max(self._highest, rss or 0) - self._start
        elif self.method is not None:
            hwm = _status_kib("VmHWM:")
            self.peak = None if hwm is None else max(0, hwm * 1024 - self._start)


# -- timing --------------------------------------------------------------------------------------


def _stamps(run: Callable[[Any], Any], feeds: Any, count: int) -> list[float]:
    """``count`` runs, back to back: the start of each and the end of the last. Nothing else per
    run, so a run's latency is what a caller's own loop sees."""
    clock = time.perf_counter
    stamps: list[float] = []
    append = stamps.append
    for _ in range(count):
        append(clock())
        run(feeds)
    append(clock())
    return stamps


def _time_runs(
    exe: Executable,
    feeds: Mapping[str, Any],
    runs: int | None,
    seconds: float | None,
    report: Callable[[float, float], None] | None,
) -> Latency:
    import numpy as np

    run = exe.run
    warm = []
    begin = time.perf_counter()
    for _ in range(WARMUP_RUNS):
        start = time.perf_counter()
        run(feeds)
        warm.append(time.perf_counter() - start)
        if start + warm[-1] - begin >= WARMUP_SECONDS:
            break
    per_run = max(float(np.median(warm)), 1e-7)
    chunk = max(1, int(PROGRESS_EVERY / per_run))
    pieces: list[np.ndarray] = []
    done, elapsed = 0, 0.0
    total = float(runs) if runs is not None else float(seconds or 0.0)
    while True:
        if runs is not None:
            left = runs - done
            if left <= 0:
                break
            count = min(chunk, left)
        else:
            left_s = (seconds or 0.0) - elapsed
            if left_s <= 0 and done:
                break
            count = max(1, min(chunk, int(left_s / per_run)))
        stamps = _stamps(run, feeds, count)
        pieces.append(np.diff(np.asarray(stamps)))
        elapsed += stamps[-1] - stamps[0]
        done += count
        if report is not None:
            report(float(done) if runs is not None else min(elapsed, total), total)
    return Latency.from_times(np.concatenate(pieces), elapsed)


# -- the bench -------------------------------------------------------------------------------------


def _check_budget(runs: int | None, seconds: float | None, batch: int | None) -> None:
    if runs is not None and seconds is not None:
        msg = f"give runs ({runs}) or seconds ({seconds}), not both: --runs N counts timed runs, --seconds S runs for S seconds"
        raise InputError(msg)
    if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
        msg = f"runs must be a positive whole number of timed runs, got {runs!r}"
        raise InputError(msg)
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0 or seconds == float("inf")):
        msg = f"seconds must be a positive, finite number of seconds to time runs for, got {seconds!r}"
        raise InputError(msg)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        msg = f"batch must be a positive whole number (the first input dimension), got {batch!r}"
        raise InputError(msg)


def _targets(devices: Sequence[str] | None, baseline: str | None) -> tuple[list[str], str]:
    reg = registry()
    if devices is None:
        ids = [d.id for d in reg.devices() if d.available]
    elif isinstance(devices, str):
        ids = [devices]
    else:
        ids = list(devices)
    ids = list(dict.fromkeys(ids))  # a device named twice is measured once
    if baseline is not None and baseline not in ids:
        ids.insert(0, baseline)  # the baseline is measured too, first
    if not ids:
        msg = "no device to bench: none is available (run `hal devices` to see why) and none was named"
        raise DeviceError(msg)
    for device_id in ids:  # an unknown id is the caller's mistake; discovery is over before timing
        reg.device(device_id, require_available=False)
    return ids, baseline if baseline is not None else ids[0]


def _one_device(
    compiled: CompiledModel,
    device_id: str,
    feeds: Mapping[str, Any],
    batch: int,
    runs: int | None,
    seconds: float | None,
    progress: Progress | None,
) -> tuple[DeviceBench, str | None]:
    def say(stage: str, done: float = 0.0, total: float = 0.0) -> None:
        if progress is not None:
            progress(device_id, stage, done, total)

    # The model object to() sees is fresh each time: nothing of an earlier placement in memory.
    def fresh() -> CompiledModel:
        return CompiledModel(compiled.model, compiled.manifest)

    memory = _PeakRss()
    root = tempfile.mkdtemp(prefix="hal-bench-cache-")
    exe = None
    try:
        with cache_root_at(root):
            try:
                say("cold to()")
                start = time.perf_counter()
                cold = fresh().to(device_id, strict=True)
                cold_to = time.perf_counter() - start
                report = cold.verification
                del cold
                gc.collect()
                say("warm to()")
                with memory:
                    start = time.perf_counter()
                    exe = fresh().to(device_id, strict=True)
                    warm_to = time.perf_counter() - start
                    say("warm-up")
                    latency = _time_runs(exe, feeds, runs, seconds,
                                         (lambda done, total: say("runs", done, total)) if progress else None)
            except (CompileError, UnavailableDeviceError) as exc:  # LoweringError, VerificationError too
                return DeviceBench(device_id, error=f"cannot take the model: {exc}"), None
            except RunError as exc:
                return DeviceBench(device_id, error=f"failed while running: {exc}"), None
        estimate, note = None, None
        try:
            estimate = exe.estimate(feeds)
        except DeviceError as exc:
            note = str(exc)
        return DeviceBench(
            device_id,
            cold_to=cold_to,
            warm_to=warm_to,
            latency=latency,
            throughput=batch * latency.runs / latency.elapsed if latency.elapsed > 0 else None,
            peak_memory=memory.peak,
            verification=report.status if report is not None else "off",
            verification_summary=report.summary() if report is not None else None,
            lowering=[f"{s.kind.value}: {s.detail}" for s in exe.lowering if s.kind not in _CHECKS],
            estimate=estimate,
            estimate_note=note,
        ), memory.method
    finally:
        del exe
        gc.collect()
        shutil.rmtree(root, ignore_errors=True)
        say("done")


#: Steps that record verification, shown in their own column rather than as lowering.
_CHECKS = (StepKind.VERIFIED, StepKind.UNVERIFIED)


def _relative(rows: list[DeviceBench], baseline: str) -> list[DeviceBench]:
    base = next(r for r in rows if r.device == baseline)
    out = []
    for r in rows:
        speed = base.latency.p50 / r.latency.p50 if base.latency and r.latency and r.latency.p50 > 0 else None
        est = (
            base.estimate.seconds / r.estimate.seconds
            if base.estimate and r.estimate and r.estimate.seconds > 0 else None
        )
        if r is base:  # exactly 1, whatever the floating point
            speed = 1.0 if speed is not None else None
            est = 1.0 if est is not None else None
        out.append(evolve(r, speed=speed, estimated_speed=est))
    return out


def bench(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto | Model | CompiledModel,
    devices: Sequence[str] | None = None,
    *,
    baseline: str | None = None,
    runs: int | None = None,
    seconds: float | None = None,
    batch: int | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Measure ``model`` on each of ``devices`` (ids; default: every available device) one after
    another, and estimate it where a device declares figures; see the module's documentation for
    what each figure is.

    ``baseline``: the device every figure is relative to (default: the first; one not among
    ``devices`` is measured first). ``runs`` timed runs (default :data:`DEFAULT_RUNS`) or
    ``seconds`` of them, not both. ``batch``: the first dimension of every input where it is
    symbolic (other symbolic dimensions are 1); an input with a different static first dimension
    is refused. Feeds are seeded (:func:`hal.testing.models.random_feeds`, seed 0).
    ``progress(device, stage, done, total)`` is called at each stage and at most every
    :data:`PROGRESS_EVERY` seconds while timing.

    Raises :class:`~hal.errors.InputError` for a bad budget, batch or feed,
    :class:`~hal.errors.UnknownDeviceError` for an id no plugin registered; a device that cannot
    take the model or fails while running gets a row with ``error`` instead.
    """
    _check_budget(runs, seconds, batch)
    if runs is None and seconds is None:
        runs = DEFAULT_RUNS
    ids, base = _targets(devices, baseline)
    compile_seconds = None
    if isinstance(model, CompiledModel):
        compiled = model
    else:
        start = time.perf_counter()
        compiled = compile_model(model)
        compile_seconds = time.perf_counter() - start
    feeds = _feeds(compiled.model.inputs, batch)
    first = next((a for a in feeds.values() if a.ndim), None)
    samples = batch if batch is not None else (int(first.shape[0]) if first is not None else 1)
    rows, method = [], None
    for device_id in ids:
        row, used = _one_device(compiled, device_id, feeds, samples, runs, seconds, progress)
        rows.append(row)
        method = method or used
    return BenchReport(
        model=compiled.model.name,
        digest=compiled.digest,
        baseline=base,
        batch=samples,
        feeds=[(name, str(a.dtype), tuple(int(d) for d in a.shape)) for name, a in feeds.items()],
        runs=runs,
        seconds=seconds,
        compile_seconds=compile_seconds,
        memory_method=method,
        rows=_relative(rows, base),
    )


# -- the chart ---------------------------------------------------------------------------------------


def plot(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """A bar chart of each device's speed relative to the baseline, measured and estimated side by
    side and labelled as such, written to ``path`` (its suffix names the format: ``.png``).

    Needs matplotlib (``pip install onnx-hal[plot]``): raises :class:`~hal.errors.HalError`
    saying so without it, :class:`~hal.errors.OutputPathError` when the file cannot be written.
    """
    figure_class = _figure_class()
    names = [r.device for r in report.rows]
    measured = [r.speed or 0.0 for r in report.rows]
    estimated = [r.estimated_speed or 0.0 for r in report.rows]
    width = 0.4
    xs = range(len(names))
    # The object API, not pyplot: no backend is switched and no global figure is kept.
    fig = figure_class(figsize=(max(6.0, 1.6 * len(names)), 4.5))
    ax = fig.subplots()
    bars = ax.bar([x - width / 2 for x in xs], measured, width, label="measured (p50)", color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "not measured" for v in measured], fontsize=8)
    bars = ax.bar([x + width / 2 for x in xs], estimated, width, label="estimated (roofline, not measured)",
                  color="tab:orange", hatch="//")
    ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "no estimate" for v in estimated], fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel(f"speed relative to {report.baseline} (x)")
    ax.set_title(f"{report.model}: speed relative to {report.baseline} (higher is faster)")
    ax.set_ylim(0, 1.3 * max([1.0, *measured, *estimated]))  # room for the labels and the legend
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(os.fspath(path))
    except (OSError, ValueError) as exc:
        msg = f"cannot write the chart to {os.fspath(path)}: {getattr(exc, 'strerror', None) or exc}"
        raise OutputPathError(msg) from None


def check_plot(path: str | os.PathLike[str]) -> None:
    """Raise now, before a long bench, what :func:`plot` would raise for lack of matplotlib or of
    a directory to write ``path`` in."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.isdir(os.fspath(path)) or not os.path.isdir(parent):
        what = "is a directory" if os.path.isdir(os.fspath(path)) else f"has no directory {parent}"
        msg = f"cannot write the chart to {os.fspath(path)}: it {what}; name a file such as bench.png in an existing directory"
        raise OutputPathError(msg)
    _figure_class()


def _figure_class() -> Any:
    """matplotlib's Figure, or a HalError naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        msg = "plotting needs matplotlib, which is not installed: pip install onnx-hal[plot] (or pip install matplotlib)"
        raise HalError(msg) from None
    return Figure
