"""Opset conversion: move a model's default-domain opset into the range a backend accepts.

onnxruntime 1.32 has no CPU kernels for QuantizeLinear/DequantizeLinear at opset 28 but has them
at 19-25, and IREE's ONNX importer rejects old-opset operators such as BatchNormalization-9; both
are fixed by converting the model to the nearest opset the backend declares in
:attr:`hal.capabilities.Capabilities.opsets`.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from hal.capabilities import OpsetRange
from hal.compiler._graph import all_nodes, subgraphs
from hal.errors import LoweringError, first_line
from hal.lowering import LoweringStep

__all__ = ["check_domains", "convert_opset", "default_opset", "fit_ir_version", "min_ir_version"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
#: ONNX's own operator domains: whether a backend has a kernel for one of their operators is its
#: compile's answer. Any other domain must be declared in ``OpsetRange.domains``.
_ONNX_DOMAINS = frozenset({*_DEFAULT_DOMAINS, "ai.onnx.ml", "ai.onnx.preview.training"})


def check_domains(proto: onnx.ModelProto, opsets: OpsetRange) -> None:
    """Raise :class:`~hal.errors.LoweringError` naming the operators of ``proto`` (subgraphs
    included) from a domain that is neither ONNX's own nor declared in ``opsets.domains``, and
    that the model does not define as a function of its own."""
    known = _ONNX_DOMAINS.union(opsets.domains)
    functions = {(fn.domain, fn.name) for fn in proto.functions}
    foreign = sorted(
        {
            f"{node.domain}.{node.op_type}"
            for node in all_nodes(proto.graph)
            if node.domain not in known and (node.domain, node.op_type) not in functions
        }
    )
    if foreign:
        declared = ", ".join(opsets.domains) or "none"
        msg = (
            f"operators {', '.join(foreign)} are from a domain the device does not declare (its domains "
            f"besides ONNX's own: {declared}); run the model on a device whose backend implements them, "
            "or replace them with standard ONNX operators"
        )
        raise LoweringError(msg, operators=tuple(foreign))


def default_opset(proto: onnx.ModelProto) -> int | None:
    """The model's default-domain (``ai.onnx``) opset, or None if it imports none."""
    for imp in proto.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def _since(op_type: str, version: int) -> int | None:
    try:
        return int(onnx.defs.get_schema(op_type, version, "").since_version)
    except onnx.defs.SchemaError:  # an operator this onnx does not know at that version
        return None


def _changed_ops(proto: onnx.ModelProto, source: int, target: int) -> list[str]:
    """Default-domain operators whose schema differs between ``source`` and ``target``.

    An operator's schema is the same at both versions when ``get_schema(op, v).since_version`` is
    the same for both, so a model using only such operators is valid at ``target`` as it is.
    """
    changed = set()
    seen = set()
    for node in all_nodes(proto.graph):
        if node.domain not in _DEFAULT_DOMAINS or node.op_type in seen:
            continue
        seen.add(node.op_type)
        before, after = _since(node.op_type, source), _since(node.op_type, target)
        if before is None or before != after:
            changed.add(node.op_type)
    return sorted(changed)


def _uses_model_functions(proto: onnx.ModelProto) -> bool:
    return len(proto.functions) > 0


def convert_opset(
    proto: onnx.ModelProto, opsets: OpsetRange
) -> tuple[onnx.ModelProto, list[LoweringStep]]:
    """Return ``proto`` converted to the nearest default-domain opset inside ``opsets``, with its
    IR version lowered to ``opsets.max_ir_version`` when it is newer (:func:`fit_ir_version`).
    See :func:`_convert_default_opset` for the opset part."""
    proto, steps = _convert_default_opset(proto, opsets)
    proto, more = fit_ir_version(proto, opsets.max_ir_version)
    return proto, [*steps, *more]


# The IR version that introduced each element type (onnx.proto's IR_VERSION history).
_TYPE_IR = {
    onnx.TensorProto.BFLOAT16: 4,
    onnx.TensorProto.FLOAT8E4M3FN: 9,
    onnx.TensorProto.FLOAT8E4M3FNUZ: 9,
    onnx.TensorProto.FLOAT8E5M2: 9,
    onnx.TensorProto.FLOAT8E5M2FNUZ: 9,
    onnx.TensorProto.UINT4: 10,
    onnx.TensorProto.INT4: 10,
    onnx.TensorProto.FLOAT4E2M1: 11,
    onnx.TensorProto.FLOAT8E8M0: 12,
    onnx.TensorProto.UINT2: 13,
    onnx.TensorProto.INT2: 13,
    onnx.TensorProto.FLOAT6E2M3: 14,
    onnx.TensorProto.FLOAT6E3M2: 14,
}
_TYPE_ATTRS = ("to", "dtype", "output_dtype", "stash_type")


def _graph_types(graph: onnx.GraphProto) -> Iterator[tuple[int, str]]:
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type"):
            yield vi.type.tensor_type.elem_type, f"value {vi.name!r}"
    for t in graph.initializer:
        yield t.data_type, f"initializer {t.name!r}"
    for node in graph.node:
        name = node.name or (node.output[0] if node.output else "")
        where = f"{node.op_type} node {name!r}"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.INT and attr.name in _TYPE_ATTRS:
                yield attr.i, where
            elif attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t.data_type, where
        for sub in subgraphs(node):
            yield from _graph_types(sub)


def min_ir_version(proto: onnx.ModelProto) -> tuple[int, str]:
    """The oldest IR version that can express ``proto`` and why: its opset imports, element
    types and, from IR 10, function overloads. Unknown opsets count as needing no more than the
    model's own IR version."""
    try:
        need = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
        why = "its opset imports"
    except (ValueError, KeyError):  # an opset newer than this onnx knows
        need, why = proto.ir_version, "an opset this onnx does not know"
    for code, where in _graph_types(proto.graph):
        ir = _TYPE_IR.get(code, 0)
        if ir > need:
            need, why = ir, f"{onnx.TensorProto.DataType.Name(code)} ({where})"
    for fn in proto.functions:
        if fn.overload and need < 10:
            need, why = 10, f"function overload {fn.name}:{fn.overload}"
    return need, why


def fit_ir_version(
    proto: onnx.ModelProto, max_ir_version: int | None
) -> tuple[onnx.ModelProto, list[LoweringStep]]:
    """Lower ``proto``'s IR version to ``max_ir_version`` when it is newer and the model uses
    nothing the older IR lacks (onnxruntime 1.31 refuses IR 14 models that need only IR 8).
    Raises :class:`~hal.errors.LoweringError` naming what needs the newer IR otherwise."""
    if max_ir_version is None or proto.ir_version <= max_ir_version:
        return proto, []
    need, why = min_ir_version(proto)
    if need > max_ir_version:
        msg = (
            f"the model needs ONNX IR version {need} for {why}, but the backend reads at most IR "
            f"{max_ir_version}: upgrade the runtime or choose another device"
        )
        raise LoweringError(msg)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.ir_version = max_ir_version
    detail = (
        f"IR version {proto.ir_version} -> {max_ir_version}: the backend reads at most IR {max_ir_version} "
        f"and the model needs only IR {need} ({why})"
    )
    return out, [LoweringStep("ir-version", detail)]


def _convert_default_opset(
    proto: onnx.ModelProto, opsets: OpsetRange
) -> tuple[onnx.ModelProto, list[LoweringStep]]:
    """Return ``proto`` converted to the nearest default-domain opset inside ``opsets``.

    A model already inside the range (or importing no default domain) comes back unchanged, as
    the same object, with no steps. Otherwise the target is ``opsets.min`` when the model is older
    and ``opsets.max`` when it is newer. When no operator in the model changed schema between the
    two versions, only the opset import is rewritten (exact and cheap); otherwise
    :func:`onnx.version_converter.convert_version` adapts the operators that changed.

    Raises :class:`~hal.errors.LoweringError` naming the operators when the conversion fails.
    The input proto is never modified.
    """
    source = default_opset(proto)
    if source is None or source in opsets:
        return proto, []
    target = opsets.min if source < opsets.min else opsets.max
    changed = _changed_ops(proto, source, target)
    if not changed and not _uses_model_functions(proto):
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        for imp in out.opset_import:
            if imp.domain in _DEFAULT_DOMAINS:
                imp.version = target
        _raise_ir_version(out)
        detail = (
            f"opset {source} -> {target}: no operator in the model changed between the two versions, "
            f"so only the opset import was rewritten (backend accepts {opsets.min}..{opsets.max})"
        )
        return out, [LoweringStep("convert-opset", detail)]
    try:
        out = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors and C++ errors
        why = f"onnx.version_converter failed with {type(exc).__name__}: {first_line(exc)}"
        kept = _kept_as_is(proto, source, target, opsets, why)
        if kept is not None:
            return kept
        msg = (
            f"cannot convert the model from opset {source} to {target} (the backend accepts "
            f"{opsets.min}..{opsets.max}): {why}; operators that differ between the two opsets: "
            f"{', '.join(changed) or 'none'}"
        )
        raise LoweringError(msg) from exc
    if default_opset(out) != target:
        why = f"onnx.version_converter returned opset {default_opset(out)}"
        kept = _kept_as_is(proto, source, target, opsets, why)
        if kept is not None:
            return kept
        msg = f"cannot convert the model from opset {source} to {target}: {why}"
        raise LoweringError(msg)
    _raise_ir_version(out)
    detail = (
        f"opset {source} -> {target} with onnx.version_converter (backend accepts {opsets.min}..{opsets.max}); "
        f"operators adapted: {', '.join(changed)}"
    )
    return out, [LoweringStep("convert-opset", detail)]


def _kept_as_is(
    proto: onnx.ModelProto, source: int, target: int, opsets: OpsetRange, why: str
) -> tuple[onnx.ModelProto, list[LoweringStep]] | None:
    """A model newer than ``opsets.max`` that cannot be converted down is left as it is when the
    backend still reads its opset (``opsets.max_loadable``): most of its kernels exist there,
    and the backend's own compile says which do not."""
    if opsets.max_loadable is None or not source > opsets.max or source > opsets.max_loadable:
        return None
    detail = (
        f"kept at opset {source}: converting it to {target} failed ({why}); the backend prefers "
        f"{opsets.min}..{opsets.max} but reads up to {opsets.max_loadable}"
    )
    return proto, [LoweringStep("convert-opset", detail)]


def _raise_ir_version(proto: onnx.ModelProto) -> None:
    """Raise the IR version to the least one the new opset imports need (never lower it)."""
    try:
        needed = onnx.helper.find_min_ir_version_for(
            list(proto.opset_import), ignore_unknown=True
        )
    except (
        ValueError,
        KeyError,
    ):  # an opset newer than this onnx knows: leave the IR version alone
        return
    proto.ir_version = max(proto.ir_version, needed)
