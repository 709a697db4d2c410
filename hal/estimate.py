"""An estimate of a model's latency on a device from the device's declared figures: a roofline.

Never a measurement, and always labelled as one: every figure this module gives is an
:class:`Estimate` whose ``kind`` is ``"estimated"`` and whose ``assumptions`` say what it had to
guess. It is what a user can know about a chip before owning one (a simulated device's profile, a
datasheet), and it is what ``hal bench`` prints beside, never instead of, what it measured.

The model: each node of the lowered graph costs

    max(flops / peak throughput for its format, bytes moved / memory bandwidth) + launch overhead

with FLOPs from the node's operator and shapes (onnx shape inference, on the feeds' shapes where
given), bytes the sizes of its inputs and outputs, the peak from
:attr:`Capabilities.peak_tflops` (the node's output format; the lowest declared peak where that
format has none), the bandwidth from :attr:`Memory.bandwidth_gbps` and the launch overhead from
:attr:`Capabilities.launch_overhead_us`. A node is ``compute``-, ``memory``- or ``launch``-bound by
which term dominates. Nodes run one after another (no overlap between kernels); views
(Reshape, Squeeze, ...) cost nothing; a DequantizeLinear that only feeds a MatMul, Gemm or Conv
weight is counted inside that node (a fused weight-only kernel reads the narrow weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

from hal.capabilities import Capabilities, NumberFormat
from hal.errors import DeviceError

if TYPE_CHECKING:
    import onnx

    from hal.lowering import LoweredModel

__all__ = ["Estimate", "NodeEstimate", "estimate"]

#: Operators that only relabel their input's elements: no kernel on an accelerator runtime.
VIEW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant"})
#: Operators that move elements without arithmetic: bytes only.
MOVE_OPS = frozenset(
    {
        "Transpose", "Concat", "Slice", "Split", "Gather", "GatherElements", "GatherND", "Expand", "Tile",
        "Pad", "Cast", "CastLike", "Where", "ScatterElements", "ScatterND", "DepthToSpace", "SpaceToDepth",
    }
)
#: FLOPs per output element for operators that do more than one operation per element.
_PER_ELEMENT = {
    "Softmax": 5, "LogSoftmax": 5, "LayerNormalization": 8, "BatchNormalization": 4,
    "InstanceNormalization": 8, "GroupNormalization": 8, "Gelu": 8, "Erf": 8, "Tanh": 6, "Sigmoid": 4,
    "Exp": 4, "Log": 4, "Pow": 8, "Sqrt": 2, "HardSigmoid": 3, "Swish": 5, "Mish": 10,
    "QuantizeLinear": 3, "DequantizeLinear": 2,
}
_REDUCTIONS = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceSumSquare", "ReduceLogSumExp", "GlobalAveragePool", "GlobalMaxPool", "ArgMax", "ArgMin",
    }
)
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_WEIGHT_USERS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}


@frozen
class NodeEstimate:
    """One node's share: its FLOPs, the bytes it moves, the format whose peak was used, the time and
    what bounds it: ``compute``, ``memory``, ``launch``; ``view`` (no kernel), ``fused`` (counted in
    its consumer) or ``unknown`` (its shapes are, or it is control flow: its launch only)."""

    node: str
    op_type: str
    flops: float
    bytes: int
    format: str | None
    seconds: float
    bound: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "op_type": self.op_type, "flops": self.flops, "bytes": self.bytes,
            "format": self.format, "seconds": self.seconds, "bound": self.bound,
        }


@frozen
class Estimate:
    """A roofline estimate of one run's latency. ``kind`` is always ``"estimated"``: print it
    beside measurements, never as one. ``assumptions`` lists what had to be guessed (a format
    without a declared peak, dimensions taken as 1, nodes whose shapes are unknown)."""

    seconds: float
    nodes: tuple[NodeEstimate, ...] = field(converter=tuple)
    assumptions: tuple[str, ...] = field(default=(), converter=tuple)
    kind: str = "estimated"

    @property
    def flops(self) -> float:
        return sum(n.flops for n in self.nodes)

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    def bound_by(self) -> dict[str, int]:
        """How many nodes each bound has: ``{"compute": 3, "memory": 12, ...}``."""
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.bound] = counts.get(n.bound, 0) + 1
        return counts

    def top(self, count: int = 5) -> list[NodeEstimate]:
        """The ``count`` nodes that take longest."""
        return sorted(self.nodes, key=lambda n: n.seconds, reverse=True)[:count]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "seconds": self.seconds, "flops": self.flops, "bytes": self.bytes,
            "bound_by": self.bound_by(), "assumptions": list(self.assumptions),
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def __str__(self) -> str:
        counts = self.bound_by()
        bounds = ", ".join(
            f"{counts[b]} {b}-bound" if b in ("compute", "memory", "launch") else f"{counts[b]} {b}"
            for b in ("compute", "memory", "launch", "view", "fused", "unknown") if b in counts
        )
        return f"estimated {_time(self.seconds)} (roofline over {len(self.nodes)} nodes: {bounds})"


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


class _Shapes:
    """Element format and shape of every value of the graph, from onnx's shape inference."""

    def __init__(self, proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None) -> None:
        from hal.model import infer_shapes

        graph = infer_shapes(proto, shapes).graph
        self.assumed: set[str] = set()
        self.values: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
        for value in (*graph.input, *graph.value_info, *graph.output):
            if not value.type.HasField("tensor_type"):
                continue
            tensor = value.type.tensor_type
            dims = None
            if tensor.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            self.values[value.name] = (tensor.elem_type, dims)
        for tensor in proto.graph.initializer:
            self.values[tensor.name] = (tensor.data_type, tuple(tensor.dims))
        self._inputs = {v.name for v in graph.input}

    def shape(self, name: str) -> tuple[int, ...] | None:
        found = self.values.get(name)
        if found is None or found[1] is None:
            return None
        dims = found[1]
        if any(d is None for d in dims):
            if name in self._inputs:
                self.assumed.add(name)
            dims = tuple(1 if d is None else d for d in dims)
        return dims  # type: ignore[return-value]

    def format(self, name: str) -> NumberFormat | None:
        found = self.values.get(name)
        if found is None or not found[0]:
            return None
        try:
            return NumberFormat.from_onnx(found[0])
        except ValueError:
            return None

    def nbytes(self, name: str) -> int | None:
        shape, fmt = self.shape(name), self.format(name)
        if shape is None or fmt is None:
            return None
        return (math.prod(shape) * fmt.bits + 7) // 8


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _flops(node: onnx.NodeProto, shapes: _Shapes) -> float | None:
    """FLOPs of one node, or None where its shapes are unknown."""
    op = node.op_type
    out = shapes.shape(node.output[0]) if node.output and node.output[0] else None
    if op in VIEW_OPS or op in MOVE_OPS:
        return 0.0
    if out is None:
        return None
    elements = math.prod(out)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shapes.shape(node.input[0])
        return None if not a else 2.0 * elements * a[-1]
    if op == "Gemm":
        a = shapes.shape(node.input[0])
        if not a or len(a) != 2:
            return None
        k = a[0] if _attr(node, "transA") else a[1]
        return 2.0 * elements * k + (elements if len(node.input) > 2 and node.input[2] else 0)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes.shape(node.input[3 if op == "QLinearConv" else 1])
        return None if not w else 2.0 * elements * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = shapes.shape(node.input[0]), shapes.shape(node.input[1])
        return None if not x or not w else 2.0 * math.prod(x) * math.prod(w[1:])
    if op in _REDUCTIONS:
        x = shapes.shape(node.input[0])
        return None if x is None else float(math.prod(x))
    if op in _POOLS:
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [1])
        return float(elements * math.prod(kernel))
    return float(elements * _PER_ELEMENT.get(op, 1))


def _fused_dequantize(graph: onnx.GraphProto) -> dict[str, str]:
    """Outputs of DequantizeLinear nodes over an initializer that only feed weight inputs of
    MatMul/Gemm/Conv, each with the narrow initializer it reads: a weight-only quantized kernel
    reads the narrow tensor itself."""
    initializers = {t.name for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    fused = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if users and all(_WEIGHT_USERS.get(u.op_type) == i for u, i in users):
            fused[node.output[0]] = node.input[0]
    return fused


class _Roofline:
    def __init__(self, capabilities: Capabilities, assumptions: list[str]) -> None:
        self.peaks = {fmt: tflops * 1e12 for fmt, tflops in capabilities.peak_tflops if tflops > 0}
        bandwidth = capabilities.memory.bandwidth_gbps
        self.bandwidth = bandwidth * 1e9 if bandwidth else None
        self.launch = (capabilities.launch_overhead_us or 0.0) * 1e-6
        if not self.peaks and self.bandwidth is None and capabilities.launch_overhead_us is None:
            msg = (
                "cannot estimate: the device declares neither peak throughput (Capabilities.peak_tflops), "
                "memory bandwidth (Memory.bandwidth_gbps) nor launch overhead; a plugin or profile must declare them"
            )
            raise DeviceError(msg)
        if not self.peaks:
            assumptions.append("no peak throughput declared: compute time not counted (memory and launch only)")
        if self.bandwidth is None:
            assumptions.append("no memory bandwidth declared: memory time not counted (compute and launch only)")
        if capabilities.launch_overhead_us is None:
            assumptions.append("no launch overhead declared: none counted")
        self.missing: set[NumberFormat] = set()
        self._slowest = min(self.peaks.values()) if self.peaks else None

    def peak(self, fmt: NumberFormat | None) -> float | None:
        if fmt is not None and fmt in self.peaks:
            return self.peaks[fmt]
        if fmt is not None and self._slowest is not None:
            self.missing.add(fmt)
        return self._slowest


def estimate(
    model: LoweredModel | onnx.ModelProto,
    capabilities: Capabilities,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Estimate:
    """A roofline estimate of one run of ``model`` (as lowered for the device) on a device with
    ``capabilities``. ``shapes`` gives graph inputs' shapes (``{name: feed.shape}``); without it,
    symbolic dimensions count as 1 and the estimate says so. Raises
    :class:`~hal.errors.DeviceError` when the device declares neither peak throughput nor memory
    bandwidth. Nodes inside control flow (If, Loop, Scan bodies) are not estimated: such a node
    counts its launch only, and the estimate says so."""
    proto = getattr(model, "proto", model)
    assumptions: list[str] = []
    roof = _Roofline(capabilities, assumptions)
    values = _Shapes(proto, shapes)
    fused = _fused_dequantize(proto.graph)
    nodes = []
    unknown = []
    for index, node in enumerate(proto.graph.node):
        name = node.name or f"{node.op_type}#{index}"
        if node.op_type in VIEW_OPS:
            nodes.append(NodeEstimate(name, node.op_type, 0.0, 0, None, 0.0, "view"))
            continue
        if node.output and node.output[0] in fused:
            nodes.append(NodeEstimate(name, node.op_type, 0.0, 0, None, 0.0, "fused"))
            continue
        flops = _flops(node, values)
        # A fused kernel reads the narrow weight, not the dequantized one.
        moved = [values.nbytes(fused.get(i, i)) for i in (*node.input, *node.output) if i]
        if node.op_type in _CONTROL_FLOW or flops is None or None in moved:
            unknown.append(name)
            nodes.append(NodeEstimate(name, node.op_type, 0.0, 0, None, roof.launch, "unknown"))
            continue
        nbytes = sum(b for b in moved if b is not None)
        fmt = values.format(node.output[0]) if node.output else None
        peak = roof.peak(fmt) if flops else None
        compute = flops / peak if peak else 0.0
        memory = nbytes / roof.bandwidth if roof.bandwidth else 0.0
        busy = max(compute, memory)
        bound = "launch" if roof.launch > busy else ("compute" if compute >= memory else "memory")
        nodes.append(
            NodeEstimate(name, node.op_type, flops, nbytes, fmt.value if fmt else None, busy + roof.launch, bound)
        )
    if roof.missing:
        formats = ", ".join(sorted(f.value for f in roof.missing))
        assumptions.append(f"no peak declared for {formats}: the lowest declared peak used")
    if values.assumed:
        assumptions.append(f"symbolic dimensions of {', '.join(sorted(values.assumed))} taken as 1: pass shapes")
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        assumptions.append(f"{len(unknown)} nodes not estimated (shapes unknown or control flow): {shown}")
    return Estimate(sum(n.seconds for n in nodes), tuple(nodes), tuple(assumptions))
