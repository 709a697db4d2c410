"""Verification: a device's answers checked against a reference before anyone relies on them.

A backend's success is not proof of a right answer. :meth:`hal.CompiledModel.to` runs the lowered
model once on the device and once on a *reference* with the same seeded inputs and compares every
output; a device that disagrees beyond the tolerance is refused with a
:class:`~hal.errors.VerificationError` (and skipped under ``auto``, a device list or a fallback).

The reference is the ONNX reference evaluator (:class:`onnx.reference.ReferenceEvaluator`, which
defines what each operator means) when its estimated cost for the model fits the budget
(``HAL_VERIFY_BUDGET_S``, default 0.5 s) and it finishes within four times that; otherwise the
embedded ``ort:cpu`` device. A device is never verified against itself: when ``ort:cpu`` is
the device and the evaluator cannot run the model within the budget, the model is left
unverified and the step says so.

Tolerances, per output element type (:data:`TOLERANCES`), are normwise: an output passes when
``max|actual - expected| <= atol + rtol * max|expected|`` over its finite elements, with NaN and
infinities in the same places and the same shape and element type. Integers, booleans and strings
must match exactly. With ``reduced_precision=True`` float32 and float64 outputs get bfloat16's
tolerance, since the device may compute them in a narrower format. A sequence output passes when it has as many elements as
the reference's and each passes so; an optional one when both are absent or both pass.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from attrs import field, frozen

from hal.capabilities import NumberFormat, ValueKind
from hal.errors import HalError, InputError, RunError, VerificationError, first_line

if TYPE_CHECKING:
    import onnx

    from hal.model import TensorInfo

__all__ = [
    "TOLERANCES",
    "DisputedShape",
    "OutputCheck",
    "Reference",
    "Tolerance",
    "ShapeCheckedRunner",
    "VerificationReport",
    "compare",
    "judge",
    "positive_inputs",
    "random_operators",
    "seeded_feeds",
    "shape_signature",
    "tolerance_for",
]

log = logging.getLogger("hal.verification")

REFERENCE_EVALUATOR = "onnx-reference"


@frozen
class Tolerance:
    """Normwise tolerance: ``max|actual - expected| <= atol + rtol * max|expected|``."""

    rtol: float
    atol: float

    def to_dict(self) -> dict[str, float]:
        return {"rtol": self.rtol, "atol": self.atol}


_EXACT = Tolerance(0.0, 0.0)

#: Tolerance per output element type. Float formats allow a few units in the last place of the
#: format, scaled by the output's largest magnitude: runtimes sum in different orders, and a deep
#: model accumulates that. Formats absent here (integers, bool, string) must match exactly, and so
#: must float8 e8m0: its values are powers of two made by a rounding rule (Cast's ``round_mode``),
#: and one step off is twice or half the scale (OpenVINO's CPU plugin rounds 1.1 to 1, not 2,
#: under ``round_mode="up"``; a normwise tolerance hid it below the output's largest element).
TOLERANCES: dict[NumberFormat, Tolerance] = {
    NumberFormat.FLOAT64: Tolerance(1e-9, 1e-12),
    NumberFormat.FLOAT32: Tolerance(1e-4, 1e-6),
    NumberFormat.FLOAT16: Tolerance(1e-2, 1e-4),
    NumberFormat.BFLOAT16: Tolerance(3e-2, 1e-3),
    NumberFormat.FLOAT8_E4M3FN: Tolerance(0.125, 1e-2),
    NumberFormat.FLOAT8_E4M3FNUZ: Tolerance(0.125, 1e-2),
    NumberFormat.FLOAT8_E5M2: Tolerance(0.25, 1e-2),
    NumberFormat.FLOAT8_E5M2FNUZ: Tolerance(0.25, 1e-2),
    NumberFormat.FLOAT4_E2M1: Tolerance(0.5, 0.25),
}


def tolerance_for(fmt: NumberFormat, *, reduced_precision: bool = False) -> Tolerance:
    """The tolerance an output of ``fmt`` is checked with (see :data:`TOLERANCES`).

    With ``reduced_precision`` float32 and float64 outputs get bfloat16's: the caller let the
    device compute them in a narrower format (OpenVINO's CPU plugin computes float64 in float32,
    and float32 in bfloat16 where the CPU has it)."""
    if reduced_precision and fmt in (NumberFormat.FLOAT32, NumberFormat.FLOAT64):
        return TOLERANCES[NumberFormat.BFLOAT16]
    return TOLERANCES.get(fmt, _EXACT)


@frozen
class OutputCheck:
    """One output compared: the largest absolute and relative (to the output's largest
    magnitude) error, the tolerance, and why it failed if it did."""

    name: str
    passed: bool
    max_abs: float
    max_rel: float
    tolerance: Tolerance
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "rtol": self.tolerance.rtol,
            "atol": self.tolerance.atol,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputCheck:
        return cls(
            str(data["name"]), bool(data["passed"]), float(data["max_abs"]), float(data["max_rel"]),
            Tolerance(float(data["rtol"]), float(data["atol"])), data.get("reason"),
        )

    def describe(self) -> str:
        if self.reason:
            return f"output {self.name!r}: {self.reason}"
        verdict = "within" if self.passed else "exceeds"
        return (
            f"output {self.name!r}: max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g} "
            f"({verdict} rtol={self.tolerance.rtol:g}, atol={self.tolerance.atol:g})"
        )


@frozen
class VerificationReport:
    """A device's outputs against the reference's: ``status`` is ``passed``, ``failed`` or
    ``skipped`` (no reference could run the model; ``detail`` says why)."""

    device: str
    status: str
    reference: str | None = None
    checks: tuple[OutputCheck, ...] = field(default=(), converter=tuple)
    detail: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def disputed(self) -> bool:
        """The ONNX reference evaluator disagreed with the device and no third opinion settled it
        (the device is ``ort:cpu``, the evaluator's second opinion): unverified, not refused."""
        return self.status == "skipped" and (self.detail or "").startswith("disputed")

    def summary(self) -> str:
        if self.status == "skipped":
            return f"not verified: {self.detail}"
        if self.status == "error":
            return f"{self.device}: {self.detail}"
        worst = max(self.checks, key=lambda c: (not c.passed, c.max_rel), default=None)
        shown = worst.describe() if worst is not None else "no outputs"
        word = "matches" if self.passed else "does not match"
        return f"{self.device} {word} {self.reference}: {shown}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "status": self.status,
            "reference": self.reference,
            "checks": [c.to_dict() for c in self.checks],
            "detail": self.detail,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VerificationReport:
        return cls(
            str(data["device"]), str(data["status"]), data.get("reference"),
            tuple(OutputCheck.from_dict(c) for c in data.get("checks", ())),
            data.get("detail"), float(data.get("seconds", 0.0)),
        )

    def error(self) -> VerificationError:
        """The :class:`VerificationError` for a failed report, naming the worst output."""
        failed = [c for c in self.checks if not c.passed]
        parts = "; ".join(c.describe() for c in failed) or self.detail or "outputs differ"
        msg = (
            f"{self.device} answers differently from {self.reference}: {parts}. The device is not "
            "used; place the model elsewhere, or pass verify=False to accept it unchecked"
        )
        error = VerificationError(msg)
        error.report = self
        return error


# -- seeded inputs -------------------------------------------------------------------------------

#: Sizes given to dynamic dimensions: the leading (batch) axis gets 1, the others 16 — small, but
#: large enough for a few stride-2 stages. Pass real inputs as ``example=`` where they matter.
BATCH_SIZE = 1
DYNAMIC_SIZE = 16
#: Elements in a seeded sequence: more than one, so that an element's index matters.
SEQUENCE_LENGTH = 2


def seeded_feeds(
    inputs: Sequence[TensorInfo],
    *,
    seed: int = 0,
    example: Mapping[str, Any] | None = None,
    positive: Collection[str] = (),
) -> dict[str, Any]:
    """One value per input, drawn from ``seed``, or taken from ``example`` where given.

    Floats are uniform in [-1, 1) (rounded to the format), integers in [0, 2) so that they index
    any non-empty axis, booleans fair coin flips, strings short words; the float inputs named in
    ``positive`` (:func:`positive_inputs`) are in [0.5, 1.5). A symbolic dimension gets
    one size everywhere it appears (from ``example`` where an example input fixes it). A sequence
    gets :data:`SEQUENCE_LENGTH` arrays of its element's shape; an optional is present.
    """
    example = dict(example or {})
    unknown = sorted(set(example) - {i.name for i in inputs})
    if unknown:
        msg = f"example inputs {unknown} are not inputs of the model; its inputs are {[i.name for i in inputs]}"
        raise InputError(msg)
    symbols: dict[str, int] = {}
    for info in inputs:
        given = example.get(info.name)
        if given is None or info.shape is None:
            continue
        if info.kind.is_sequence:  # the first element fixes the element's symbols
            if not isinstance(given, (list, tuple)) or not given:
                continue
            given = given[0]
        for d, size in zip(info.shape, np.shape(given)):
            if isinstance(d, str) and d:
                symbols.setdefault(d, int(size))
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for info in inputs:
        if info.name in example:
            given = example[info.name]
            if given is None or not info.kind.is_sequence or not isinstance(given, (list, tuple)):
                feeds[info.name] = given if given is None else np.asarray(given)
            else:
                feeds[info.name] = [np.asarray(item) for item in given]
            continue
        shape = tuple(
            d if isinstance(d, int) and d >= 0  # a declared 0 is a static empty axis, not unknown
            else symbols.setdefault(d, BATCH_SIZE if axis == 0 else DYNAMIC_SIZE) if isinstance(d, str) and d
            else (BATCH_SIZE if axis == 0 else DYNAMIC_SIZE)
            for axis, d in enumerate(info.shape or ())
        )
        if info.kind.is_sequence:
            feeds[info.name] = [_random(info.format, shape, rng) for _ in range(SEQUENCE_LENGTH)]
        else:
            feeds[info.name] = _random(info.format, shape, rng, positive=info.name in positive)
    return feeds


def positive_inputs(proto: onnx.ModelProto) -> frozenset[str]:
    """Graph inputs the model casts to float8 e8m0 (Cast or CastLike), whose negative values
    ONNX leaves undefined: seeded inputs for them are drawn positive, so that verification
    compares defined answers (onnxruntime and the evaluator differ on negative ones)."""
    import onnx as _onnx

    e8m0 = _onnx.TensorProto.FLOAT8E8M0
    names = {i.name for i in proto.graph.input}
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input if i.type.HasField("tensor_type")}
    found: set[str] = set()
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] not in names:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        if node.op_type == "CastLike" and len(node.input) > 1:
            to = types.get(node.input[1])
        if to == e8m0:
            found.add(node.input[0])
    return frozenset(found)


def shape_signature(feeds: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The shapes of ``feeds``, by input name, as a hashable key: an array's shape, a sequence's
    tuple of its elements' shapes (in a list, to tell it from an array's), None for an absent
    optional."""

    def shape(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return ("sequence", tuple(tuple(np.shape(item)) for item in value))
        return tuple(np.shape(value))

    return tuple(sorted((name, shape(value)) for name, value in feeds.items()))


def _random(fmt: NumberFormat, shape: tuple[int, ...], rng: np.random.Generator, *, positive: bool = False) -> np.ndarray:
    dtype = fmt.dtype
    if fmt is NumberFormat.STRING:
        return rng.choice(np.array(["a", "bc", "def"], dtype=object), shape)
    if fmt is NumberFormat.BOOL:
        return rng.random(shape) < 0.5
    if fmt.is_float or np.issubdtype(dtype, np.complexfloating):
        # Uniform in [-1, 1): inside every format's range, and casts to narrow integers stay in
        # range (out-of-range casts are undefined, and runtimes differ there on purpose).
        values = rng.uniform(-1.0, 1.0, shape)
        if positive or fmt is NumberFormat.FLOAT8_E8M0:
            values = np.abs(values) + 0.5  # e8m0 holds positive powers of two only, and casts to it of others are undefined
        return values.astype(np.float32).astype(dtype)
    return rng.integers(0, 2, shape).astype(dtype)


# -- comparison ----------------------------------------------------------------------------------


def compare(
    actual: Mapping[str, Any],
    expected: Mapping[str, Any],
    outputs: Sequence[TensorInfo],
    *,
    reduced_precision: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
) -> tuple[OutputCheck, ...]:
    """Compare every declared output; ``rtol``/``atol`` override the per-type tolerances.

    A sequence is compared element by element (the check reports the worst element), an
    optional as absent in both or as a tensor."""
    checks = []
    for info in outputs:
        tol = tolerance_for(info.format, reduced_precision=reduced_precision)
        if rtol is not None or atol is not None:
            tol = Tolerance(tol.rtol if rtol is None else rtol, tol.atol if atol is None else atol)
        name = info.name
        if name not in actual:
            checks.append(OutputCheck(name, False, math.inf, math.inf, tol, "missing from the device's outputs"))
        elif name not in expected:
            checks.append(OutputCheck(name, False, math.inf, math.inf, tol, "missing from the reference's outputs"))
        elif info.kind is ValueKind.TENSOR:
            checks.append(_compare_one(name, actual[name], expected[name], tol))
        else:
            checks.append(_compare_value(name, info.kind, actual[name], expected[name], tol))
    return tuple(checks)


def _compare_value(name: str, kind: ValueKind, got: Any, want: Any, tol: Tolerance) -> OutputCheck:
    """A sequence or optional output: absent in both, or every element within ``tol``."""

    def fail(reason: str) -> OutputCheck:
        return OutputCheck(name, False, math.inf, math.inf, tol, reason)

    if got is None or want is None:
        if got is None and want is None and kind.is_optional:
            return OutputCheck(name, True, 0.0, 0.0, tol)
        if not kind.is_optional:
            who = "device" if got is None else "reference"
            return fail(f"None from the {who}, where the model declares a {kind.value}")
        return fail("absent, where the reference's is present" if got is None else "present, where the reference's is absent")
    if not kind.is_sequence:
        return _compare_one(name, got, want, tol)
    if not isinstance(got, (list, tuple)) or not isinstance(want, (list, tuple)):
        return fail(f"a {type(got).__name__}, the reference gives a {type(want).__name__}; a sequence is a list")
    if len(got) != len(want):
        return fail(f"{len(got)} elements, the reference gives {len(want)}")
    checks = [_compare_one(f"{name}[{i}]", g, w, tol) for i, (g, w) in enumerate(zip(got, want))]
    if not checks:
        return OutputCheck(name, True, 0.0, 0.0, tol)
    worst = max(checks, key=lambda c: (not c.passed, c.max_rel))
    reason = None
    if not worst.passed:  # the element's own reason, or its errors against the tolerance
        reason = f"element {checks.index(worst)}: {worst.reason or worst.describe().split(': ', 1)[1]}"
    max_abs, max_rel = max(c.max_abs for c in checks), max(c.max_rel for c in checks)
    return OutputCheck(name, all(c.passed for c in checks), max_abs, max_rel, worst.tolerance, reason)


def _compare_one(name: str, got: Any, want: Any, tol: Tolerance) -> OutputCheck:
    def fail(reason: str) -> OutputCheck:
        return OutputCheck(name, False, math.inf, math.inf, tol, reason)

    if got is None:
        return fail("missing from the device's outputs")
    if want is None:
        return fail("missing from the reference's outputs")
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype.kind in "OUS" and want.dtype.kind in "OUS":  # strings: numpy keeps them as object or <U
        got, want = got.astype(str).astype(object), want.astype(str).astype(object)
    if got.shape != want.shape:
        return fail(f"shape {list(got.shape)}, the reference gives {list(want.shape)}")
    if got.dtype != want.dtype:
        return fail(f"element type {got.dtype}, the reference gives {want.dtype}")
    if got.size == 0:
        return OutputCheck(name, True, 0.0, 0.0, tol)
    # ml_dtypes' floats (bfloat16, float8, e8m0) are kind "V": their tolerance is the table's too.
    if got.dtype == object or not _is_numeric_float(got.dtype):
        same = bool(np.array_equal(got, want))
        mismatched = 0 if same else int(np.count_nonzero(got != want))
        return OutputCheck(name, same, 0.0 if same else math.inf, 0.0 if same else math.inf, _EXACT,
                           None if same else f"{mismatched} of {got.size} elements differ (exact match required)")
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    g_nan, w_nan = np.isnan(g), np.isnan(w)
    if not np.array_equal(g_nan, w_nan):
        return fail(f"NaN in {int(np.count_nonzero(g_nan != w_nan))} places where the reference has none (or the reverse)")
    g_inf, w_inf = np.isinf(g), np.isinf(w)
    if not np.array_equal(np.where(g_inf, g, 0), np.where(w_inf, w, 0)):
        return fail(f"infinities differ in {int(np.count_nonzero(g_inf != w_inf) or np.count_nonzero(g_inf))} places")
    finite = ~(w_nan | w_inf)
    if not finite.any():
        return OutputCheck(name, True, 0.0, 0.0, tol)
    diff = np.abs(g[finite] - w[finite])
    scale = float(np.max(np.abs(w[finite])))
    max_abs = float(diff.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = max_abs <= tol.atol + tol.rtol * scale
    return OutputCheck(name, passed, max_abs, max_rel, tol)


def _empty(value: Any) -> bool:
    """An output that holds no element: an empty array, or a sequence of none or only empty ones
    (an absent optional is an answer, not an empty one)."""
    if value is None:
        return False
    if isinstance(value, (list, tuple)):
        return all(np.size(item) == 0 for item in value)
    return np.size(value) == 0


def _shown_shape(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a sequence of {len(value)}" + (f" shaped {tuple(np.shape(value[0]))}" if value else "")
    return str(tuple(np.shape(value)))


def _is_numeric_float(dtype: np.dtype) -> bool:
    try:
        return NumberFormat.from_dtype(dtype).is_float
    except (KeyError, ValueError, TypeError):
        return dtype.kind == "f"


def judge(
    device: str,
    run: Any,
    feeds: Mapping[str, np.ndarray],
    reference: Reference,
    outputs: Sequence[TensorInfo],
    *,
    expected: tuple[dict[str, np.ndarray], str] | HalError | None = None,
    key: str | None = None,
    real_inputs: bool = False,
    reduced_precision: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerificationReport:
    """Run ``run(feeds)`` (the device) and judge its outputs against ``reference``'s.

    ``expected`` is the reference's answer when computed ahead (or the error it raised). A
    device that fails on *seeded* inputs the reference runs is left unverified (seeded values
    may be meaningless to the model: a ratio, a shape, an index); on ``real_inputs`` it fails.
    When the device disagrees with the ONNX reference evaluator, ``ort:cpu`` is asked too: the
    evaluator has bugs of its own (``LpNormalization`` with ``p=1`` in onnx 1.23), so a device
    that matches ``ort:cpu`` passes, with the dispute in ``detail``; ``ort:cpu`` itself, with no
    third opinion, is then left unverified rather than refused.
    """
    start = time.perf_counter()

    def report(status: str, name: str | None = None, checks: Sequence[OutputCheck] = (), detail: str | None = None) -> VerificationReport:
        return VerificationReport(device, status, name, tuple(checks), detail, time.perf_counter() - start)

    if expected is None:
        try:
            expected = reference.run(feeds, key=key)
        except HalError as exc:
            expected = exc
    if isinstance(expected, HalError):
        return report("skipped", detail=str(expected))
    want, name = expected
    empty = sorted(n for n, v in want.items() if _empty(v))
    if empty and not real_inputs:
        # Seeded integers made a size or a shape 0: an empty answer proves nothing, and runtimes
        # are least tested there (IREE's CenterCropPad to shape [0, 0, 1] corrupted the heap and
        # ended the process).
        shown = ", ".join(f"{n} {_shown_shape(want[n])}" for n in empty)
        return report("skipped", name, detail=(
            f"the seeded inputs give empty outputs ({shown}), so the device is not run on them; "
            "pass example= with real inputs to verify it"))
    try:
        actual = run(feeds)
    except InputError:
        raise  # an example that does not fit the model: the caller's mistake to hear about
    except HalError as exc:
        if real_inputs:
            return report("failed", name, detail=f"{device} failed on inputs {name} runs: {exc}")
        return report("skipped", name, detail=(
            f"{device} refused the seeded inputs, which {name} runs ({_first_line(exc)}); "
            "pass example= with real inputs to verify it"))

    def judged(against: Mapping[str, np.ndarray]) -> tuple[OutputCheck, ...]:
        return compare(actual, against, outputs, reduced_precision=reduced_precision, rtol=rtol, atol=atol)

    checks = judged(want)
    if all(c.passed for c in checks):
        return report("passed", name, checks)
    worst = max((c for c in checks if not c.passed), key=lambda c: c.max_rel).describe()
    if name != REFERENCE_EVALUATOR:
        return report("failed", name, checks)
    if device == "ort:cpu":
        return report("skipped", name, checks, detail=(
            f"disputed: ort:cpu and the ONNX reference evaluator disagree ({worst}); "
            "with no third opinion neither is taken as right"))
    try:
        second, second_name = reference.second_opinion(feeds, key=key)
    except HalError:
        return report("failed", name, checks)
    again = judged(second)
    if all(c.passed for c in again):
        return report("passed", second_name, again, detail=(
            f"the ONNX reference evaluator disagrees with both {device} and {second_name} ({worst})"))
    return report("failed", name, checks)


# -- the reference -------------------------------------------------------------------------------


def budget_seconds() -> float:
    """``HAL_VERIFY_BUDGET_S``: how long the reference evaluator may take for one model."""
    from hal._bounds import env_seconds

    return env_seconds("HAL_VERIFY_BUDGET_S", 0.5, zero="turns the evaluator off")


#: Estimated seconds per output element for operators the evaluator runs element by element in
#: Python (np.vectorize), and for everything else. Measured with onnx 1.23 on a 2-core EPYC.
_SLOW_ELEMENTWISE = frozenset({"Erf", "Round", "IsInf", "IsNaN", "Cast", "CastLike", "Mod", "BitShift"})
_PER_ELEMENT_SLOW = 2.5e-7
_PER_ELEMENT = 5e-9
_PER_MAC_MATMUL = 2e-10
_PER_MAC_CONV = 7e-10
_PER_NODE = 3e-5


def estimate_evaluator_seconds(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> float:
    """A rough estimate of the reference evaluator's time for one run, from the shapes that
    shape inference left on the model, with symbolic dimensions sized as in ``feeds``.

    Unknown shapes count as small: the evaluator's deadline catches what this misses.
    """
    graph = proto.graph
    sizes: dict[str, int] = {}
    for value in graph.input:
        if value.name in feeds and value.type.HasField("tensor_type"):
            for d, size in zip(value.type.tensor_type.shape.dim, np.shape(feeds[value.name])):
                if d.dim_param:
                    sizes.setdefault(d.dim_param, int(size))
    shapes: dict[str, tuple[int, ...]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tt = value.type.tensor_type
        if value.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, DYNAMIC_SIZE) for d in tt.shape.dim
            )
    for t in graph.initializer:
        shapes[t.name] = tuple(t.dims)
    total = 0.0
    for node in graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        elems = float(np.prod(out)) if out is not None else 0.0
        total += _PER_NODE
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(node.input) >= 2:
            a = shapes.get(node.input[0])
            k = a[-1] if a else 1
            if node.op_type == "Gemm" and a and any(x.name == "transA" and x.i for x in node.attribute):
                k = a[0]
            total += elems * k * _PER_MAC_MATMUL
        elif node.op_type in ("Conv", "ConvInteger", "ConvTranspose") and len(node.input) >= 2:
            w = shapes.get(node.input[1])
            per_out = float(np.prod(w[1:])) if w else 1.0
            total += elems * per_out * _PER_MAC_CONV
        elif node.op_type in _SLOW_ELEMENTWISE:
            total += elems * _PER_ELEMENT_SLOW
        else:
            total += elems * _PER_ELEMENT
    return total


class _Deadline(Exception):
    pass


class Reference:
    """Runs a model the way its operators are defined, to check a device against.

    ``run(feeds)`` returns ``(outputs, reference name)`` or raises :class:`HalError` when no
    reference can run the model. ``exclude`` is the device under test (never its own reference).
    ``ort_cpu`` is a callable returning an ``ort:cpu`` :class:`~hal.Executable` for the model,
    built only if the evaluator cannot be used and a plain onnxruntime session on the model cannot
    either (external weights, sequences, raw-bit formats, a model onnxruntime refuses unlowered).
    """

    def __init__(
        self, proto: onnx.ModelProto, *, exclude: str, ort_cpu: Any, budget: float | None = None, weights: Any = None
    ) -> None:
        self.proto = proto
        self.weights = weights  # hal.weights.Weights of proto's external tensors, if any
        self.exclude = exclude
        self._ort_cpu = ort_cpu
        self.budget = budget_seconds() if budget is None else budget
        self._lock = threading.Lock()
        self._evaluator: Any = None
        self._ort_exe: Any = None
        self._deadline = threading.local()
        self._memo: dict[str, tuple[dict[str, np.ndarray], str]] = {}

    def run(self, feeds: Mapping[str, np.ndarray], *, key: str | None = None) -> tuple[dict[str, np.ndarray], str]:
        """The reference's outputs for ``feeds`` and its name; ``key`` names the feeds so that
        verifying a second device on the same inputs reuses the answer."""
        if key is not None:
            with self._lock:
                memo = self._memo.get(key)
            if memo is not None:
                return memo
        result = self._run(feeds)
        if key is not None:
            with self._lock:
                self._memo[key] = result
        return result

    @functools.cached_property
    def _random(self) -> list[str]:
        return random_operators(self.proto)  # walked once, not per verified shape

    def _run(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
        random = self._random
        if random:
            msg = (
                f"the model draws random numbers ({', '.join(random)}): its outputs differ between "
                "runtimes and runs, so there is nothing to compare"
            )
            raise HalError(msg)
        why_not = self._evaluator_problem(feeds)
        if why_not is None:
            try:
                return self._evaluate(feeds), REFERENCE_EVALUATOR
            except FloatingPointError as exc:
                # A zero divisor (a step, a count, a modulus drawn as 0): the inputs are outside
                # the model's domain. No device runs them: some trap on integer division by zero
                # (SIGFPE ends the process; IREE's STFT with frame_step 0 does).
                msg = (
                    f"the inputs divide by zero in the model ({exc}); they are outside its domain, "
                    "so no device is run on them: pass example= with inputs the model is meant for"
                )
                raise HalError(msg) from exc
            except _Deadline:
                why_not = f"the ONNX reference evaluator took over {4 * self.budget:g} s (HAL_VERIFY_BUDGET_S={self.budget:g})"
            except Exception as exc:  # noqa: BLE001 - the evaluator lacks many ops and types: use ort:cpu
                why_not = f"the ONNX reference evaluator cannot run it ({type(exc).__name__}: {_first_line(exc)})"
        if self.exclude == "ort:cpu":
            msg = f"{why_not}, and ort:cpu is the device under test (never verified against itself)"
            raise HalError(msg)
        try:
            return self._ort(feeds)
        except HalError as exc:
            msg = f"{why_not}, and {exc}"
            raise HalError(msg) from exc

    def second_opinion(self, feeds: Mapping[str, np.ndarray], *, key: str | None = None) -> tuple[dict[str, np.ndarray], str]:
        """``ort:cpu``'s outputs, asked when a device disagrees with the evaluator."""
        if self.exclude == "ort:cpu":
            msg = "ort:cpu is the device under test"
            raise HalError(msg)
        memo_key = None if key is None else f"ort:{key}"
        with self._lock:
            memo = self._memo.get(memo_key) if memo_key else None
        if memo is not None:
            return memo
        result = self._ort(feeds)
        if memo_key is not None:
            with self._lock:
                self._memo[memo_key] = result
        return result

    def _ort(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
        with self._lock:
            if self._ort_exe is None:
                # A plain session first: a placement on the HAL's ort:cpu lowers, optimizes and
                # caches for a device nobody asked for, several times the cost. The HAL's when the
                # model needs what only it does (external weights, containers, raw-bit formats).
                self._ort_exe = _PlainSession.build(self.proto) if self.weights is None else None
            if self._ort_exe is None:
                try:
                    self._ort_exe = self._ort_cpu()
                except HalError as exc:
                    msg = f"ort:cpu cannot run it: {exc}"
                    raise HalError(msg) from exc
            exe = self._ort_exe
        try:
            return exe.run(dict(feeds)), "ort:cpu"
        except HalError as exc:
            msg = f"ort:cpu failed on the inputs: {exc}"
            raise HalError(msg) from exc

    def _evaluator_problem(self, feeds: Mapping[str, np.ndarray]) -> str | None:
        if self.budget <= 0:
            return "the ONNX reference evaluator is turned off (HAL_VERIFY_BUDGET_S=0)"
        estimate = estimate_evaluator_seconds(self.proto, feeds)
        if estimate > self.budget:
            return (
                f"the ONNX reference evaluator would take about {estimate:.1f} s for this model "
                f"(budget HAL_VERIFY_BUDGET_S={self.budget:g})"
            )
        return None

    def _evaluate(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from onnx.reference import ReferenceEvaluator

        with self._lock:
            if self._evaluator is None:
                # The evaluator reads external data from paths: give it the bytes instead (a
                # model too large to inline is over the evaluator's budget anyway).
                proto = self.proto if self.weights is None else self.weights.inline(self.proto)
                self._evaluator = ReferenceEvaluator(proto)
                # The evaluator cannot be interrupted; a deadline checked before each node bounds
                # it. ``rt_nodes_`` is its list of node runners (onnx 1.13 to 1.23); without it,
                # the estimate alone bounds the time.
                for node in getattr(self._evaluator, "rt_nodes_", ()):
                    node.run = _bounded(node.run, self._deadline)
            evaluator = self._evaluator
        self._deadline.at = time.perf_counter() + 4 * self.budget
        names = [o.name for o in self.proto.graph.output]
        with np.errstate(divide="raise"):  # see _run: a zero divisor stops verification here
            values = evaluator.run(names, {k: _as_arrays(v) for k, v in feeds.items()})
        return {n: _as_arrays(v) for n, v in zip(names, values)}


#: ONNX element types onnxruntime's Python API takes and gives as numpy arrays (the rest, ml_dtypes
#: arrays, only by their raw bits: hal.backends.onnxruntime.RAW_BIT_FORMATS, a floor above this one).
_NUMPY_NATIVE = frozenset(
    f.onnx_type
    for f in (
        NumberFormat.FLOAT32, NumberFormat.FLOAT16, NumberFormat.FLOAT64, NumberFormat.BOOL, NumberFormat.STRING,
        NumberFormat.INT8, NumberFormat.INT16, NumberFormat.INT32, NumberFormat.INT64,
        NumberFormat.UINT8, NumberFormat.UINT16, NumberFormat.UINT32, NumberFormat.UINT64,
    )
)


class _PlainSession:
    """onnxruntime's CPU provider on the reference's model as it is: no lowering, no graph
    optimizations (no fused kernels between the model and its operators' meaning), no optimized
    model written to the cache. Its ``run`` answers as an ort:cpu :class:`~hal.Executable` does:
    every output by name, :class:`~hal.errors.RunError` when onnxruntime fails."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def build(cls, proto: onnx.ModelProto) -> _PlainSession | None:
        """A session for ``proto``, or None where only the HAL's ort:cpu can run it: a sequence
        or optional input or output, an element type numpy arrays cannot carry to onnxruntime
        (bfloat16, FP8, int4: the HAL passes their raw bits; complex, which has few CPU kernels),
        or a model onnxruntime refuses as it is (an IR version or operator the HAL lowers for it
        first)."""
        import onnxruntime as ort

        for value in (*proto.graph.input, *proto.graph.output):
            if not value.type.HasField("tensor_type") or value.type.tensor_type.elem_type not in _NUMPY_NATIVE:
                return None
        so = ort.SessionOptions()
        so.log_severity_level = 4  # quiet, as the HAL's sessions are: a refusal is the answer
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # The reference runs on a thread beside the device's compile: half the cores and no
        # spin-waiting leave the compile the rest (on 2 cores a cold to() of the transformer went
        # from 1.6x to 1.3x the time without verification; benchmarks/verify_cost.py).
        so.intra_op_num_threads = _reference_threads()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any refusal: the HAL's ort:cpu may still run it
            log.debug("plain onnxruntime session refused (%s); the reference uses the HAL's ort:cpu", _first_line(exc))
            return None
        return cls(session)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:
            msg = f"ort:cpu failed to run the model: {_first_line(exc)}"
            raise RunError(msg) from exc
        return dict(zip(names, values))


def _reference_threads() -> int:
    """Threads for the reference's onnxruntime session: half the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


def _as_arrays(value: Any) -> Any:
    """An array, a list of arrays for a sequence, None for an absent optional: as the evaluator
    takes and gives them."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [np.asarray(item) for item in value]
    return np.asarray(value)


#: ONNX operators whose outputs are random draws (a ``seed`` fixes them within one runtime only).
RANDOM_OPERATORS = frozenset(
    {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
)


def random_operators(proto: onnx.ModelProto) -> list[str]:
    """The random operators ``proto`` uses anywhere (subgraphs and functions included)."""
    found: set[str] = set()
    graphs: list[Any] = [proto.graph, *proto.functions]
    while graphs:
        for node in graphs.pop().node:
            if node.domain in ("", "ai.onnx") and node.op_type in RANDOM_OPERATORS:
                found.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return sorted(found)


def _bounded(run: Any, deadline: threading.local) -> Any:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if time.perf_counter() > getattr(deadline, "at", math.inf):
            raise _Deadline
        return run(*args, **kwargs)

    return bounded


def _first_line(exc: BaseException) -> str:
    return first_line(exc)[:300]  # quoted inside a verdict, which is cached and shown in a step


class DisputedShape(VerificationError):
    """A new input shape's answer that the ONNX reference evaluator disputes, with no third
    opinion yet (``ort:cpu`` is the device): raised for ``auto``'s shape failover to settle;
    ``results`` is the device's answer, ``report`` the verdict."""

    def __init__(self, message: str, results: list[Any], report: VerificationReport) -> None:
        super().__init__(message)
        self.results = results
        self.report = report


class ShapeCheckedRunner:
    """A runner that checks the first run of every new input-shape signature against the
    reference (``verify="each-shape"``), for models whose dynamic dimensions make one check at
    placement cover one shape only (and whose seeded inputs prove little about real ones: the
    placement's own shape is checked again at its first real run, unless ``example`` gave it). A mismatch raises :class:`VerificationError`; a shape the
    reference cannot run is logged once and left unchecked. Later runs of a checked signature
    cost one set lookup."""

    def __init__(
        self,
        runner: Any,
        reference: Reference,
        outputs: Sequence[TensorInfo],
        device: str,
        *,
        reduced_precision: bool = False,
        seen: set[Any] | None = None,
    ) -> None:
        self.runner = runner
        self.reference = reference
        self.outputs = {o.name: o for o in outputs}
        self.device = device
        self.reduced_precision = reduced_precision
        #: Set by ``auto``'s shape failover: a dispute (the evaluator against ort:cpu, no third
        #: opinion) raises :class:`DisputedShape` for the failover to settle instead of being logged.
        self.disputes_raise = False
        self._seen = set(seen or ())
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        results = self.runner.run(feeds, output_names)
        signature = shape_signature(feeds)
        if self.checked(signature):
            return results
        infos = [self.outputs[n] for n in output_names]
        report = judge(
            self.device, lambda _: dict(zip(output_names, results)), feeds, self.reference, infos,
            real_inputs=True, reduced_precision=self.reduced_precision,
        )
        if report.status == "failed":
            error = report.error()
            error.args = (f"for inputs of shape {dict(signature)}: {error}",)
            raise error
        if report.disputed and self.disputes_raise:
            raise DisputedShape(f"{self.device}'s answer for inputs of shape {dict(signature)} is {report.detail}", results, report)
        if report.status == "skipped":
            log.warning("%s: inputs of shape %s not verified: %s", self.device, dict(signature), report.detail)
        self.mark_checked(signature)
        return results

    def checked(self, signature: Any) -> bool:
        """Whether inputs of this shape signature were checked (their later runs are not)."""
        return signature in self._seen

    def mark_checked(self, signature: Any) -> None:
        """Check inputs of this shape signature no more (checked, or settled elsewhere)."""
        with self._lock:
            self._seen.add(signature)
