"""The :class:`Executable`: a model prepared for one device, ready to run.

Feeds are checked before any runtime sees them (names, element types, ranks, static and shared
symbolic dimensions); every check is prepared once in ``__init__`` so a call costs little more
than the runtime's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from attrs import frozen

from hal.errors import InputError, RunError, VerificationError

if TYPE_CHECKING:
    from hal.backend import Device, Runner
    from hal.model import TensorInfo

__all__ = ["Executable", "LoweringStep", "Placement"]


@frozen
class Placement:
    """Which device ran which nodes (node names, or ``op_type#index`` for unnamed nodes)."""

    device: str
    nodes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "nodes": list(self.nodes)}


@frozen
class LoweringStep:
    """One change made to fit the model to a device, and why."""

    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail}


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
        self._run = runner.run
        self._output_names = [o.name for o in self.outputs]
        self._output_set = frozenset(self._output_names)
        self._input_names = frozenset(i.name for i in self.inputs)
        # (name, dtype, full static shape or None, rank or None, ((axis, size), ...))
        specs = []
        symbols: dict[str, list[tuple[str, int]]] = {}
        for info in self.inputs:
            shape = info.shape
            if shape is None:
                specs.append((info.name, info.dtype, None, None, ()))
                continue
            static = tuple((axis, d) for axis, d in enumerate(shape) if isinstance(d, int) and d > 0)
            full = tuple(shape) if len(static) == len(shape) else None
            specs.append((info.name, info.dtype, full, len(shape), static))
            for axis, d in enumerate(shape):
                if isinstance(d, str) and d:
                    symbols.setdefault(d, []).append((info.name, axis))
        self._specs = tuple(specs)
        self._shared = tuple((sym, tuple(uses)) for sym, uses in symbols.items() if len(uses) > 1)

    def __repr__(self) -> str:
        return f"<hal.Executable on {self.device.id}: {len(self.inputs)} inputs, {len(self.outputs)} outputs>"

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model. ``feeds`` maps every input name to an array of its element type
        (ml_dtypes arrays for bfloat16, FP8, int4, ...); returns ``{output name: array}``.

        Raises :class:`~hal.errors.InputError` for bad feeds or output names and
        :class:`~hal.errors.RunError` when the backend fails.
        """
        if len(feeds) != len(self._specs):
            self._raise_names(feeds)
        converted: dict[str, np.ndarray] | None = None
        for name, dtype, full, rank, static in self._specs:
            try:
                array = feeds[name]
            except KeyError:
                self._raise_names(feeds)
            if type(array) is not np.ndarray:
                array = self._convert(name, array, dtype)
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
                    self._raise_shape(name, array, full)
            elif rank is not None:
                if array.ndim != rank:
                    self._raise_shape(name, array, self._declared(name))
                for axis, size in static:
                    if array.shape[axis] != size:
                        self._raise_shape(name, array, self._declared(name))
        if converted is not None:
            feeds = converted
        if self._shared:
            self._check_shared(feeds)
        if output_names is None:
            names = self._output_names
        else:
            names = list(output_names)
            if not self._output_set.issuperset(names):
                unknown = [n for n in names if n not in self._output_set]
                msg = f"unknown output names {unknown}; the model's outputs are {self._output_names}"
                raise InputError(msg)
        try:
            results = self._run(feeds, names)  # type: ignore[arg-type]
        except VerificationError:
            raise  # verify="each-shape" caught the device answering wrong: say so as it is
        except Exception as exc:
            text = str(exc).strip().splitlines()
            msg = f"{self.device.id} failed to run the model: {text[0] if text else type(exc).__name__}"
            raise RunError(msg) from exc
        return dict(zip(names, results))

    # -- slow paths: only reached when something is wrong ---------------------------------------

    def _declared(self, name: str) -> tuple[int | str | None, ...]:
        for info in self.inputs:
            if info.name == name and info.shape is not None:
                return info.shape
        return ()

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
    def _raise_shape(name: str, array: np.ndarray, declared: Sequence[int | str | None]) -> None:
        if len(array.shape) != len(declared):
            msg = (
                f"input {name!r} has rank {array.ndim} (shape {list(array.shape)}), expected rank "
                f"{len(declared)} with shape {_shape_text(declared)}"
            )
        else:
            bad = [
                f"axis {axis} is {array.shape[axis]}, expected {d}"
                for axis, d in enumerate(declared)
                if isinstance(d, int) and d > 0 and array.shape[axis] != d
            ]
            msg = f"input {name!r} has shape {list(array.shape)}, expected {_shape_text(declared)}: {'; '.join(bad)}"
        raise InputError(msg)

    @staticmethod
    def _convert(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
        if isinstance(value, np.ndarray):  # a subclass: take it as a plain array
            return value.view(np.ndarray)
        if isinstance(value, (np.generic, int, float, bool, complex, str, list, tuple)):
            try:
                return np.asarray(value, dtype=dtype)
            except (TypeError, ValueError) as exc:
                msg = f"input {name!r} cannot be read as an array of {dtype}: {exc}"
                raise InputError(msg) from None
        msg = f"input {name!r} is a {type(value).__name__}; pass a numpy array of {dtype}"
        raise InputError(msg)

    def _check_shared(self, feeds: Mapping[str, np.ndarray]) -> None:
        for symbol, uses in self._shared:
            sizes = {(n, a): feeds[n].shape[a] for n, a in uses}
            if len(set(sizes.values())) > 1:
                shown = ", ".join(f"{n}[axis {a}]={s}" for (n, a), s in sizes.items())
                msg = f"dimension {symbol!r} must be the same size in every input that uses it: {shown}"
                raise InputError(msg)


def _dtype_expr(dtype: np.dtype) -> str:
    return f"ml_dtypes.{dtype.name}" if dtype.type.__module__.startswith("ml_dtypes") else f"np.{dtype.name}"
