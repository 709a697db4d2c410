"""Element-type legalization: compute in a wider format what a device can only store.

A device whose :class:`~hal.capabilities.Capabilities` rate a format below ``EMULATED`` (that is
``STORAGE``: it can hold and convert the format, not compute in it) gets every node that touches
the format rewritten as ``Cast`` to a wider format -> the node -> ``Cast`` back. Rounding to the
declared format after every node is kept, so the legalized model computes what the original
declares (precision is a contract); only the arithmetic inside each node is done wider.

Which nodes are left alone, and why (:data:`EXEMPT_OPS`): conversion operators are what
``STORAGE`` promises (``Cast``, ``CastLike``, ``QuantizeLinear``, ``DequantizeLinear``),
``Constant`` only holds a value and ``Shape`` only reads metadata. Data-movement operators
(Reshape, Concat, Gather, ...) are *not* exempt: measured on onnxruntime 1.32 CPU, Expand has no
bfloat16 kernel, Concat/Slice/Gather/Split/Squeeze have no float8 kernels and even Reshape and
Identity have no int4 kernel; a device that has them lists the format in
:attr:`~hal.capabilities.Capabilities.movable` and its data movement stays narrow. Moving elements
through a wider format is exact, so for those
(:data:`ELEMENT_MOVING_OPS`) the wide result is reused by later legalized nodes instead of being
cast down and up again. Control flow (:data:`CONTROL_FLOW_OPS`) is not rewritten itself; its bodies
are legalized.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from hal.capabilities import Capabilities, NumberFormat, Support
from hal.compiler._graph import subgraphs
from hal.errors import LoweringError
from hal.lowering import LoweringStep

__all__ = [
    "CONTROL_FLOW_OPS",
    "ELEMENT_MOVING_OPS",
    "EXEMPT_OPS",
    "legalize_formats",
    "wide_format",
]

#: Never rewritten: conversion (what STORAGE support means), holding a value, reading a shape.
EXEMPT_OPS = frozenset(
    {"Cast", "CastLike", "QuantizeLinear", "DequantizeLinear", "Constant", "Shape"}
)

#: Not rewritten themselves; the subgraphs they carry are legalized.
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})

#: Operators whose outputs only hold elements of their inputs (or a pad value of the same type):
#: computed in a wider format they give an exact wide copy of the narrow result.
ELEMENT_MOVING_OPS = frozenset(
    {
        "Identity",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "GatherElements",
        "GatherND",
        "Expand",
        "Tile",
        "Pad",
        "DepthToSpace",
        "SpaceToDepth",
        "ReverseSequence",
        "Compress",
        "Where",
        "ScatterElements",
        "ScatterND",
    }
)

_LEFT_AS_IS = EXEMPT_OPS | CONTROL_FLOW_OPS
_DEFAULT_DOMAINS = ("", "ai.onnx")
F = NumberFormat

#: Formats every value of which float16 represents exactly (so float16 is a valid wide format).
_EXACT_IN_FLOAT16 = frozenset(
    {
        F.FLOAT8_E4M3FN,
        F.FLOAT8_E4M3FNUZ,
        F.FLOAT8_E5M2,
        F.FLOAT8_E5M2FNUZ,
        F.FLOAT4_E2M1,
        F.FLOAT6_E2M3,
        F.FLOAT6_E3M2,
    }
)
_FIT_IN_INT32 = frozenset(
    {F.INT8, F.UINT8, F.INT16, F.UINT16, F.INT4, F.UINT4, F.INT2, F.UINT2}
)


def _candidates(fmt: NumberFormat) -> tuple[NumberFormat, ...]:
    if fmt.is_float:
        if fmt in (F.FLOAT32, F.FLOAT64):
            return () if fmt is F.FLOAT64 else (F.FLOAT64,)
        return (
            (F.FLOAT32, F.FLOAT16, F.FLOAT64)
            if fmt in _EXACT_IN_FLOAT16
            else (F.FLOAT32, F.FLOAT64)
        )
    if fmt in _FIT_IN_INT32:
        return (F.INT32, F.INT64)
    if fmt in (F.INT32, F.UINT32):
        return (F.INT64,)
    if fmt is F.COMPLEX64:
        return (F.COMPLEX128,)
    return ()  # bool, string, 64-bit integers, complex128: nothing wider holds them


def wide_format(fmt: NumberFormat, capabilities: Capabilities) -> NumberFormat | None:
    """The format to compute ``fmt`` in on this device: the first candidate that is native,
    else the first emulated one (float32 before float16 before float64 for floats; int32 before
    int64 for small integers), or None when no wider format can hold every value of ``fmt``."""
    candidates = _candidates(fmt)
    for level in (Support.NATIVE, Support.EMULATED):
        for wide in candidates:
            if capabilities.support(wide) is level:
                return wide
    return None


def _needs_legalizing(level: Support) -> bool:
    return not level.at_least(Support.EMULATED)


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _all_graphs(sub)


def _elem_type(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0


def _graph_types(graph: onnx.GraphProto, into: dict[str, int]) -> None:
    """Element types this graph declares (inputs, outputs, value_info, initializers, Constants)."""
    for values in (graph.input, graph.output, graph.value_info):
        for v in values:
            code = _elem_type(v)
            if code:
                into[v.name] = code
    for t in graph.initializer:
        into[t.name] = t.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    into[node.output[0]] = attr.t.data_type


class _Namer:
    """Fresh tensor and node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        taken: set[str] = set()
        for g in _all_graphs(model.graph):
            for node in g.node:
                taken.update(node.input)
                taken.update(node.output)
                taken.add(node.name)
            for values in (g.input, g.output, g.value_info):
                taken.update(v.name for v in values)
            taken.update(t.name for t in g.initializer)
        self.taken = taken

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


class _Legalizer:
    def __init__(self, model: onnx.ModelProto, capabilities: Capabilities) -> None:
        self.capabilities = capabilities
        self.namer = _Namer(model)
        self.main = model.graph
        # (op_type, narrow format, wide format) -> node count, in order of first appearance
        self.report: dict[tuple[str, NumberFormat, NumberFormat], int] = {}
        self.skipped: dict[tuple[str, NumberFormat], int] = {}

    # -- formats -------------------------------------------------------------------------------

    def _format(self, code: int) -> NumberFormat | None:
        try:
            return NumberFormat.from_onnx(code)
        except ValueError:
            return None

    def _check_storable(self, graph: onnx.GraphProto, types: dict[str, int]) -> None:
        """Refuse a format the device cannot even hold, naming the format and a tensor."""
        where: dict[str, str] = {}
        if graph is self.main:
            where.update((v.name, "graph input") for v in graph.input)
            where.update((v.name, "graph output") for v in graph.output)
        where.update((t.name, "initializer") for t in graph.initializer)
        names = list(where)
        for node in graph.node:
            names.extend(n for n in node.output if n)
        for name in names:
            fmt = self._format(types.get(name, 0))
            if fmt is not None and self.capabilities.support(fmt) is Support.NONE:
                role = where.get(name, "tensor")
                msg = (
                    f"{role} {name!r} is {fmt.value}, which this device cannot even store (support: none); "
                    f"convert the model to a format the device supports or choose another device"
                )
                raise LoweringError(msg)

    # -- rewriting -----------------------------------------------------------------------------

    def _cast(self, source: str, to: NumberFormat, out: str) -> onnx.NodeProto:
        return helper.make_node(
            "Cast", [source], [out], name=self.namer(f"{out}__cast"), to=to.onnx_type
        )

    def legalize(
        self, graph: onnx.GraphProto, types: dict[str, int], wide_of: dict[str, str]
    ) -> None:
        """Rewrite ``graph`` in place. ``types`` and ``wide_of`` (narrow tensor -> an exact wide copy)
        include the enclosing scopes'; both are extended with this graph's names."""
        _graph_types(graph, types)
        self._check_storable(graph, types)
        inserted: set[str] = (
            set()
        )  # Cast-back outputs, pruned below when nothing reads them
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            for sub in subgraphs(node):
                self.legalize(sub, dict(types), dict(wide_of))
            if node.op_type in _LEFT_AS_IS and node.domain in _DEFAULT_DOMAINS:
                nodes.append(node)
                continue
            nodes.extend(self._rewrite(node, types, wide_of, inserted))
        if inserted:
            nodes = self._prune(graph, nodes, inserted)
        del graph.node[:]
        graph.node.extend(nodes)

    def _rewrite(
        self,
        node: onnx.NodeProto,
        types: dict[str, int],
        wide_of: dict[str, str],
        inserted: set[str],
    ) -> list[onnx.NodeProto]:
        narrow: dict[
            NumberFormat, NumberFormat
        ] = {}  # narrow format -> wide format for this node
        skipped: set[NumberFormat] = set()
        unknown: list[str] = []
        movable = (
            self.capabilities.movable
            if node.op_type in ELEMENT_MOVING_OPS and node.domain in _DEFAULT_DOMAINS
            else frozenset()
        )
        for name in [*node.input, *node.output]:
            if not name:
                continue
            code = types.get(name, 0)
            fmt = self._format(code)
            if fmt is None:
                if name in node.output:
                    unknown.append(name)
                continue
            if (
                not _needs_legalizing(self.capabilities.support(fmt))
                or fmt in movable
                or fmt in narrow
                or fmt in skipped
            ):
                continue
            wide = wide_format(fmt, self.capabilities)
            if wide is None:
                skipped.add(fmt)
            else:
                narrow[fmt] = wide
        for fmt in skipped:
            key = (node.op_type, fmt)
            self.skipped[key] = self.skipped.get(key, 0) + 1
        if not narrow:
            return [node]
        if unknown:
            msg = (
                f"cannot compute {node.op_type} node {node.name or node.output[0]!r} in a wider format "
                f"than {', '.join(sorted(f.value for f in narrow))}: the element type of its output(s) "
                f"{', '.join(map(repr, unknown))} is unknown after shape inference"
            )
            raise LoweringError(msg)
        out: list[onnx.NodeProto] = []
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            fmt = self._format(types.get(name, 0)) if name else None
            if fmt in narrow:
                wide_name = wide_of.get(name)
                if wide_name is None:
                    wide_name = self.namer(f"{name}__as_{narrow[fmt].value}")
                    out.append(self._cast(name, narrow[fmt], wide_name))
                    wide_of[name] = wide_name
                    types[wide_name] = narrow[fmt].onnx_type
                new.input[i] = wide_name
        _widen_attributes(new, narrow)
        out.append(new)
        moving = node.op_type in ELEMENT_MOVING_OPS and node.domain in _DEFAULT_DOMAINS
        for j, name in enumerate(node.output):
            fmt = self._format(types.get(name, 0)) if name else None
            if fmt not in narrow:
                continue
            wide_name = self.namer(f"{name}__{narrow[fmt].value}")
            new.output[j] = wide_name
            types[wide_name] = narrow[fmt].onnx_type
            out.append(self._cast(wide_name, fmt, name))
            inserted.add(name)
            if moving:
                wide_of[name] = wide_name
        for fmt, wide in narrow.items():
            key = (node.op_type, fmt, wide)
            self.report[key] = self.report.get(key, 0) + 1
        return out

    def _prune(
        self, graph: onnx.GraphProto, nodes: list[onnx.NodeProto], inserted: set[str]
    ) -> list[onnx.NodeProto]:
        """Drop Cast-back nodes nothing reads (their consumers now read the exact wide copy)."""
        read = {o.name for o in graph.output}
        for node in nodes:
            read.update(node.input)
            for sub in subgraphs(node):
                for g in _all_graphs(sub):
                    read.update(o.name for o in g.output)
                    for n in g.node:
                        read.update(n.input)
        return [
            n
            for n in nodes
            if not (
                n.op_type == "Cast"
                and n.output[0] in inserted
                and n.output[0] not in read
            )
        ]

    def steps(self) -> list[LoweringStep]:
        steps = []
        for (op, fmt, wide), count in self.report.items():
            level = self.capabilities.support(fmt).value
            how = "moved" if op in ELEMENT_MOVING_OPS else "computed"
            exact = (
                " (exact: it only moves elements)" if op in ELEMENT_MOVING_OPS else ""
            )
            steps.append(
                LoweringStep(
                    "legalize-format",
                    f"{op} ({count} node{'s' if count != 1 else ''}) {how} in {wide.value} instead of {fmt.value}{exact}: "
                    f"{fmt.value} is {level}-only on this device",
                )
            )
        for (op, fmt), count in self.skipped.items():
            level = self.capabilities.support(fmt).value
            steps.append(
                LoweringStep(
                    "legalize-format-skipped",
                    f"{op} ({count} node{'s' if count != 1 else ''}) left in {fmt.value}: it is {level}-only on this "
                    f"device and no wider format it supports holds every {fmt.value} value; the backend may reject it",
                )
            )
        return steps


def _widen_attributes(
    node: onnx.NodeProto, narrow: dict[NumberFormat, NumberFormat]
) -> None:
    """Output types set by attributes (``dtype`` of EyeLike/Random*, ConstantOfShape's ``value``)."""
    codes = {fmt.onnx_type: wide for fmt, wide in narrow.items()}
    for attr in node.attribute:
        if attr.name == "dtype" and attr.type == AttributeProto.INT and attr.i in codes:
            attr.i = codes[attr.i].onnx_type
        elif attr.type == AttributeProto.TENSOR and attr.t.data_type in codes:
            if attr.t.data_location == onnx.TensorProto.EXTERNAL:
                msg = (
                    f"{node.op_type} node {node.name or node.output[0]!r} holds its {attr.t.data_type} value as "
                    "external data, which legalization does not read; store that value in the model"
                )
                raise LoweringError(msg)
            wide = codes[attr.t.data_type]
            value = numpy_helper.to_array(attr.t).astype(wide.dtype)
            attr.t.CopyFrom(numpy_helper.from_array(np.asarray(value), attr.t.name))


def legalize_formats(
    proto: onnx.ModelProto, capabilities: Capabilities
) -> tuple[onnx.ModelProto, list[LoweringStep]]:
    """Return a copy of ``proto`` that computes nothing in a format the device only stores.

    Every node outside :data:`EXEMPT_OPS` and :data:`CONTROL_FLOW_OPS` that reads or writes a
    tensor whose format ``capabilities`` rate ``STORAGE`` is computed in :func:`wide_format` of it
    (Cast in, node, Cast back to the declared format). Records one ``legalize-format`` step per
    (operator, format) and a ``legalize-format-skipped`` step where no wider format exists
    (string, bool, 64-bit integers).

    Raises :class:`~hal.errors.LoweringError` when a tensor (graph input or output, initializer or
    intermediate) has a format rated ``NONE``, or when a node to rewrite has outputs of unknown
    type. Returns ``proto`` itself and no steps when nothing needs changing.
    """
    try:
        model = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False
        )
    except Exception:  # noqa: BLE001 - too large or unknown domains: declared types are all there is
        model = onnx.ModelProto()
        model.CopyFrom(proto)
    legalizer = _Legalizer(model, capabilities)
    legalizer.legalize(model.graph, {}, {})
    steps = legalizer.steps()
    if not legalizer.report:
        return proto, steps
    return model, steps
