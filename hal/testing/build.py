"""Small builders for test models, shared by the core's and the plugins' tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import helper

__all__ = ["make_model", "optional_info", "sequence_info"]

#: An input or output: ``(name, onnx element type, shape)`` for a tensor, or a ValueInfoProto.
Value = tuple[str, int, Sequence[int | str] | None] | onnx.ValueInfoProto


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Iterable[Value],
    outputs: Iterable[Value],
    *,
    initializers: Iterable[onnx.TensorProto] = (),
    opset: int = 17,
    ir_version: int = 9,
) -> onnx.ModelProto:
    """A model from nodes and ``(name, onnx element type, shape)`` inputs and outputs (or value
    infos, e.g. from :func:`sequence_info` and :func:`optional_info`)."""

    def info(value: Value) -> onnx.ValueInfoProto:
        return value if isinstance(value, onnx.ValueInfoProto) else helper.make_tensor_value_info(*value)

    graph = helper.make_graph(
        list(nodes), "test", [info(v) for v in inputs], [info(v) for v in outputs], initializer=list(initializers)
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def sequence_info(name: str, elem_type: int, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    """A graph input or output holding a sequence of tensors of ``elem_type`` and ``shape``."""
    return helper.make_tensor_sequence_value_info(name, elem_type, shape)


def optional_info(
    name: str, elem_type: int, shape: Sequence[int | str | None] | None, *, sequence: bool = False
) -> onnx.ValueInfoProto:
    """A graph input or output holding an optional tensor (or, with ``sequence``, an optional
    sequence of tensors) of ``elem_type`` and ``shape``."""
    element = helper.make_tensor_type_proto(elem_type, shape)
    if sequence:
        element = helper.make_sequence_type_proto(element)
    return helper.make_value_info(name, helper.make_optional_type_proto(element))
