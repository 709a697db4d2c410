"""Safe loading of untrusted ONNX models, and what a model requires of a device.

:func:`load` refuses, with a :class:`~hal.errors.ModelError` that says what to do: empty,
truncated or garbage files; files over a size bound; external data whose location is absolute,
contains ``..``, goes through a symbolic link or is a hard link, or whose offset and length leave
the file. External data stays external: each file is opened once (without following links,
checked to be the file examined) and mapped read-only (:mod:`hal.weights`); no runtime ever
opens a path named inside a model.

It also refuses subgraphs (If/Loop/Scan bodies) nested deeper than :data:`MAX_GRAPH_DEPTH`, so
no walker of the graph, ours or a runtime's, meets unbounded recursion; and models that contradict
themselves — an element type ONNX does not define, shapes that cannot broadcast, a declared output
whose shape or type its own graph does not compute — found by onnx's strict shape inference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections import Counter
from functools import cached_property
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
from attrs import field, frozen
from google.protobuf.message import DecodeError
from onnx import TensorProto

from hal.capabilities import NumberFormat, ValueKind
from hal.errors import ModelError, first_line
from hal.weights import Weights, _walk_tensors, external_tensors, is_external, weightless

__all__ = ["MAX_GRAPH_DEPTH", "Model", "Requirements", "TensorInfo", "load"]

log = logging.getLogger("hal.model")

#: Default bounds; override with HAL_MAX_MODEL_BYTES and HAL_MAX_EXTERNAL_BYTES.
MAX_MODEL_BYTES = 2**31 - 1  # protobuf cannot parse a larger message anyway
MAX_EXTERNAL_BYTES = 64 * 2**30
#: Deepest subgraph nesting :func:`load` accepts (the main graph is level 0). Protobuf reads at
#: most 100 nested messages, which is 31 levels of If bodies: no runtime given the model's bytes
#: reads a deeper one, and every graph walker of the HAL may recurse this far and no further.
MAX_GRAPH_DEPTH = 30


def _bound(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        msg = f"{name}={raw!r} is not a byte count; set it to an integer such as {default}"
        raise ModelError(msg) from None


@frozen
class TensorInfo:
    """An input or output: name, element format and shape (ints, symbolic names or None).

    ``kind`` says what the value holds (:class:`~hal.capabilities.ValueKind`): a tensor, or a
    sequence of tensors, an optional tensor or an optional sequence, whose elements have this
    format and shape (each element of a sequence alike; ``shape`` None: any rank).
    """

    name: str
    format: NumberFormat
    shape: tuple[int | str | None, ...] | None
    kind: ValueKind = field(default=ValueKind.TENSOR, converter=ValueKind)

    @property
    def dtype(self) -> Any:
        return self.format.dtype

    def describe(self) -> str:
        """The type as ``hal inspect`` prints it: ``float32 [1, ?]``, ``sequence of float32 [?, 3]``,
        ``optional float32 [2]``, ``optional sequence of int64 any shape``."""
        if self.shape is None:
            shape = "any shape"
        else:
            shape = "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        prefix = {
            ValueKind.TENSOR: "",
            ValueKind.SEQUENCE: "sequence of ",
            ValueKind.OPTIONAL: "optional ",
            ValueKind.OPTIONAL_SEQUENCE: "optional sequence of ",
        }[self.kind]
        return f"{prefix}{self.format.value} {shape}"

    def to_dict(self) -> dict[str, Any]:
        shape = None if self.shape is None else list(self.shape)
        out: dict[str, Any] = {"name": self.name, "format": self.format.value, "shape": shape}
        if self.kind is not ValueKind.TENSOR:  # a tensor's record stays as it always was
            out["kind"] = self.kind.value
        return out


def _element_tensor(tp: onnx.TypeProto) -> tuple[ValueKind, Any] | None:
    """``(kind, the element's TypeProto.Tensor)`` for the kinds of value the HAL passes, None for
    the others (maps, sparse tensors, sequences of sequences, untyped values)."""
    kind = ValueKind.TENSOR
    which = tp.WhichOneof("value")
    if which == "optional_type":
        kind, tp = ValueKind.OPTIONAL, tp.optional_type.elem_type
        which = tp.WhichOneof("value")
    if which == "sequence_type":
        kind = ValueKind.OPTIONAL_SEQUENCE if kind is ValueKind.OPTIONAL else ValueKind.SEQUENCE
        tp = tp.sequence_type.elem_type
        which = tp.WhichOneof("value")
    return (kind, tp.tensor_type) if which == "tensor_type" else None


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo | None:
    found = _element_tensor(value.type)
    if found is None:
        return None
    kind, tt = found
    shape: tuple[int | str | None, ...] | None = None
    if tt.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    try:
        fmt = NumberFormat.from_onnx(tt.elem_type)
    except ValueError:
        msg = f"tensor {value.name!r} has element type code {tt.elem_type}, which this ONNX version does not define"
        raise ModelError(msg) from None
    return TensorInfo(value.name, fmt, shape, kind)


@frozen
class Requirements:
    """What a model needs from a device. ``hal inspect`` prints it."""

    ir_version: int
    opsets: tuple[tuple[str, int], ...]
    operators: tuple[tuple[str, str, int], ...]  # (domain, op_type, count)
    formats: tuple[NumberFormat, ...]
    dynamic_dims: tuple[tuple[str, int, str], ...]  # (tensor, axis, symbol or '?')
    parameter_bytes: int
    estimated_memory_bytes: int

    @property
    def opset(self) -> int:
        """The default-domain (``ai.onnx``) opset."""
        return dict(self.opsets).get("", dict(self.opsets).get("ai.onnx", 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ir_version": self.ir_version,
            "opsets": {d or "ai.onnx": v for d, v in self.opsets},
            "operators": [{"domain": d or "ai.onnx", "op_type": o, "count": c} for d, o, c in self.operators],
            "formats": [f.value for f in self.formats],
            "dynamic_dims": [{"tensor": t, "axis": a, "symbol": s} for t, a, s in self.dynamic_dims],
            "parameter_bytes": self.parameter_bytes,
            "estimated_memory_bytes": self.estimated_memory_bytes,
        }


class Model:
    """A safely loaded ONNX model. Build with :func:`load`.

    ``proto`` is the graph; tensors stored as external data stay external, their bytes held by
    ``weights`` (:class:`hal.weights.Weights`: checked, open and mapped files), None when the
    model keeps every tensor inside the protobuf.
    """

    def __init__(self, proto: onnx.ModelProto, *, path: Path | None = None, weights: Weights | None = None) -> None:
        self.proto = proto
        self.path = path
        self.weights = weights

    def __repr__(self) -> str:
        external = f", {self.weights.nbytes} bytes of external data" if self.weights is not None else ""
        return f"<hal.Model {self.name!r} {len(self.proto.graph.node)} nodes{external}>"

    def self_contained(self) -> onnx.ModelProto:
        """The model with its external data inside the protobuf (for runtimes that take one
        message); raises :class:`~hal.errors.ModelError` past protobuf's 2 GiB."""
        return self.proto if self.weights is None else self.weights.inline(self.proto)

    @property
    def name(self) -> str:
        return self.proto.graph.name or (self.path.stem if self.path else "model")

    @cached_property
    def serialized(self) -> bytes:
        return self.proto.SerializeToString(deterministic=True)

    @cached_property
    def digest(self) -> str:
        """The model's content hash: sha256 of the deterministic serialization, each external
        reference replaced by the sha256 of its bytes (hashed once, see :mod:`hal.weights`)."""
        if self.weights is None:
            return hashlib.sha256(self.serialized).hexdigest()
        digest = hashlib.sha256(self.weights.normalized(self.proto)).hexdigest()
        self.weights.remember()
        return digest

    @cached_property
    def inputs(self) -> tuple[TensorInfo, ...]:
        initializers = {t.name for t in self.proto.graph.initializer}
        infos = (_tensor_info(v) for v in self.proto.graph.input if v.name not in initializers)
        return tuple(i for i in infos if i is not None)

    @cached_property
    def outputs(self) -> tuple[TensorInfo, ...]:
        infos = (_tensor_info(v) for v in self.proto.graph.output)
        return tuple(i for i in infos if i is not None)

    @cached_property
    def requirements(self) -> Requirements:
        return analyze(self.proto)


# -- loading -----------------------------------------------------------------------------------


def load(source: str | os.PathLike[str] | bytes | onnx.ModelProto | Model, *, base_dir: str | os.PathLike[str] | None = None) -> Model:
    """Load an ONNX model from a path, its bytes or a ``ModelProto``, checking it on the way.

    External data is allowed only next to a model file (or under ``base_dir`` for bytes and
    protos); it stays in its files, checked, open and mapped (``Model.weights``). Raises
    :class:`~hal.errors.ModelError` for anything unusable or unsafe.
    """
    if isinstance(source, Model):
        return source
    path: Path | None = None
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(source), "the bytes given")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        proto = _parse(_read_model_file(path), str(path))
        base_dir = path.parent if base_dir is None else base_dir
    else:
        msg = f"hal.load takes a path, bytes or onnx.ModelProto, not {type(source).__name__}"
        raise ModelError(msg)
    where = str(path) if path else "model"
    _check_structure(proto, where)
    _check_depth(proto, where)
    weights = _external_data(proto, Path(base_dir) if base_dir is not None else None, where)
    _check_onnx(proto, where)
    _check_consistent(proto, where)
    return Model(proto, path=path, weights=weights)


def _read_model_file(path: Path) -> bytes:
    try:
        st = os.stat(path)
    except ValueError:  # os.stat's answer to a NUL byte, which no file name can hold
        msg = f"model path {str(path)!r} contains a NUL byte, which no file name can hold; check how the path was built"
        raise ModelError(msg) from None
    except FileNotFoundError:
        msg = f"model file {path} does not exist; check the path"
        raise ModelError(msg) from None
    except OSError as exc:
        msg = f"cannot read model file {path}: {exc.strerror}"
        raise ModelError(msg) from None
    if not stat.S_ISREG(st.st_mode):
        msg = f"{path} is not a regular file; pass the path of a .onnx file"
        raise ModelError(msg)
    limit = _bound("HAL_MAX_MODEL_BYTES", MAX_MODEL_BYTES)
    if st.st_size > limit:
        msg = (
            f"{path} is {st.st_size} bytes, over the {limit}-byte bound; keep large weights as external "
            "data beside the model, or raise HAL_MAX_MODEL_BYTES if you trust the file"
        )
        raise ModelError(msg)
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        msg = f"{where} is empty, not an ONNX model; re-export or re-download it"
        raise ModelError(msg)
    limit = _bound("HAL_MAX_MODEL_BYTES", MAX_MODEL_BYTES)
    if len(data) > limit:
        msg = f"{where} is {len(data)} bytes, over the {limit}-byte bound (HAL_MAX_MODEL_BYTES)"
        raise ModelError(msg)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        msg = f"{where} is not a valid ONNX model (truncated or not ONNX: {exc}); re-export or re-download it"
        raise ModelError(msg) from None
    return proto


def _check_structure(proto: onnx.ModelProto, where: str) -> None:
    # Random bytes can parse as a protobuf message with unknown fields; insist on the basics.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        msg = (
            f"{where} does not look like an ONNX model (no IR version, graph or opset import); "
            "it is truncated or another kind of file"
        )
        raise ModelError(msg)
    if not proto.graph.output:
        msg = f"{where} has a graph with no outputs; it is truncated or not a usable model"
        raise ModelError(msg)


def _check_depth(proto: onnx.ModelProto, where: str) -> None:
    """Refuse subgraphs nested deeper than MAX_GRAPH_DEPTH, walking without recursion."""
    stack: list[tuple[Any, int]] = [(proto.graph.node, 0)]
    stack.extend((fn.node, 0) for fn in proto.functions)
    while stack:
        nodes, depth = stack.pop()
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    subs: Any = (attr.g,)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    subs = attr.graphs
                else:
                    continue
                if depth >= MAX_GRAPH_DEPTH:
                    label = node.name or (node.output[0] if node.output else "")
                    msg = (
                        f"{where} nests subgraphs (If/Loop/Scan bodies) more than {MAX_GRAPH_DEPTH} levels deep "
                        f"(at {node.op_type} node {label!r}); no ONNX runtime reads such a model: flatten its control flow"
                    )
                    raise ModelError(msg)
                stack.extend((g.node, depth + 1) for g in subs)


def _checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` for onnx's checker, which looks for external data files relative to the current
    directory: external initializers enter as graph inputs of their type and shape (their
    references were checked by :class:`~hal.weights.Weights`)."""
    if not any(is_external(t) for t in proto.graph.initializer):
        return proto
    return weightless(proto, lambda t: not is_external(t))


def _check_onnx(proto: onnx.ModelProto, where: str) -> None:
    try:
        onnx.checker.check_model(_checkable(proto))
    except onnx.checker.ValidationError as exc:
        msg = f"{where} is not a valid ONNX model: {first_line(exc)}"
        raise ModelError(msg) from None
    except Exception as exc:  # the checker has raised other types on malformed input
        msg = f"{where} could not be checked as an ONNX model: {type(exc).__name__}: {exc}"
        raise ModelError(msg) from None


#: Initializers up to this size stay in the copy shape inference reads (:func:`_light`).
_INFERENCE_DATA_BYTES = 1024


def _light(proto: onnx.ModelProto, *, value_info: bool = True) -> onnx.ModelProto:
    """``proto`` for onnx's shape inference: initializers over :data:`_INFERENCE_DATA_BYTES` (and
    every external one) enter as graph inputs of the same type and shape. Inference reads the
    values of small shape-like tensors only (Reshape's shape, Slice's axes), so it keeps to a few
    milliseconds on a 50 MB model instead of copying its weights through onnx."""
    return weightless(
        proto, lambda t: not is_external(t) and t.ByteSize() <= _INFERENCE_DATA_BYTES, value_info=value_info
    )


#: What onnx's strict shape inference says when a model contradicts itself (as opposed to what
#: it says when inference itself falls short, e.g. on a function body it cannot expand: such a
#: model is left to the runtime).
_CONTRADICTIONS = re.compile(
    r"Invalid tensor data type|does not specify a valid type|differs from existing elem type|"
    r"existing shape differ|Incompatible dimensions|inconsistent type|Can't merge shape info"
)


def _check_consistent(proto: onnx.ModelProto, where: str) -> None:
    """Refuse a model whose graph contradicts itself or its declared outputs (strict inference).

    Inference runs on a weightless copy (:func:`_light`). ``value_info`` (declared shapes of
    intermediate values) is left out too: runtimes overwrite it with what they infer, so a stale
    entry there is no reason to refuse a model they run.
    """
    light = _light(proto, value_info=False)
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - InferenceError, ValueError, C++ errors
        text = " ".join(str(exc).split())
        if _CONTRADICTIONS.search(text) is None:
            log.debug("strict shape inference of %s stopped short (%s); left to the runtime", where, text[:200])
            return
        detail = re.sub(r"^\[ShapeInferenceError\] (Inference error\(s\): )?", "", text)[:300].rstrip(" .")
        msg = (
            f"{where} contradicts itself: {detail}; the declared types or shapes do not match what "
            "its graph computes: re-export the model, or fix the declared inputs and outputs"
        )
        raise ModelError(msg) from None


def _external_data(proto: onnx.ModelProto, base_dir: Path | None, where: str) -> Weights | None:
    """Check every external reference and open its file; the tensors stay external."""
    tensors = list(external_tensors(proto))
    if not tensors:
        return None
    if base_dir is None:
        info = {e.key: e.value for e in tensors[0].external_data}
        msg = (
            f"tensor {tensors[0].name!r}: external data location {info.get('location', '')!r} cannot be "
            "resolved for a model given as bytes; load it from its file path"
        )
        raise ModelError(msg)
    weights = Weights(Path(base_dir))
    try:
        for tensor in tensors:
            weights.add(tensor)
        budget = _bound("HAL_MAX_EXTERNAL_BYTES", MAX_EXTERNAL_BYTES)
        if weights.nbytes > budget:
            msg = (
                f"{where}'s external data files hold {weights.nbytes} bytes, over the HAL_MAX_EXTERNAL_BYTES "
                f"bound ({budget}); raise it if you trust the model"
            )
            raise ModelError(msg)
    except BaseException:
        weights.close()
        raise
    return weights


# -- analysis ----------------------------------------------------------------------------------


def _tensor_bytes(t: TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    count = 1
    for d in t.dims:
        count *= d
    try:
        bits = NumberFormat.from_onnx(t.data_type).bits
    except ValueError:
        return 0
    return (count * bits + 7) // 8


def _value_bytes(value: onnx.ValueInfoProto) -> int:
    info = _tensor_info(value)
    if info is None or info.shape is None or info.kind is not ValueKind.TENSOR:  # a sequence's length is unknown
        return 0
    count = 1
    for d in info.shape:
        count *= d if isinstance(d, int) and d > 0 else 1
    return (count * max(info.format.bits, 8) + 7) // 8


def infer_shapes(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """``proto``'s graph with the shapes onnx's inference finds, on a weightless copy
    (:func:`_light`): the result is for reading ``value_info``, not for running. ``shapes`` fixes
    graph inputs' shapes (a feed's ``shape``) in place of their declared, possibly symbolic, dims.
    Best effort: where inference fails, the graph as declared (with ``shapes`` applied)."""
    light = _light(proto)
    for value in light.graph.input:
        shape = (shapes or {}).get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = int(size)
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; the declared shapes remain
        return light


def analyze(proto: onnx.ModelProto) -> Requirements:
    """Work out a model's :class:`Requirements` (shape inference where it succeeds)."""
    graph = infer_shapes(proto).graph
    ops: Counter[tuple[str, str]] = Counter()
    formats: set[NumberFormat] = set()

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            ops[(node.domain or "", node.op_type)] += 1
            for attr in node.attribute:
                if attr.name in ("to", "output_dtype") and attr.type == onnx.AttributeProto.INT and attr.i:
                    try:
                        formats.add(NumberFormat.from_onnx(attr.i))
                    except ValueError:
                        pass
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(graph)
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    for v in values:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            try:
                formats.add(NumberFormat.from_onnx(v.type.tensor_type.elem_type))
            except ValueError:
                pass
    param_bytes = 0
    for t in _walk_tensors(proto.graph):
        if t.data_type:
            try:
                formats.add(NumberFormat.from_onnx(t.data_type))
            except ValueError:
                pass
        param_bytes += _tensor_bytes(t)

    dynamic = []
    initializers = {t.name for t in proto.graph.initializer}
    for v in list(graph.input) + list(graph.output):
        info = _tensor_info(v)
        if info is None or v.name in initializers or info.shape is None or info.kind is not ValueKind.TENSOR:
            continue
        for axis, d in enumerate(info.shape):
            if not isinstance(d, int) or d <= 0:
                dynamic.append((v.name, axis, d if isinstance(d, str) else "?"))

    return Requirements(
        ir_version=proto.ir_version,
        opsets=tuple(sorted((o.domain, o.version) for o in proto.opset_import)),
        operators=tuple(sorted((d, o, c) for (d, o), c in ops.items())),
        formats=tuple(sorted(formats, key=lambda f: f.onnx_type)),
        dynamic_dims=tuple(dynamic),
        parameter_bytes=param_bytes,
        estimated_memory_bytes=param_bytes + _peak_activation_bytes(graph, initializers),
    )


def _peak_activation_bytes(graph: onnx.GraphProto, initializers: set[str]) -> int:
    """Largest sum of live intermediate tensors over a topological walk (dynamic dims count as 1)."""
    sizes = {v.name: _value_bytes(v) for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {v.name for v in graph.output}
    live = {v.name for v in graph.input if v.name not in initializers}
    current = sum(sizes.get(n, 0) for n in live)
    peak = current
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name and name not in live:
                live.add(name)
                current += sizes.get(name, 0)
        peak = max(peak, current)
        for name in list(live):
            if last_use.get(name, -1) <= i and name not in outputs:
                live.discard(name)
                current -= sizes.get(name, 0)
    return peak
