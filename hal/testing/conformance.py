"""ONNX node conformance through the HAL.

Runs the node test cases that the ``onnx`` package defines in code
(:func:`onnx.backend.test.case.node.collect_testcases`, one small model per case with its inputs
and expected outputs) through :func:`hal.compile` and :meth:`hal.CompiledModel.to`, and compares
the outputs exactly as onnx's own backend test runner does (its ``assert_similar_outputs``, with
each case's ``rtol``/``atol``).

A *target* is a device id, prepared with ``strict=True`` so that the number is that device's own,
or ``"auto"``, the HAL's choice with its default fallback. Every case ends in one outcome per
target:

- ``pass``: every output matches;
- ``fail``: the model ran and an output differs (shape, element type or values);
- ``draw``: the model draws random numbers (Bernoulli, RandomUniform, ...) and its outputs have
  the expected shapes and element types, and values the draw can take (0 or 1 for Bernoulli),
  but not the case's values: the case holds one draw of numpy's generator, which no runtime
  reproduces (onnxruntime's own backend test list skips these cases for that reason);
- ``error``: the HAL refused the case with a :class:`~hal.errors.HalError` before running it
  (``hal.compile`` or ``to()``: the device or the HAL does not support it; a device refuses a
  case whose inputs or outputs are sequences or optionals unless it declares them in
  ``Capabilities.io_kinds``);
- ``crash``: anything else: the device accepted the model and then failed to run it
  (:class:`~hal.errors.RunError`), or an exception that is not a ``HalError``. The message says
  which, and ``CaseResult.hal_error`` is False for the latter (a bug: every failure a caller can
  meet must be a ``HalError``).

Inputs are fed as onnx's backend test runner reads them from a case's ``.pb`` files
(:func:`onnx.numpy_helper.to_array` of the serialized tensor) and read-only, as users have
them (``np.frombuffer``, ``np.load(..., mmap_mode="r")``): a runner that writes into its inputs
or frees a copy it still reads shows here. A sequence is fed as a list of such arrays, an absent
optional as None.

:func:`survey` runs a sample on several targets and :func:`summarize` reduces a result to what
``hal conformance`` prints: passed / wrong / errors per target and the most common reasons.

Example::

    from hal.testing import conformance

    cases = conformance.collect_cases(every=10)
    result = conformance.run(cases, ["ort:cpu", "auto"])
    result.counts("auto")        # {"pass": ..., "fail": ..., "error": ..., "crash": ...}

Compiled artifacts go where ``HAL_CACHE_DIR`` says; wrap a run in :func:`isolated_cache` to keep
a few thousand small entries out of a user's cache.

Cases run one after another in this process, with no time limit per case: over all 1884 cases
(onnx 1.23) the slowest took up to 1 s on onnxruntime, 0.3 s on OpenVINO and 5.4 s on IREE (whose
0.7 s average is its compiler's), and none crashed the process. ``CaseResult.seconds`` and
:meth:`ConformanceResult.slowest` show it again for other versions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

import hal
from hal.errors import HalError, RunError, VerificationError

if TYPE_CHECKING:
    import onnx
    from onnx.backend.test.case.test_case import TestCase

__all__ = [
    "OUTCOMES",
    "CaseResult",
    "ConformanceResult",
    "TargetSummary",
    "as_read",
    "collect_cases",
    "compare_outputs",
    "isolated_cache",
    "quiet_runtimes",
    "reason",
    "run",
    "run_case",
    "sample",
    "summarize",
    "survey",
]

#: Every outcome a case can have on a target, in report order.
OUTCOMES = ("pass", "fail", "draw", "error", "crash")

AUTO = "auto"


@frozen
class CaseResult:
    """One case on one target: the outcome, the device that ran it, the time and why."""

    case: str
    target: str
    outcome: str
    seconds: float
    device: str | None = None  # the device that prepared the model (auto's choice), if any
    message: str = ""
    hal_error: bool = True  # False: an exception that is not a HalError ended the case (a bug)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "target": self.target,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 4),
            "device": self.device,
            "message": self.message,
            "hal_error": self.hal_error,
        }


@frozen
class ConformanceResult:
    """Outcomes of a run: ``results[target][case]`` is a :class:`CaseResult`."""

    targets: tuple[str, ...]
    cases: tuple[str, ...]
    results: Mapping[str, Mapping[str, CaseResult]] = field(repr=False)

    def outcomes(self, target: str, cases: Iterable[str] | None = None) -> dict[str, str]:
        """``{case: outcome}`` for ``target``, over ``cases`` (default: every case it ran)."""
        ran = self.results[target]
        names = ran if cases is None else cases
        return {name: ran[name].outcome for name in names}

    def counts(self, target: str, cases: Iterable[str] | None = None) -> dict[str, int]:
        """How many cases ended in each outcome on ``target`` (over ``cases`` if given)."""
        counts = dict.fromkeys(OUTCOMES, 0)
        for outcome in self.outcomes(target, cases).values():
            counts[outcome] += 1
        return counts

    def passed(self, target: str) -> frozenset[str]:
        """The cases ``target`` passed."""
        return frozenset(n for n, r in self.results[target].items() if r.outcome == "pass")

    def seconds(self, target: str) -> float:
        """Total time spent on ``target`` (preparing and running, not ``hal.compile``)."""
        return sum(r.seconds for r in self.results[target].values())

    def slowest(self, target: str, n: int = 5) -> list[CaseResult]:
        return sorted(self.results[target].values(), key=lambda r: r.seconds, reverse=True)[:n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "cases": list(self.cases),
            "counts": {t: self.counts(t) for t in self.targets},
            "seconds": {t: round(self.seconds(t), 3) for t in self.targets},
            "results": {t: [r.to_dict() for r in self.results[t].values()] for t in self.targets},
        }


# -- cases ---------------------------------------------------------------------------------------


def collect_cases(*, every: int = 1, offset: int = 0) -> list[TestCase]:
    """onnx's node test cases sorted by name, or every ``every``-th of them from ``offset``.

    Generating them runs onnx's reference code for each case: about 10 s, once per process.
    """
    return sample(_all_cases(), every=every, offset=offset)


def sample(cases: Sequence[TestCase], *, every: int, offset: int = 0) -> list[TestCase]:
    """A deterministic sample: every ``every``-th case by sorted name, starting at ``offset``."""
    if every < 1:
        msg = f"every must be at least 1, got {every}"
        raise ValueError(msg)
    return sorted(cases, key=lambda c: c.name)[offset % every :: every]


def _all_cases() -> list[TestCase]:
    return list(_generated_cases())


@functools.cache
def _generated_cases() -> tuple[TestCase, ...]:
    """Generated once per process: the kit and the core's tests may both ask in one session."""
    from onnx.backend.test.case.node import collect_testcases

    # Generating the cases computes their expected outputs, with numpy warnings (overflow in
    # casts, division by zero) that some cases exercise on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(collect_testcases())


def _normalize(value: Any) -> Any:
    """The runner's ``_normalize_tensor``: cases may hold TensorProto values."""
    import onnx
    from onnx import numpy_helper

    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return value


def as_read(value: Any) -> Any:
    """``value`` as onnx's backend test runner reads it from a case's ``.pb`` file, read-only.

    The runner reads inputs with :func:`onnx.numpy_helper.to_array`, which gives read-only views
    of the file's bytes for most element types; here every array is made read-only, so a backend
    that writes into its inputs, or copies them and frees the copy too early, shows. A sequence
    (a list) is read element by element; None (an absent optional) stays None.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if isinstance(value, onnx.TensorProto):
        array = numpy_helper.to_array(value)
    elif isinstance(value, (np.ndarray, np.generic)):
        array = numpy_helper.to_array(numpy_helper.from_array(np.asarray(value)))
    elif isinstance(value, (list, tuple)):
        return [as_read(item) for item in value]
    else:
        return value  # None, or what the HAL does not pass (maps), as it is
    array = array.view()
    array.flags.writeable = False
    return array


# -- comparison ----------------------------------------------------------------------------------


def compare_outputs(expected: Sequence[Any], actual: Sequence[Any], *, rtol: float, atol: float) -> None:
    """Raise AssertionError unless ``actual`` matches ``expected`` by onnx's backend test rules.

    This is onnx's own ``Runner.assert_similar_outputs`` (same shapes and element types;
    ``np.testing.assert_allclose`` with ``rtol``/``atol``; object and string arrays compared
    exactly; bfloat16 compared in float32 with two ulps of ``rtol``), with sequences held to the
    same length and compared element by element (onnx's runner takes the actual's length and
    walks arrays inside a list row by row) and an absent optional (None) equal only to None.
    """
    from onnx.backend.test.runner import Runner

    def plain(value: Any) -> bool:
        return value is not None and not isinstance(value, (list, tuple))

    if len(expected) != len(actual) or all(plain(v) for v in (*expected, *actual)):
        Runner.assert_similar_outputs(list(expected), list(actual), rtol, atol)
        return
    for index, (want, got) in enumerate(zip(expected, actual)):
        if plain(want) and plain(got):
            Runner.assert_similar_outputs([want], [got], rtol, atol)
        elif want is None or got is None:
            if want is not got:
                shown = "absent" if got is None else f"a {type(got).__name__}"
                msg = f"output {index} is {shown}, expected {'None (absent)' if want is None else 'a value'}"
                raise AssertionError(msg)
        elif not (isinstance(want, (list, tuple)) and isinstance(got, (list, tuple))):
            msg = f"output {index} is a {type(got).__name__}, expected a {type(want).__name__}"
            raise AssertionError(msg)
        elif len(want) != len(got):
            msg = f"output {index} is a sequence of {len(got)} elements, expected {len(want)}"
            raise AssertionError(msg)
        else:
            Runner.assert_similar_outputs([_normalize(w) for w in want], list(got), rtol, atol)


# -- running -------------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated_cache() -> Iterator[str]:
    """Point ``HAL_CACHE_DIR`` at a fresh temporary directory for the block, then remove it."""
    before = os.environ.get("HAL_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="hal-conformance-") as path:
        os.environ["HAL_CACHE_DIR"] = path
        try:
            yield path
        finally:
            if before is None:
                os.environ.pop("HAL_CACHE_DIR", None)
            else:
                os.environ["HAL_CACHE_DIR"] = before


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


#: How ``to()`` verifies a case's model: the HAL's default (seeded inputs), with the case's own
#: inputs as ``example=`` (what a user with real inputs does), also each new input shape at its
#: first run (``verify="each-shape"``: under ``auto`` a wrong shape moves to the next device), or not.
VERIFY_MODES = ("seeded", "case", "each-shape", "off")


def verify_option(mode: str | bool | None) -> bool | str | None:
    """``mode`` (one of :data:`VERIFY_MODES`, or None/True/False/"each-shape" as ``to()`` takes
    them) as :func:`run` takes it; raises :class:`~hal.errors.InputError` for anything else."""
    from hal.errors import InputError

    options: dict[Any, bool | str | None] = {None: None, True: None, "seeded": None, "case": "case",
                                              "each-shape": "each-shape", False: False, "off": False}
    try:
        return options[mode]
    except (KeyError, TypeError):
        msg = f"verify={mode!r} is not one of {', '.join(VERIFY_MODES)}"
        raise InputError(msg) from None


def _prepare(
    compiled: hal.CompiledModel,
    target: str,
    verify: bool | str | None,
    example: dict[str, Any] | None = None,
    reduced_precision: bool = False,
) -> hal.Executable:
    options: dict[str, Any] = {} if verify is None else {"verify": verify}
    if verify == "case":
        options = {"verify": True, "example": example}
    if reduced_precision:
        options["reduced_precision"] = True
    if target == AUTO:
        return compiled.to(AUTO, **options)
    return compiled.to(target, strict=True, fallback=None, **options)


def _run_target(
    case: TestCase,
    compiled: hal.CompiledModel,
    target: str,
    feeds_list: list[dict[str, Any]],
    expected_list: list[list[Any]],
    output_names: list[str],
    verify: bool | str | None,
    reduced_precision: bool = False,
) -> CaseResult:
    start = time.perf_counter()

    def result(outcome: str, message: str = "", device: str | None = None, *, hal_error: bool = True) -> CaseResult:
        return CaseResult(case.name, target, outcome, time.perf_counter() - start, device, message, hal_error)

    try:
        exe = _prepare(compiled, target, verify, feeds_list[0] if feeds_list else None, reduced_precision)
    except HalError as exc:
        return result("error", _first_line(exc))
    except Exception as exc:  # noqa: BLE001 - a HAL bug must show as a crash, not stop the run
        return result("crash", f"in to(): {_first_line(exc)}", hal_error=False)
    device = exe.device.id
    for feeds, expected in zip(feeds_list, expected_list):
        try:
            outputs = exe.run(feeds)
        except RunError as exc:
            return result("crash", _first_line(exc), device)
        except VerificationError as exc:  # verify="each-shape" refused the device's answer: a refusal
            return result("error", _first_line(exc), device)
        except HalError as exc:  # an InputError for feeds the case's own model declares
            return result("crash", f"in run(): {_first_line(exc)}", device)
        except Exception as exc:  # noqa: BLE001 - as above
            return result("crash", f"in run(): {_first_line(exc)}", device, hal_error=False)
        actual = [outputs[n] for n in output_names]
        try:
            compare_outputs(expected, actual, rtol=case.rtol, atol=case.atol)
        except Exception as exc:  # noqa: BLE001 - the comparison's TypeErrors are mismatches too
            from hal.verification import random_operators

            random = random_operators(case.model)
            if random and _a_draw(random, expected, actual):
                return result("draw", f"{', '.join(random)}: one draw, not the case's ({_first_line(exc)})", device)
            return result("fail", _first_line(exc), device)
    return result("pass", device=device)


def _a_draw(random: Sequence[str], expected: Sequence[Any], actual: Sequence[Any]) -> bool:
    """Whether ``actual`` could be a draw of the model whose case expects ``expected``: the
    same shapes and element types, finite, and 0 or 1 where Bernoulli is the only random
    operator. Sequences and optionals are not drawn by any node case: never a draw."""
    import numpy as np

    for want, got in zip(expected, actual):
        if not isinstance(want, np.ndarray) or not isinstance(got, np.ndarray):
            return False
        if want.shape != got.shape or want.dtype != got.dtype:
            return False
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            return False
        if list(random) == ["Bernoulli"] and not np.isin(got, (0, 1)).all():
            return False
    return True


def run_case(
    case: TestCase, targets: Sequence[str], *, verify: bool | str | None = None, reduced_precision: bool = False
) -> dict[str, CaseResult]:
    """Run one case on each target: compiled once with :func:`hal.compile`, then ``to(target)``.

    ``verify`` is passed to ``to()`` when given (None: the HAL's default); ``"case"`` verifies
    with the case's own first inputs (``example=``). ``reduced_precision`` is passed to ``to()``:
    the caller lets each device compute in a narrower format (verified with the reduced
    tolerances), as a user who asks for it does."""
    verify = verify_option(verify)
    start = time.perf_counter()

    def everywhere(outcome: str, message: str) -> dict[str, CaseResult]:
        elapsed = time.perf_counter() - start
        return {t: CaseResult(case.name, t, outcome, elapsed, None, message) for t in targets}

    try:
        compiled = hal.compile(case.model)
    except HalError as exc:
        return everywhere("error", f"hal.compile: {_first_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - a HAL bug must show as a crash, not stop the run
        elapsed = time.perf_counter() - start
        message = f"hal.compile: {_first_line(exc)}"
        return {t: CaseResult(case.name, t, "crash", elapsed, None, message, False) for t in targets}
    initializers = {t.name for t in case.model.graph.initializer}
    input_names = [v.name for v in case.model.graph.input if v.name not in initializers]
    output_names = [v.name for v in case.model.graph.output]
    feeds_list = [{n: as_read(v) for n, v in zip(input_names, inputs)} for inputs, _ in case.data_sets]
    expected_list = [[_normalize(v) for v in outputs] for _, outputs in case.data_sets]
    return {
        t: _run_target(case, compiled, t, feeds_list, expected_list, output_names, verify, reduced_precision)
        for t in targets
    }


def run(
    cases: Iterable[TestCase],
    targets: Sequence[str] | Mapping[str, Iterable[str] | None],
    *,
    progress: Callable[[int, TestCase, dict[str, CaseResult]], None] | None = None,
    verify: bool | str | None = None,
    reduced_precision: bool = False,
) -> ConformanceResult:
    """Run ``cases`` on ``targets``.

    ``targets`` is a list of device ids and ``"auto"``, or a mapping from target to the names
    of the cases it should run (``None``: all), so slow devices can run a sample while the
    others run everything; a case is compiled once for all the targets that run it.
    ``progress(index, case, results)`` is called after each case. ``verify``: one of
    :data:`VERIFY_MODES` (None: the HAL's default, seeded inputs, which is what users get).
    ``reduced_precision``: see :func:`run_case`.
    """
    verify = verify_option(verify)
    wanted: dict[str, frozenset[str] | None] = (
        {t: None if names is None else frozenset(names) for t, names in targets.items()}
        if isinstance(targets, Mapping)
        else dict.fromkeys(targets)
    )
    results: dict[str, dict[str, CaseResult]] = {t: {} for t in wanted}
    names: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy and runtime warnings that cases provoke on purpose
        for index, case in enumerate(cases):
            names.append(case.name)
            these = [t for t, only in wanted.items() if only is None or case.name in only]
            if not these:
                continue
            outcome = run_case(case, these, verify=verify, reduced_precision=reduced_precision)
            for target, res in outcome.items():
                results[target][case.name] = res
            if progress is not None:
                progress(index, case, outcome)
    return ConformanceResult(tuple(wanted), tuple(names), results)


# -- the table `hal conformance` prints ----------------------------------------------------------

#: What ``CaseResult.message`` says that differs from case to case (values, names, sizes), and the
#: core's wording around a device's own refusal; dropped so that equal reasons count together.
_STRICT_PREFIX = re.compile(r"^(\w+): \S+ cannot run the model(?: \(operators: [^)]*\))? and \S+ forbids moving it elsewhere: ")
#: auto's refusal lists every device's reason; the first (the best-ranked device's) stands for it.
_AUTO_PREFIX = re.compile(r"^(\w+): no device could compile '[^']*': (?:\S+: )?([^;]*).*$")
_DEVICE_ID = re.compile(r"(?<![\w:/.-])[a-z][\w.-]*:[A-Za-z0-9][\w.-]*(?!\w)")
_QUOTED = re.compile(r"(?<!\w)'[^'\n]*'(?!\w)|\"[^\"\n]*\"")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")
_REASON_LENGTH = 160


def reason(result: CaseResult) -> str:
    """Why a case did not pass, worded so that the same cause on other cases reads the same:
    the outcome (``wrong`` or ``error``), then the first line of the message with quoted names,
    numbers and the device id replaced. Empty for a pass."""
    if result.outcome == "pass":
        return ""
    text = _AUTO_PREFIX.sub(r"\1: \2", _STRICT_PREFIX.sub(r"\1: ", result.message))
    text = _NUMBER.sub("N", _QUOTED.sub("'…'", _DEVICE_ID.sub("<device>", text)))
    if len(text) > _REASON_LENGTH:
        text = text[: _REASON_LENGTH - 1] + "…"
    word = {"fail": "wrong", "draw": "a draw"}.get(result.outcome, "error")
    return f"{word}: {text}"


@frozen
class TargetSummary:
    """One target's line of ``hal conformance``: ``errors`` counts refusals and failures to run
    (outcomes ``error`` and ``crash``), ``wrong`` the cases that ran and answered wrong, ``draws``
    those whose answer is a random draw other than the case's (outcome ``draw``)."""

    device: str
    total: int
    passed: int
    wrong: int
    errors: int
    reasons: tuple[tuple[str, int], ...]  # the most common reasons, most frequent first
    draws: int = 0
    every: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "total": self.total,
            "passed": self.passed,
            "wrong": self.wrong,
            "errors": self.errors,
            "draws": self.draws,
            "reasons": [{"reason": r, "count": n} for r, n in self.reasons],
            "every": self.every,
            "seconds": round(self.seconds, 1),
        }


def summarize(result: ConformanceResult, *, top: int = 5, every: int = 1) -> list[TargetSummary]:
    """One :class:`TargetSummary` per target of ``result``, with its ``top`` reasons."""
    out = []
    for target in result.targets:
        counts = result.counts(target)
        reasons = Counter(reason(r) for r in result.results[target].values() if r.outcome != "pass")
        out.append(
            TargetSummary(
                device=target,
                total=sum(counts.values()),
                passed=counts["pass"],
                wrong=counts["fail"],
                errors=counts["error"] + counts["crash"],
                reasons=tuple(reasons.most_common(top)),
                draws=counts["draw"],
                every=every,
                seconds=result.seconds(target),
            )
        )
    return out


@contextlib.contextmanager
def quiet_runtimes() -> Iterator[None]:
    """Silence what thousands of refused cases would print: the HAL's fallback WARNINGs and
    onnxruntime's own error log lines. Outcomes and messages are in the result anyway."""
    hal_log = logging.getLogger("hal")
    level = hal_log.level
    hal_log.setLevel(logging.ERROR)
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a dependency of onnx-hal
        onnxruntime = None
    if onnxruntime is not None:
        onnxruntime.set_default_logger_severity(4)
    try:
        yield
    finally:
        hal_log.setLevel(level)
        if onnxruntime is not None:
            onnxruntime.set_default_logger_severity(2)  # onnxruntime's default, WARNING


def survey(
    targets: Sequence[str] | None = None,
    *,
    every: int = 1,
    top: int = 5,
    verify: bool | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[TargetSummary]:
    """Run every ``every``-th node case on ``targets`` and summarize, in a fresh compile cache.

    ``targets``: device ids and ``"auto"``; default every available device, then ``"auto"``.
    An unknown or unavailable device raises a :class:`~hal.errors.DeviceError` before anything
    runs. ``progress(done, total)`` is called after each case. This is ``hal conformance``.
    """
    from hal._plugins import registry

    if targets is None:
        targets = [d.id for d in hal.devices() if d.available] + [AUTO]
    for target in targets:
        if target != AUTO:
            registry().device(target)  # raises UnknownDeviceError / UnavailableDeviceError
    cases = collect_cases(every=every)
    with isolated_cache(), quiet_runtimes():
        result = run(
            cases,
            list(dict.fromkeys(targets)),
            verify=verify,
            progress=None if progress is None else lambda i, _case, _res: progress(i + 1, len(cases)),
        )
    return summarize(result, top=top, every=every)
