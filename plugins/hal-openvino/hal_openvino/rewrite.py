"""Rewrites of what OpenVINO's CPU plugin computes wrong, into what it computes right.

``Tile`` whose ``repeats`` come from a graph input or another node (not an initializer or a
``Constant``) gives wrong values in OpenVINO 2026.4's CPU plugin for rank-4 inputs repeated along
the last three axes (uninitialized memory for ``repeats=[1, 2, 2, 2]`` and ``[2, 2, 2, 2]`` on a
``[2, 3, 4, 5]`` input; ONNX's ``test_tile`` case), while every constant ``repeats`` and every
rank-1 to rank-5 ``repeats`` drawn from {1, 2, 3} through the rewrite below are right (checked
against ``numpy.tile`` in tests/test_openvino_rewrite.py). The rewrite is the definition of Tile:
each axis ``d`` of ``x`` gets a new axis of size 1 before it, broadcast to ``repeats[d]``
(``Expand``), and the pairs are merged (``Reshape`` to ``repeats * shape(x)``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["graphs", "tile_by_expand"]

_DEFAULT = ("", "ai.onnx")


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph inside it (If, Loop, Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graphs(attr.g)
            for sub in attr.graphs:
                yield from graphs(sub)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every value whose shape the model (or shape inference) states."""
    ranks: dict[str, int] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for value in (*graph.input, *graph.value_info, *graph.output):
            tt = value.type.tensor_type
            if value.type.HasField("tensor_type") and tt.HasField("shape"):
                ranks[value.name] = len(tt.shape.dim)
        for t in graph.initializer:
            ranks[t.name] = len(t.dims)

    for graph in graphs(model.graph):
        collect(graph)
    return ranks


def _computed_tiles(graph: onnx.GraphProto) -> list[int]:
    """Where in ``graph.node`` (not its subgraphs) the Tile nodes are whose ``repeats`` is not a
    constant (an initializer or a Constant's output)."""
    constants = {t.name for t in graph.initializer}
    constants.update(n.output[0] for n in graph.node if n.op_type == "Constant" and n.domain in _DEFAULT and n.output)
    return [
        index for index, node in enumerate(graph.node)
        if node.op_type == "Tile" and node.domain in _DEFAULT and len(node.input) == 2 and node.input[1] not in constants
    ]


def tile_by_expand(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every Tile whose ``repeats`` is not a constant written as
    Unsqueeze/Expand/Reshape, and how many were rewritten (``model`` itself when none)."""
    targets = [graph.node[i] for graph in graphs(model.graph) for i in _computed_tiles(graph)]
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT), 0)
    if not targets or opset < 8:  # Expand is opset 8's
        return model, 0
    ranks = _ranks(model)
    if any(node.input[0] not in ranks for node in targets):
        ranks = _ranks(onnx.shape_inference.infer_shapes(model))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {name for g in graphs(out.graph) for n in g.node for name in (*n.input, *n.output, n.name)}
    count = 0

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    for graph in graphs(out.graph):
        tiles = set(_computed_tiles(graph))
        if not tiles:
            continue
        nodes: list[onnx.NodeProto] = []
        for index, node in enumerate(graph.node):
            if index not in tiles:
                nodes.append(node)
                continue
            x, repeats = node.input
            rank = ranks.get(x)
            if rank is None or rank == 0:  # unknown rank: OpenVINO's CPU refuses dynamic ranks anyway
                nodes.append(node)
                continue
            base = node.name or f"tile{count}"

            def const(name: str, value: np.ndarray) -> str:
                tensor = fresh(f"{base}/{name}")
                nodes.append(helper.make_node("Constant", [], [tensor], value=numpy_helper.from_array(value, tensor)))
                return tensor

            def unsqueeze(value: str, axes: list[int], output: str) -> onnx.NodeProto:
                if opset < 13:  # axes became an input in opset 13
                    return helper.make_node("Unsqueeze", [value], [output], axes=axes)
                return helper.make_node("Unsqueeze", [value, const(f"axes_{len(nodes)}", np.array(axes, np.int64))], [output])

            flat = const("flat", np.array([-1], np.int64))
            spread, shape, reps, dims, pairs, target, wide, sizes = (
                fresh(f"{base}/{n}") for n in ("spread", "shape", "reps", "dims", "pairs", "target", "wide", "sizes")
            )
            repeats64 = fresh(f"{base}/repeats")
            nodes.append(unsqueeze(x, list(range(0, 2 * rank, 2)), spread))  # [1, d0, 1, d1, ...]
            nodes.append(helper.make_node("Shape", [x], [shape]))
            nodes.append(helper.make_node("Cast", [repeats], [repeats64], to=onnx.TensorProto.INT64))
            nodes.append(unsqueeze(repeats64, [1], reps))
            nodes.append(unsqueeze(shape, [1], dims))
            nodes += [
                helper.make_node("Concat", [reps, dims], [pairs], axis=1),
                helper.make_node("Reshape", [pairs, flat], [target]),  # [r0, d0, r1, d1, ...]
                helper.make_node("Expand", [spread, target], [wide]),
                helper.make_node("Mul", [repeats64, shape], [sizes]),
                helper.make_node("Reshape", [wide, sizes], list(node.output), name=node.name),
            ]
            count += 1
        del graph.node[:]
        graph.node.extend(nodes)
    return out, count
