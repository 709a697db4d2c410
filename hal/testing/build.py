"""Small builders for test models, shared by the core's and the plugins' tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import helper

__all__ = ["make_model"]


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Iterable[tuple[str, int, Sequence[int | str] | None]],
    outputs: Iterable[tuple[str, int, Sequence[int | str] | None]],
    *,
    initializers: Iterable[onnx.TensorProto] = (),
    opset: int = 17,
    ir_version: int = 9,
) -> onnx.ModelProto:
    """A model from nodes and ``(name, onnx element type, shape)`` inputs and outputs."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
