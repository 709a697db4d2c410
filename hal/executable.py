"""The :class:`Executable`: a model prepared for one device, ready to run.

Feeds are checked before any runtime sees them (names, element types, ranks, static dimensions),
and what the runtime returns is checked against the model's declared outputs (count, element
types, ranks, static dimensions) before the caller sees it; every check is prepared once in
``__init__`` so a call costs little more than the runtime's own.

Sequences and optionals (:class:`~hal.capabilities.ValueKind`) travel as lists of arrays and as
an array or None; each element is checked as a tensor of the declared element type would be.

Symbolic dimensions are not enforced, as onnxruntime does not enforce them: exporters write
``"?"``, ``"unk__N"`` or ``""`` for "unknown", not for "equal". A named symbol whose sizes differ
between inputs is logged once per executable as a WARNING.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hal.capabilities import ValueKind
from hal.errors import DeviceError, InputError, RunError, VerificationError

if TYPE_CHECKING:
    from hal.backend import Device, Runner
    from hal.estimate import Estimate
    from hal.lowering import LoweredModel, LoweringStep, Placement
    from hal.model import TensorInfo

__all__ = ["Executable"]

log = logging.getLogger("hal.executable")
_ndarray = np.ndarray  # one global lookup on the hot path instead of two

#: Dimension names exporters write for "unknown": no letter at all ("?", "-1", ""), tf2onnx's
#: "unk__N", "None". They are not shared symbols.
_PLACEHOLDER = re.compile(r"[^A-Za-z]*|unk__\d+|None")

# (name, kind (None for a tensor), dtype or None, full static shape or None, rank or None,
#  ((axis, size), ...)); for a sequence or an optional, the shape is its elements'.
_Spec = tuple[str, "ValueKind | None", Any, "tuple[int, ...] | None", "int | None", "tuple[tuple[int, int], ...]"]


def _spec(info: TensorInfo) -> _Spec:
    try:
        dtype = info.dtype
    except (TypeError, ValueError, KeyError):  # a format numpy cannot hold (float6): not checked
        dtype = None
    kind = None if info.kind is ValueKind.TENSOR else info.kind
    shape = info.shape
    if shape is None:
        return (info.name, kind, dtype, None, None, ())
    static = tuple((axis, d) for axis, d in enumerate(shape) if isinstance(d, int) and d > 0)
    full = tuple(shape) if len(static) == len(shape) else None  # type: ignore[arg-type]
    return (info.name, kind, dtype, full, len(shape), static)


def _a(text: str) -> str:
    return f"{'an' if text[:1] in 'aeiou' else 'a'} {text}"


def _what(value: Any) -> str:
    if value is None:
        return "None"
    return "one array" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"


def _label(what: str, name: str, index: int | None) -> str:
    """``input 'x'``, or ``input 's' element 2`` for an element of a sequence."""
    return f"{what} {name!r}" if index is None else f"{what} {name!r} element {index}"


def _shape_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class Executable:
    """Runs a compiled model on one device. Get one from ``compiled.to(device)``."""

    def __init__(
        self,
        runner: Runner,
        device: Device,
        inputs: Sequence[TensorInfo],
        outputs: Sequence[TensorInfo],
        *,
        placement: Sequence[Placement] = (),
        lowering: Sequence[LoweringStep] = (),
        model: LoweredModel | None = None,
    ) -> None:
        self.runner = runner
        self.device = device
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.placement = tuple(placement)
        self.lowering = tuple(lowering)
        #: The :class:`~hal.verification.VerificationReport` from placement, or None when
        #: ``to(..., verify=False)`` skipped it.
        self.verification = None
        self._model = model
        self._estimates: dict[tuple[tuple[str, tuple[int, ...]], ...], Estimate] = {}
        self._run = runner.run
        self._output_names = [o.name for o in self.outputs]
        self._output_set = frozenset(self._output_names)
        self._input_names = frozenset(i.name for i in self.inputs)
        self._specs = tuple(_spec(info) for info in self.inputs)
        self._value_specs = {spec[0]: spec for spec in self._specs if spec[1] is not None}  # sequences, optionals
        self._output_specs = {info.name: _spec(info) for info in self.outputs}
        self._all_output_specs = tuple(self._output_specs[n] for n in self._output_names)
        symbols: dict[str, list[tuple[str, int]]] = {}
        for info in self.inputs:
            if info.kind is not ValueKind.TENSOR:
                continue  # elements of a sequence may differ in size; an optional may be absent
            for axis, d in enumerate(info.shape or ()):
                if isinstance(d, str) and not _PLACEHOLDER.fullmatch(d):
                    symbols.setdefault(d, []).append((info.name, axis))
        # Named symbols used more than once; one is dropped once its WARNING has been logged.
        self._shared = tuple((sym, tuple(uses)) for sym, uses in symbols.items() if len(uses) > 1)

    def __repr__(self) -> str:
        return f"<hal.Executable on {self.device.id}: {len(self.inputs)} inputs, {len(self.outputs)} outputs>"

    def _use(self, runner: Runner) -> None:
        """Run through ``runner`` from now on (the core wraps a device's runner after placement)."""
        self.runner = runner
        self._run = runner.run

    def estimate(self, shapes: Mapping[str, Any] | None = None) -> Estimate:
        """A roofline estimate (:mod:`hal.estimate`) of one run on this device, from the figures
        its capabilities declare (peak throughput, memory bandwidth, launch overhead): an
        :class:`~hal.estimate.Estimate` whose ``kind`` is ``"estimated"``, never a measurement.
        ``shapes`` maps inputs to feeds (arrays) or shapes, so symbolic dimensions take the sizes
        a run would have; remembered per shape. Raises :class:`~hal.errors.DeviceError` when the
        device declares nothing to estimate from."""
        from hal.estimate import estimate

        if self._model is None:
            msg = f"{self.device.id}: this executable was built without its lowered model; get it from compiled.to()"
            raise DeviceError(msg)
        given = {name: tuple(int(d) for d in getattr(v, "shape", v)) for name, v in (shapes or {}).items()}
        key = tuple(sorted(given.items()))
        found = self._estimates.get(key)
        if found is None:
            found = self._estimates[key] = estimate(self._model, self.device.capabilities, given)
        return found

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Run the model. ``feeds`` maps every input name to an array of its element type
        (ml_dtypes arrays for bfloat16, FP8, int4, ...); returns ``{output name: array}``.

        A sequence input takes a list (or tuple) of arrays, an optional input an array or None
        (absent), an optional sequence a list or None; each array is checked as a tensor input
        is. A sequence output comes back as a list of arrays, an absent optional as None.

        Python numbers and (nested) lists are converted only where every value survives exactly
        (``1.0`` into int64, ``True`` into float32); floats into a float type are rounded to its
        nearest value, but never overflow to infinity. Numpy arrays must have the input's element
        type already: they are never converted.

        Raises :class:`~hal.errors.InputError` for bad feeds or output names and
        :class:`~hal.errors.RunError` when the backend fails or returns something other than the
        declared outputs (count, element types, ranks, static dimensions).
        """
        feeds, names, specs = self.check(feeds, output_names)
        return self.run_checked(feeds, names, specs)

    def check(
        self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None
    ) -> tuple[Mapping[str, Any], Sequence[str], Sequence[_Spec]]:
        """The checks :meth:`run` makes before the runtime sees anything: ``(feeds, output names,
        output specs)`` to hand to :meth:`run_checked`, feeds converted where :meth:`run` would
        convert them. A :class:`hal.Pool` checks a request once here and runs it on any of its
        devices (they share the model's inputs and outputs). Raises
        :class:`~hal.errors.InputError`."""
        if type(feeds) is not dict and not isinstance(feeds, Mapping):
            self._raise_not_a_mapping(feeds)
        if len(feeds) != len(self._specs):
            self._raise_names(feeds)
        converted: dict[str, np.ndarray] | None = None
        for name, kind, dtype, full, rank, static in self._specs:
            try:
                array = feeds[name]
            except KeyError:
                self._raise_names(feeds)
            if kind is not None:
                value = self._feed_value(name, array)
                if value is not array:
                    if converted is None:
                        converted = dict(feeds)
                    converted[name] = value
                continue
            if type(array) is not np.ndarray:
                array = self._convert(f"input {name!r}", array, dtype)
                if converted is None:
                    converted = dict(feeds)
                converted[name] = array
            if array.dtype is not dtype and array.dtype != dtype:
                msg = (
                    f"input {name!r} has element type {array.dtype}, expected {dtype}; "
                    f"convert it with array.astype({_dtype_expr(dtype)})"
                )
                raise InputError(msg)
            if full is not None:
                if array.shape != full:
                    self._raise_shape(f"input {name!r}", array, full)
            elif rank is not None:
                if array.ndim != rank:
                    self._raise_shape(f"input {name!r}", array, self._declared(name))
                for axis, size in static:
                    if array.shape[axis] != size:
                        self._raise_shape(f"input {name!r}", array, self._declared(name))
        if converted is not None:
            feeds = converted
        if self._shared:
            self._check_shared(feeds)
        if output_names is None:
            names = self._output_names
            specs = self._all_output_specs
        else:
            if isinstance(output_names, (str, bytes)):
                self._raise_output_names(output_names)
            try:
                names = list(output_names)
                specs = [self._output_specs[n] for n in names]
            except (KeyError, TypeError):
                self._raise_output_names(output_names)
        return feeds, names, specs

    def run_checked(self, feeds: Mapping[str, Any], names: Sequence[str], specs: Sequence[_Spec]) -> dict[str, Any]:
        """Run feeds :meth:`check` accepted (on this executable or another of the same model) and
        check what the runtime returns. Raises :class:`~hal.errors.RunError`."""
        try:
            results = self._run(feeds, names)  # type: ignore[arg-type]
        except VerificationError:
            raise  # verify="each-shape" caught the device answering wrong: say so as it is
        except Exception as exc:
            text = str(exc).strip().splitlines()
            msg = f"{self.device.id} failed to run the model: {text[0] if text else type(exc).__name__}"
            raise RunError(msg) from exc
        if (type(results) is not list and type(results) is not tuple) or len(results) != len(names):
            self._raise_results(results, names)
        for array, (name, kind, dtype, full, rank, static) in zip(results, specs):
            if kind is not None:
                self._check_output_value(name, kind, array, dtype, full, rank, static)
                continue
            if type(array) is not _ndarray or (array.dtype is not dtype and array.dtype != dtype and dtype is not None):
                self._raise_output(name, array, dtype, "")
            if full is not None:
                if array.shape != full:
                    self._raise_output(name, array, dtype, _shape_text(full))
            elif rank is not None:
                if array.ndim != rank:
                    self._raise_output(name, array, dtype, self._declared_output(name))
                for axis, size in static:
                    if array.shape[axis] != size:
                        self._raise_output(name, array, dtype, self._declared_output(name))
        return dict(zip(names, results))

    # -- slow paths: only reached when something is wrong ---------------------------------------

    def _declared(self, name: str) -> tuple[int | str | None, ...]:
        for info in self.inputs:
            if info.name == name and info.shape is not None:
                return info.shape
        return ()

    def _declared_output(self, name: str) -> str:
        for info in self.outputs:
            if info.name == name:
                return _shape_text(info.shape) if info.shape is not None else "any shape"
        return "?"

    def _raise_not_a_mapping(self, feeds: Any) -> None:
        names = [i.name for i in self.inputs]
        example = "{" + ", ".join(f"{n!r}: array" for n in names[:3]) + (", ..." if len(names) > 3 else "") + "}"
        msg = f"feeds must be a dict of input name to array, e.g. exe.run({example}); got {type(feeds).__name__}"
        if isinstance(feeds, (list, tuple)):
            msg += "; to feed arrays in input order, pass dict(zip([i.name for i in exe.inputs], arrays))"
        raise InputError(msg)

    def _raise_output_names(self, output_names: Any) -> None:
        if isinstance(output_names, (str, bytes)):
            msg = f"output_names must be a list of output names, not one string; pass [{output_names!r}]"
            raise InputError(msg)
        try:
            unknown = [n for n in output_names if n not in self._output_set]
        except TypeError:  # not iterable, or holds unhashable things
            shown = repr(output_names)
            msg = (
                f"output_names must be None (all outputs) or a list of output names, got "
                f"{shown if len(shown) <= 60 else shown[:57] + '...'}; the model's outputs are {self._output_names}"
            )
            raise InputError(msg) from None
        msg = f"unknown output names {unknown}; the model's outputs are {self._output_names}"
        raise InputError(msg)

    def _backend(self) -> str:
        return f"{self.device.id} (backend {self.device.backend})"

    def _raise_results(self, results: Any, names: Sequence[str]) -> None:
        if isinstance(results, (list, tuple)):
            got = f"{len(results)} arrays"
        else:
            got = f"an object of type {type(results).__name__}"
        msg = (
            f"{self._backend()} returned {got} where {len(names)} outputs were asked for ({list(names)}), "
            "not a list of one array each: the backend's runner is broken; report it to its plugin's authors"
        )
        raise RunError(msg)

    def _raise_output(self, name: str, array: Any, dtype: Any, declared: str, index: int | None = None) -> None:
        if not isinstance(array, np.ndarray):
            what = f"as a {type(array).__name__} instead of a numpy array"
        elif dtype is not None and array.dtype != dtype:
            what = f"with element type {array.dtype}, but the model declares {dtype}"
        else:
            what = f"with shape {list(array.shape)}, but the model declares {declared}"
        msg = (
            f"{self._backend()} returned {_label('output', name, index)} {what}: the backend answered something "
            "other than the model's output; report it to its plugin's authors, or run on another device"
        )
        raise RunError(msg)

    def _check_output_value(
        self, name: str, kind: ValueKind, value: Any, dtype: Any, full: Any, rank: int | None, static: Any
    ) -> None:
        """A sequence output must be a list of arrays, an optional one an array or None, each
        array of the declared element type, rank and static dimensions."""
        if value is None and kind.is_optional:
            return
        if kind.is_sequence:
            if type(value) is not list:
                info = next(o for o in self.outputs if o.name == name)
                msg = (
                    f"{self._backend()} returned output {name!r} as {_what(value)}, but the model declares "
                    f"{_a(info.describe())}, which comes back as a list of arrays; report it to its plugin's "
                    "authors, or run on another device"
                )
                raise RunError(msg)
            items: list[tuple[int | None, Any]] = list(enumerate(value))
        else:
            items = [(None, value)]
        for index, array in items:
            if type(array) is not _ndarray or (dtype is not None and array.dtype != dtype):
                self._raise_output(name, array, dtype, "", index)
            if (full is not None and array.shape != full) or (
                rank is not None and (array.ndim != rank or any(array.shape[a] != size for a, size in static))
            ):
                self._raise_output(name, array, dtype, self._declared_output(name), index)

    def _feed_value(self, name: str, value: Any) -> Any:
        """A sequence or optional feed checked: a new list of checked arrays, an array, or None."""
        spec = self._value_specs[name]
        kind = spec[1]
        assert kind is not None
        if value is None and kind.is_optional:
            return None
        if not kind.is_sequence:  # an optional tensor, present
            return self._feed_element(spec, value, None)
        if not isinstance(value, (list, tuple)):
            info = next(i for i in self.inputs if i.name == name)
            split = " (list(array) splits one along its first axis)" if isinstance(value, np.ndarray) else ""
            absent = " or None" if kind.is_optional else ""
            msg = f"input {name!r} is {_a(info.describe())}: pass a list of arrays{absent}{split}, not {_what(value)}"
            raise InputError(msg)
        return [self._feed_element(spec, item, index) for index, item in enumerate(value)]

    def _feed_element(self, spec: _Spec, value: Any, index: int | None) -> np.ndarray:
        """One array of a sequence or optional feed, checked and converted as a tensor feed is."""
        name, _, dtype, full, rank, static = spec
        label = _label("input", name, index)
        if type(value) is not np.ndarray:
            value = self._convert(label, value, dtype)
        if dtype is not None and value.dtype != dtype:
            msg = (
                f"{label} has element type {value.dtype}, expected {dtype}; "
                f"convert it with array.astype({_dtype_expr(dtype)})"
            )
            raise InputError(msg)
        if (full is not None and value.shape != full) or (
            rank is not None and (value.ndim != rank or any(value.shape[a] != size for a, size in static))
        ):
            self._raise_shape(label, value, self._declared(name))
        return value

    def _raise_names(self, feeds: Mapping[str, Any]) -> None:
        given = set(feeds)
        missing = sorted(self._input_names - given)
        unknown = sorted(given - self._input_names)
        parts = []
        if missing:
            parts.append(f"missing feeds {missing}")
        if unknown:
            parts.append(f"unknown feed names {unknown}")
        msg = f"{' and '.join(parts)}; the model's inputs are {sorted(self._input_names)}"
        raise InputError(msg)

    @staticmethod
    def _raise_shape(label: str, array: np.ndarray, declared: Sequence[int | str | None]) -> None:
        """``label``: ``input 'x'`` or ``input 's' element 2``."""
        if len(array.shape) != len(declared):
            msg = (
                f"{label} has rank {array.ndim} (shape {list(array.shape)}), expected rank "
                f"{len(declared)} with shape {_shape_text(declared)}"
            )
        else:
            bad = [
                f"axis {axis} is {array.shape[axis]}, expected {d}"
                for axis, d in enumerate(declared)
                if isinstance(d, int) and d > 0 and array.shape[axis] != d
            ]
            msg = f"{label} has shape {list(array.shape)}, expected {_shape_text(declared)}: {'; '.join(bad)}"
        raise InputError(msg)

    @staticmethod
    def _convert(label: str, value: Any, dtype: np.dtype) -> np.ndarray:
        """``label``: ``input 'x'`` or ``input 's' element 2``."""
        if isinstance(value, np.ndarray):  # a subclass: take it as a plain array
            return value.view(np.ndarray)
        if not isinstance(value, (np.generic, int, float, bool, complex, str, bytes, list, tuple)):
            msg = f"{label} is a {type(value).__name__}; pass a numpy array of {dtype}"
            raise InputError(msg)
        try:
            raw = np.asarray(value)
        except (TypeError, ValueError, OverflowError) as exc:
            msg = f"{label} cannot be read as an array of {dtype}: {exc}"
            raise InputError(msg) from None
        return _exactly(label, raw, dtype)

    def _check_shared(self, feeds: Mapping[str, np.ndarray]) -> None:
        for symbol, uses in self._shared:
            sizes = {(n, a): feeds[n].shape[a] for n, a in uses}
            if len(set(sizes.values())) > 1:
                shown = ", ".join(f"{n}[axis {a}]={s}" for (n, a), s in sizes.items())
                # onnxruntime does not hold a model to its symbols either: warn, once, and run.
                log.warning(
                    "%s: dimension %r has different sizes (%s); the model names them alike, so it may "
                    "expect them equal (logged once per executable)", self.device.id, symbol, shown,
                )
                self._shared = tuple(entry for entry in self._shared if entry[0] != symbol)


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or (dtype.type.__module__.startswith("ml_dtypes") and "float" in dtype.name)


def _exactly(label: str, raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``raw`` (an array numpy made of Python values) as ``dtype``, or an InputError when that
    would change a value: integers and bools must survive exactly; floats into a float type may
    round to its nearest value but not overflow."""
    if raw.dtype == dtype:
        return raw
    if dtype.kind == "O":  # ONNX strings: onnxruntime takes str objects
        if raw.dtype.kind in "US":
            return raw.astype(object)
    elif raw.dtype.kind in "biuf" or (raw.dtype.kind == "c" and dtype.kind == "c"):
        with np.errstate(all="ignore"):
            try:
                array = raw.astype(dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                msg = f"{label} cannot be read as an array of {dtype}: {exc}"
                raise InputError(msg) from None
            if raw.dtype.kind in "fc" and _is_float(dtype):
                wide = array.astype(np.complex128 if dtype.kind == "c" else np.float64)
                bad = np.isfinite(raw) & ~np.isfinite(wide)
                why = "overflows"
            else:
                wide = array.astype(raw.dtype)
                bad = wide != raw
                why = "cannot be held exactly"
        if not bad.any():
            return array
        first = raw[bad].flat[0].item()
        after = wide[bad].flat[0].item()
        fix = f"pass values {dtype} holds"
        if raw.dtype.kind == "f" and (dtype.kind in "iu" or dtype.name.startswith(("int", "uint"))):
            fix += f", or round them yourself: np.round(values).astype({_dtype_expr(dtype)})"
        msg = f"{label}: the value {first!r} {why} in {dtype} (it would become {after!r}); {fix}"
        raise InputError(msg)
    if raw.dtype.kind in "US" or dtype.kind == "O":
        what = f"{raw.dtype} values, expected {dtype}: numbers are not read from text, nor text from numbers"
    elif raw.dtype.kind == "O":
        what = f"values numpy cannot give one type (integers beyond 64 bits, or mixed objects), expected {dtype}"
    else:
        what = f"{raw.dtype} values, which {dtype} cannot hold"
    msg = f"{label} holds {what}; pass a numpy array of {dtype}"
    raise InputError(msg)


def _dtype_expr(dtype: np.dtype) -> str:
    return f"ml_dtypes.{dtype.name}" if dtype.type.__module__.startswith("ml_dtypes") else f"np.{dtype.name}"
