"""Hardware-independent optimization, run once by ``hal.compile``.

:func:`optimize` infers shapes, folds constants, removes Identity nodes, dead nodes and unused
initializers. It never changes what the model computes: a folded value is what the node would
have produced (evaluated with :mod:`onnx.reference`), and nodes whose value depends on more than
their inputs (random operators) or whose reference evaluation is not trusted to match the runtimes
(4-bit, 2-bit, E8M0 and float6 results; Quantize/DequantizeLinear, which backends fuse into
quantized kernels) are left alone. Every pass is linear in the number of nodes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from hal.compiler._graph import subgraphs
from hal.errors import first_line
from hal.lowering import LoweringStep

__all__ = ["MAX_FOLD_BYTES", "optimize"]

#: A folded result larger than this stays a node, so folding never bloats a model by much.
MAX_FOLD_BYTES = 64 * 2**20
#: A folded result may exceed its inputs' total size by at most this much: Expand, Tile and
#: ConstantOfShape would otherwise materialize broadcast tensors in the file.
MAX_FOLD_GROWTH_BYTES = 1 * 2**20

_DEFAULT_DOMAINS = ("", "ai.onnx")

#: Operators whose result is not a function of their inputs, or that must stay for backends.
_NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",  # random in training mode; an inference runtime drops it anyway
        # Backends recognise Q/DQ pairs around weights and run quantized kernels; folding a
        # DequantizeLinear of FP8/int8 weights would replace them by float32 copies.
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)

#: Element types the reference evaluator's results are not trusted for (out-of-range int4
#: casts wrap where runtimes saturate; E8M0 rounding modes; no numpy dtype for float6).
_UNTRUSTED_TYPES = frozenset(
    {
        TensorProto.INT4,
        TensorProto.UINT4,
        TensorProto.FLOAT4E2M1,
        TensorProto.FLOAT8E8M0,
        *(
            getattr(TensorProto, name)
            for name in ("INT2", "UINT2")
            if hasattr(TensorProto, name)
        ),
        *(
            getattr(TensorProto, name)
            for name in ("FLOAT6E2M3", "FLOAT6E3M2")
            if hasattr(TensorProto, name)
        ),
        TensorProto.STRING,
        TensorProto.UNDEFINED,
    }
)


def optimize(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[LoweringStep]]:
    """Return an optimized copy of ``proto`` and one :class:`LoweringStep` per pass that changed it.

    Passes, in order: shape inference (non-strict; inferred types are kept as ``value_info``),
    constant folding, Identity elimination, dead-node removal, unused-initializer removal, and a
    final pruning of ``value_info`` entries for tensors that no longer exist. Graph inputs and
    outputs are never renamed or removed. The input proto is not modified; the result is
    deterministic for a given input.
    """
    steps: list[LoweringStep] = []
    model = _infer_shapes(proto, steps)
    graph = model.graph
    _fold_constants(model, steps)
    _eliminate_identities(graph, steps)
    _remove_dead_nodes(graph, steps)
    _remove_unused_initializers(graph, steps)
    _prune_value_info(graph)
    return model, steps


# -- shape inference ---------------------------------------------------------------------------


def _infer_shapes(proto: onnx.ModelProto, steps: list[LoweringStep]) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # noqa: BLE001 - models over 2 GiB, unknown custom domains that throw, ...
        steps.append(
            LoweringStep(
                "infer-shapes",
                f"shape inference skipped: {type(exc).__name__}: {first_line(exc)}",
            )
        )
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        return out
    # Inference gives a sequence the element shape of the value it started from (a Loop's
    # initial sequence, declared as one of scalars, makes the loop's result "a sequence of
    # scalars" whatever the body inserts): a sequence or optional output keeps the type the
    # model declares, which is what the executable holds the runtime's answer to.
    for declared, output in zip(proto.graph.output, inferred.graph.output):
        if not declared.type.HasField("tensor_type"):
            output.type.CopyFrom(declared.type)
    return inferred


# -- helpers -----------------------------------------------------------------------------------


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph's nodes read, including those of nested subgraphs.

    Over-approximates by not subtracting names defined inside the subgraph: that can only keep a
    node alive, never remove a needed one.
    """
    names: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            names.update(node.input)
            stack.extend(subgraphs(node))
        names.update(o.name for o in g.output)
    return names


def _consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Every name read by a node of ``graph`` (or of a subgraph) or listed as a graph output."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for sub in subgraphs(node):
            names |= _outer_names(sub)
    names.discard("")
    return names


def _counts_text(counter: Counter[str]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counter.items()))


# -- constant folding --------------------------------------------------------------------------


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a Constant node as a tensor named after its output, without evaluating it."""
    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    name = node.output[0]
    if attr.name == "value":
        tensor = TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = name
        return tensor
    if attr.name == "value_float":
        return numpy_helper.from_array(np.array(attr.f, np.float32), name)
    if attr.name == "value_floats":
        return numpy_helper.from_array(np.array(attr.floats, np.float32), name)
    if attr.name == "value_int":
        return numpy_helper.from_array(np.array(attr.i, np.int64), name)
    if attr.name == "value_ints":
        return numpy_helper.from_array(np.array(attr.ints, np.int64), name)
    return None  # sparse_value, strings: left as nodes


def _tensor_nbytes(tensor: TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= int(d)
    bits = {
        TensorProto.DOUBLE: 64,
        TensorProto.INT64: 64,
        TensorProto.UINT64: 64,
        TensorProto.COMPLEX64: 64,
        TensorProto.COMPLEX128: 128,
        TensorProto.FLOAT: 32,
        TensorProto.INT32: 32,
        TensorProto.UINT32: 32,
        TensorProto.FLOAT16: 16,
        TensorProto.BFLOAT16: 16,
        TensorProto.INT16: 16,
        TensorProto.UINT16: 16,
    }
    return count * bits.get(tensor.data_type, 8) // 8


def _static_nbytes(value: onnx.ValueInfoProto | None) -> int | None:
    """Bytes of a tensor whose inferred shape is fully static, else None."""
    if value is None or not value.type.HasField("tensor_type"):
        return None
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return None
    count = 1
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        count *= d.dim_value
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
    except KeyError:  # no numpy dtype (float6): assume a byte
        size = 1
    return count * size


def _foldable(node: onnx.NodeProto) -> bool:
    return (
        node.domain in _DEFAULT_DOMAINS
        and node.op_type not in _NEVER_FOLD
        and all(
            a.type not in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
            for a in node.attribute
        )
        and all(o for o in node.output)
    )


def _fold_constants(model: onnx.ModelProto, steps: list[LoweringStep]) -> None:
    """Replace nodes whose inputs are all constants by initializers holding their results.

    Initializers that are also graph inputs are not constants: a caller may feed them.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opsets = {imp.domain or "": int(imp.version) for imp in model.opset_import}
    if "ai.onnx" in opsets and "" not in opsets:
        opsets[""] = opsets["ai.onnx"]
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    value_info = {v.name: v for v in graph.value_info}
    # name -> (TensorProto, numpy value or None until first needed)
    # External weights are never read here: their bytes are the backend's business (mapped by
    # hal.weights; onnx's own reader would open the path the model names).
    external = {t.name for t in graph.initializer if t.data_location == TensorProto.EXTERNAL}
    constants: dict[str, list[Any]] = {
        t.name: [t, None] for t in graph.initializer if t.name not in graph_inputs and t.name not in external
    }
    new_initializers: list[TensorProto] = []
    kept: list[onnx.NodeProto] = []
    folded: Counter[str] = Counter()
    for node in graph.node:
        tensors = _fold_node(
            node, constants, value_info, graph_outputs, opsets, ReferenceEvaluator
        )
        if tensors is None:
            kept.append(node)
            continue
        folded[node.op_type] += 1
        for tensor in tensors:
            constants[tensor.name] = [tensor, None]
            new_initializers.append(tensor)
    left = sum(
        1 for node in kept
        if node.input and any(i in external for i in node.input)
        and all(not i or i in constants or i in external for i in node.input)
    )
    if left:
        steps.append(
            LoweringStep(
                "fold-constants",
                f"{left} node(s) with only constant inputs left as they are: they read external weights, "
                "which the compiler does not copy into memory",
            )
        )
    if not folded:
        return
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_initializers)
    total = sum(folded.values())
    steps.append(
        LoweringStep(
            "fold-constants",
            f"{total} node(s) with constant inputs replaced by initializers ({_counts_text(folded)})",
        )
    )


def _fold_node(
    node: onnx.NodeProto,
    constants: dict[str, list[Any]],
    value_info: dict[str, onnx.ValueInfoProto],
    graph_outputs: set[str],
    opsets: dict[str, int],
    evaluator: Any,
) -> list[TensorProto] | None:
    """The node's outputs as named tensors when it can be folded safely, else None."""
    if not _foldable(node) or any(o in graph_outputs for o in node.output):
        return None
    if node.op_type == "Constant":
        # Moving a Constant's value into an initializer copies bytes; nothing is evaluated.
        tensor = _constant_tensor(node)
        return None if tensor is None else [tensor]
    inputs = [i for i in node.input if i]
    if not inputs or any(i not in constants for i in inputs):
        return None  # no inputs: generators such as EyeLike-less ConstantOfShape stay
    in_bytes = sum(_tensor_nbytes(constants[i][0]) for i in set(inputs))
    for out in node.output:
        info = value_info.get(out)
        if info is not None and info.type.tensor_type.elem_type in _UNTRUSTED_TYPES:
            return None
        expected = _static_nbytes(info)
        if expected is not None and (
            expected > MAX_FOLD_BYTES or expected > in_bytes + MAX_FOLD_GROWTH_BYTES
        ):
            return None
    if any(constants[i][0].data_type in _UNTRUSTED_TYPES for i in inputs):
        return None
    feeds = {}
    for name in inputs:
        entry = constants[name]
        if entry[1] is None:
            entry[1] = numpy_helper.to_array(entry[0])
        feeds[name] = entry[1]
    try:
        results = evaluator(node, opsets=opsets).run(None, feeds)
    except Exception:  # noqa: BLE001 - the reference lacks the op or fails on these values: the runtime will run it
        return None
    tensors = []
    out_bytes = 0
    for name, value in zip(node.output, results):
        if not isinstance(value, np.ndarray) and not np.isscalar(value):
            return None  # sequences, optionals, maps
        array = np.asarray(value)
        if array.dtype == object:
            return None
        out_bytes += array.nbytes
        try:
            tensor = numpy_helper.from_array(array, name)
        except Exception:  # noqa: BLE001 - a dtype onnx cannot store: leave the node
            return None
        info = value_info.get(name)
        if info is not None and info.type.tensor_type.elem_type not in (
            0,
            tensor.data_type,
        ):
            return None  # the reference produced another type than the schema says: do not trust it
        if tensor.data_type in _UNTRUSTED_TYPES:
            return None
        tensors.append(tensor)
    if (
        len(tensors) != len(node.output)
        or out_bytes > MAX_FOLD_BYTES
        or out_bytes > in_bytes + MAX_FOLD_GROWTH_BYTES
    ):
        return None
    return tensors


# -- Identity elimination ----------------------------------------------------------------------


def _eliminate_identities(graph: onnx.GraphProto, steps: list[LoweringStep]) -> None:
    """Remove ``y = Identity(x)`` by reading ``x`` wherever ``y`` was read.

    Skipped when ``y`` is a graph output (its name is the model's interface) or is read inside a
    subgraph (renaming there would need scope analysis that is not worth it).
    """
    graph_outputs = {o.name for o in graph.output}
    in_subgraphs: set[str] = set()
    for node in graph.node:
        for sub in subgraphs(node):
            in_subgraphs |= _outer_names(sub)
    rename: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    removed = 0
    for node in graph.node:
        if rename:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        if (
            node.op_type == "Identity"
            and node.domain in _DEFAULT_DOMAINS
            and len(node.input) == 1
            and node.input[0]
            and node.output[0] not in graph_outputs
            and node.output[0] not in in_subgraphs
        ):
            rename[node.output[0]] = node.input[0]
            removed += 1
            continue
        kept.append(node)
    if not removed:
        return
    del graph.node[:]
    graph.node.extend(kept)
    steps.append(
        LoweringStep(
            "eliminate-identity",
            f"{removed} Identity node(s) removed; their readers read the source tensor",
        )
    )


# -- dead nodes and unused initializers --------------------------------------------------------


def _remove_dead_nodes(graph: onnx.GraphProto, steps: list[LoweringStep]) -> None:
    """Drop nodes none of whose outputs reaches a graph output (walking the nodes backwards)."""
    needed = {o.name for o in graph.output}
    live: list[bool] = []
    for node in reversed(graph.node):
        alive = any(o in needed for o in node.output if o)
        live.append(alive)
        if alive:
            needed.update(node.input)
            for sub in subgraphs(node):
                needed |= _outer_names(sub)
    live.reverse()
    dead = Counter(n.op_type for n, alive in zip(graph.node, live) if not alive)
    if not dead:
        return
    kept = [n for n, alive in zip(graph.node, live) if alive]
    del graph.node[:]
    graph.node.extend(kept)
    steps.append(
        LoweringStep(
            "remove-dead-nodes",
            f"{sum(dead.values())} node(s) whose outputs reach no graph output removed ({_counts_text(dead)})",
        )
    )


def _remove_unused_initializers(
    graph: onnx.GraphProto, steps: list[LoweringStep]
) -> None:
    """Drop initializers nothing reads; those that are also graph inputs stay (the interface)."""
    used = _consumed_names(graph) | {i.name for i in graph.input}
    unused = [t.name for t in graph.initializer if t.name not in used]
    if not unused:
        return
    nbytes = sum(_tensor_nbytes(t) for t in graph.initializer if t.name not in used)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    steps.append(
        LoweringStep(
            "remove-unused-initializers",
            f"{len(unused)} initializer(s) nothing reads removed ({nbytes} bytes)",
        )
    )


def _prune_value_info(graph: onnx.GraphProto) -> None:
    """Keep ``value_info`` only for tensors a node still produces (and once per name)."""
    produced: set[str] = set()
    for node in graph.node:
        produced.update(node.output)
    seen: set[str] = set()
    kept = []
    for v in graph.value_info:
        if v.name in produced and v.name not in seen:
            seen.add(v.name)
            kept.append(v)
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
