"""What kinds of graph inputs and outputs a device takes: tensors always; sequences and optionals
where its :attr:`~hal.capabilities.Capabilities.io_kinds` declare them (its runner must pass lists
and None); maps, sparse tensors and sequences of sequences nowhere, as the HAL's API has no
Python value for them.
"""

from __future__ import annotations

import onnx

from hal.capabilities import Capabilities, ValueKind
from hal.errors import LoweringError
from hal.model import _tensor_info

__all__ = ["check_io"]


def check_io(proto: onnx.ModelProto, capabilities: Capabilities) -> None:
    """Raise :class:`~hal.errors.LoweringError` naming the first graph input or output (initializers
    excluded) that the HAL cannot pass, or that is a kind the device does not declare."""
    initializers = {t.name for t in proto.graph.initializer}
    for what, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            info = _tensor_info(value)
            if info is None:
                msg = (
                    f"{what} {value.name!r} is a {_onnx_type(value.type)}; "
                    "the HAL passes tensors, sequences of tensors and optionals of either, nothing else: "
                    "change the model's inputs and outputs to those"
                )
                raise LoweringError(msg)
            if info.kind is not ValueKind.TENSOR and info.kind not in capabilities.io_kinds:
                declared = ", ".join(k.value for k in ValueKind if k in capabilities.io_kinds)
                msg = (
                    f"{what} {value.name!r} is {_a(info.describe())}, and the device passes "
                    f"{f'tensors and {declared}' if declared else 'tensors only'} (Capabilities.io_kinds): "
                    f"run the model on a device that declares {info.kind.value!r} there, such as ort:cpu"
                )
                raise LoweringError(msg)


def _a(text: str) -> str:
    return f"{'an' if text[:1] in 'aeiou' else 'a'} {text}"


def _onnx_type(tp: onnx.TypeProto) -> str:
    """A type as ONNX's operator schemas spell it: ``map(int64, seq(tensor(float)))``."""
    which = tp.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        code = getattr(tp, which).elem_type
        known = code in onnx.TensorProto.DataType.values()
        return f"{which.removesuffix('_type')}({onnx.TensorProto.DataType.Name(code).lower() if known else code})"
    if which == "sequence_type":
        return f"seq({_onnx_type(tp.sequence_type.elem_type)})"
    if which == "optional_type":
        return f"optional({_onnx_type(tp.optional_type.elem_type)})"
    if which == "map_type":
        key = onnx.TensorProto.DataType.Name(tp.map_type.key_type).lower()
        return f"map({key}, {_onnx_type(tp.map_type.value_type)})"
    return which or "untyped value"
