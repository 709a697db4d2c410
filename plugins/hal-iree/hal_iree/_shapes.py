"""The output shapes a model gives for the input shapes of a run, for a runtime that does not say.

IREE compiles a model whose dimensions are only known at run time assuming that two dynamic
dimensions it combines elementwise are equal: it never broadcasts one of size 1 against another,
and it does not check. ``Sub(a[n], b[m])`` run with a[1] and b[4] answers one element (ONNX and
numpy: four), with a[3] and b[4] it answers three (ONNX: an error). The contract kit found it
(``test_dynamic_shapes_broadcast_or_fail_at_run_time``).

:class:`ShapeOracle` asks onnx's shape inference, with the run's concrete input shapes, what the
model's outputs must be, once per input-shape signature: where inference refuses the shapes, the
run is refused before IREE sees it; where IREE's answer has another shape, it is refused after.
Either is a refusal naming the shapes, never a wrong answer. Models whose inputs are all static
need no oracle (IREE compiled those shapes).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import shape_inference

from hal.plugin import weightless

__all__ = ["ShapeMismatch", "ShapeOracle"]

#: Initializers larger than this many bytes are dropped from the oracle's copy of the graph:
#: shape inference needs only the small ones (a Reshape's target shape), and weights would double
#: the model's memory.
_KEEP_BYTES = 4096


class ShapeMismatch(RuntimeError):
    """The run's input shapes do not fit the model, or IREE answered another shape."""


class ShapeOracle:
    """Expected output shapes per input-shape signature, from onnx's shape inference."""

    def __init__(self, proto: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._model = _weightless(proto)
        self._known: dict[tuple[tuple[int, ...], ...], tuple[tuple[int | None, ...] | None, ...] | str] = {}
        self._lock = threading.Lock()

    @classmethod
    def needed(cls, proto: onnx.ModelProto) -> bool:
        """True when a graph input has a dimension that is not a fixed size."""
        names = {t.name for t in proto.graph.initializer}
        for value in proto.graph.input:
            if value.name in names:
                continue
            shape = value.type.tensor_type.shape
            if not value.type.tensor_type.HasField("shape"):
                return True
            if any(not (d.HasField("dim_value") and d.dim_value > 0) for d in shape.dim):
                return True
        return False

    def before(self, feeds: Mapping[str, np.ndarray]) -> tuple[tuple[int | None, ...] | None, ...]:
        """The outputs' shapes for ``feeds`` (None where inference cannot say); raises
        :class:`ShapeMismatch` when the shapes do not fit the model."""
        signature = tuple(feeds[name].shape for name in self._inputs)
        expected = self._known.get(signature)
        if expected is None:
            expected = self._infer(signature)
            with self._lock:
                self._known[signature] = expected
        if isinstance(expected, str):
            raise ShapeMismatch(expected)
        return expected

    def after(self, expected: tuple[tuple[int | None, ...] | None, ...], names: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        """Raise :class:`ShapeMismatch` where IREE's answer has another shape than the model's."""
        index = {name: i for i, name in enumerate(self._outputs)}
        for name, array in zip(names, arrays):
            want = expected[index[name]]
            if want is None:
                continue
            if len(want) != array.ndim or any(w is not None and w != got for w, got in zip(want, array.shape)):
                shown = tuple("?" if w is None else w for w in want)
                msg = (
                    f"IREE answered output '{name}' with shape {tuple(array.shape)} where the model gives "
                    f"{shown} for these input shapes: IREE does not broadcast dimensions the model leaves "
                    "dynamic; pass inputs of equal sizes there, or a model with fixed sizes"
                )
                raise ShapeMismatch(msg)

    def _infer(self, signature: tuple[tuple[int, ...], ...]) -> tuple[tuple[int | None, ...] | None, ...] | str:
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        by_name = dict(zip(self._inputs, signature))
        for value in model.graph.input:
            if value.name in by_name:
                shape = value.type.tensor_type.shape
                shape.Clear()
                for size in by_name[value.name]:
                    shape.dim.add().dim_value = size
        for value in model.graph.output:
            value.type.tensor_type.ClearField("shape")
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - InferenceError, or onnx's C++ errors as RuntimeError
            shown = ", ".join(f"{n}{list(s)}" for n, s in by_name.items())
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"the input shapes {shown} do not fit the model: {first}"
        out: dict[str, tuple[int | None, ...] | None] = {}
        for value in inferred.graph.output:
            tensor = value.type.tensor_type
            if not tensor.HasField("shape"):
                out[value.name] = None
                continue
            out[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return tuple(out.get(name) for name in self._outputs)


def _weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without its large or external initializers (graph inputs of their shape instead)."""
    return weightless(
        proto, lambda t: t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= _KEEP_BYTES
    )
