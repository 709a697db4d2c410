"""Weight-only FP8 block quantization of a model, and UE8M0 requantization of an FP8 one."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from attrs import frozen
from onnx import TensorProto, helper, numpy_helper

from hal import fp8 as numerics
from hal.errors import InputError, ModelError, OutputPathError, SettingError, first_line
from hal.model import Model, load
from hal.weights import is_external

log = logging.getLogger("hal.quantize")

#: Where a quantized model records what was done (JSON in ``metadata_props``; see :func:`summary`).
METADATA_KEY = "onnx-hal.quantization"
#: DequantizeLinear takes ``block_size`` from opset 21 and a FLOAT8E8M0 scale from opset 24.
BLOCKED_OPSET = 21
E8M0_OPSET = 24
#: Past this many bytes of weights, :func:`save` writes them as external data beside the model.
EXTERNAL_THRESHOLD = 1 << 30

_FP8_TYPES = {
    "e4m3fn": TensorProto.FLOAT8E4M3FN,
    "e5m2": TensorProto.FLOAT8E5M2,
    "e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ,
    "e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ,
}
_FP8_NAMES = {code: name for name, code in _FP8_TYPES.items()}


@frozen
class Skipped:
    """A weight the quantizer left as it was, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


# -- options -----------------------------------------------------------------------------------


def _parse_block(block: Any) -> tuple[int, int] | None:
    """``(rows, cols)`` (output channels x reduction), or None for per-channel."""
    given = block
    if isinstance(block, str):
        text = block.strip().lower()
        if text == "channel":
            return None
        parts = text.split("x")
        try:
            block = tuple(int(p) for p in parts)
        except ValueError:
            block = None
    if isinstance(block, Sequence) and len(block) == 2 and all(isinstance(b, (int, np.integer)) for b in block):
        rows, cols = int(block[0]), int(block[1])
        if rows >= 1 and cols >= 1:
            return rows, cols
    msg = f"block {given!r} is not a block shape; use (128, 128), (1, 32), '128x128' or 'channel'"
    raise SettingError(msg)


def _check_choice(what: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        msg = f"{what} {value!r} is not one of {', '.join(map(repr, choices))}"
        raise SettingError(msg)
    return str(value)


# -- the graph ---------------------------------------------------------------------------------


def _used_names(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Every name any node reads, with the nodes that read it (subgraph bodies included: they
    may read outer values), labelled ``OpType 'name'``."""
    users: dict[str, list[str]] = {}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            label = f"{node.op_type} {node.name or (node.output[0] if node.output else '')!r}"
            for name in node.input:
                if name:
                    users.setdefault(name, []).append(label)
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return users


def _weight_slot(node: onnx.NodeProto, rank: int) -> tuple[int, int] | str:
    """``(reduction axis, output axis)`` of input 1 of a MatMul, Gemm or Conv, or why not."""
    if node.op_type == "MatMul":
        if rank < 2:
            return f"a {rank}-D MatMul operand has no output axis to block"
        return rank - 2, rank - 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (1, 0) if trans_b else (0, 1)
    if rank < 3:
        return f"a {rank}-D Conv weight is malformed"
    return 1, 0  # Conv: [M, C/group, k...]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _fresh(taken: set[str], base: str) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        if node.name:
            names.add(node.name)
    return names


def _array(model: Model, tensor: TensorProto) -> np.ndarray:
    """The initializer's values: a read-only view over the mapped file for external data."""
    if is_external(tensor):
        assert model.weights is not None
        return model.weights.array(tensor)
    return numpy_helper.to_array(tensor)


def _raw_tensor(name: str, data_type: int, array: np.ndarray) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(array.shape)
    tensor.raw_data = np.ascontiguousarray(array).tobytes()
    return tensor


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _at_least_opset(proto: onnx.ModelProto, need: int, why: str) -> onnx.ModelProto:
    current = _opset(proto)
    if current >= need:
        return proto
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, need)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError and C++ errors
        first = first_line(exc)
        msg = (
            f"{why} needs opset {need}, and onnx's version converter could not raise this model's "
            f"opset {current} to it ({first}); convert the model to opset {need} yourself and quantize that"
        )
        raise ModelError(msg) from None
    log.info("raised the model's opset from %d to %d (%s)", current, need, why)
    return converted


def _finish(proto: onnx.ModelProto, source: Model, record: dict[str, Any]) -> Model:
    """Record, bump the IR version to what the opsets need, and check the result as a model."""
    for i, prop in enumerate(proto.metadata_props):
        if prop.key == METADATA_KEY:
            del proto.metadata_props[i]
            break
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(record, sort_keys=True))
    proto.ir_version = max(proto.ir_version, helper.find_min_ir_version_for(list(proto.opset_import)))
    base_dir = source.weights.base_dir if source.weights is not None else None
    return load(proto, base_dir=base_dir)


def summary(model: Any) -> dict[str, Any] | None:
    """What :func:`fp8` or :func:`requantize` recorded in a model (its options, each quantized
    tensor's layout, the weights skipped and why), or None for a model they did not write."""
    proto = model.proto if isinstance(model, Model) else model
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


# -- fp8 ---------------------------------------------------------------------------------------


def fp8(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto | Model,
    *,
    format: str = "e4m3fn",  # noqa: A002 - the name the issue and the CLI use
    scale: str = "float32",
    block: tuple[int, int] | str = (128, 128),
    rounding: str = "up",
    skip: Iterable[str] = (),
    keep_e8m0: bool = False,
) -> Model:
    """Quantize a model's weights to FP8 with block scales, in standard ONNX; returns a
    :class:`hal.Model` (pass it to :func:`hal.compile`, write it with :func:`save`; ``.proto``
    is the ONNX graph). ``model`` is anything :func:`hal.load` takes; it is not changed.

    Weight-only: input 1 of every MatMul, Gemm (``transB`` honoured) and Conv that is a float32
    initializer becomes an FP8 initializer (``format``: ``"e4m3fn"`` or ``"e5m2"``) and a scale
    initializer, joined by a ``DequantizeLinear`` whose output keeps the weight's name, so every
    consumer (a weight tied between two layers too) reads it as before. Activations, biases and
    everything else stay float32.

    ``block``: ``(rows, cols)`` in output channels x reduction elements — ``(128, 128)`` as
    DeepSeek-V3, ``(1, 32)`` as OCP MX (32 consecutive elements along the reduction axis, which
    is axis 0 of a MatMul weight, axis 1 of a ``transB`` Gemm's, the input channels of a Conv's,
    each kernel position its own block) — or ``"channel"``, one scale per output channel
    (``DequantizeLinear`` per axis). ``DequantizeLinear``'s ``block_size`` is one-dimensional,
    so a 2-D block is stored expanded: blocked along the longer side of the block, its scale
    repeated for each of the ``rows`` (or ``cols``) indices along the other axis. The stored
    scale count is therefore the logical block count times that expansion (128 for 128x128,
    1 for 1x32); :func:`summary` records both. Dimensions that are not a multiple of the block
    end with a partial block (its scale from the elements it has).

    ``scale``: ``"float32"`` — each block's ``amax / max(format)`` (the largest magnitude maps to
    the format's largest value); ``"ue8m0"`` — that value rounded to a power of two by
    ``rounding`` (``"up"``, ``"nearest"`` or ``"down"``, as ONNX ``Cast-24``'s ``round_mode``;
    ``"up"`` never clips, ``"down"`` clips the largest values of a block up to 2x). UE8M0 scales
    are stored as float32 tensors holding exact powers of two (opset 21), or, with
    ``keep_e8m0=True``, as FLOAT8E8M0 tensors with ``output_dtype`` float32 (opset 24; onnxruntime's
    CPU kernels cannot run that form). Values are ``saturate_cast(w / scale)`` in float32, as
    ``QuantizeLinear`` computes them. An all-zero block gets scale 1 (its values are exactly 0).

    A model below the needed opset is raised to it with onnx's version converter (refused with
    :class:`~hal.errors.ModelError` when that fails); the IR version is raised to match.

    ``skip``: node or initializer names, or glob patterns (``"*lm_head*"``), left float32.
    Also left as they are, and listed by :func:`summary` with the reason: weights that are graph
    inputs (a caller may replace them), that are not float32, that are already quantized (fed by
    a ``DequantizeLinear``), or that another node reads other than as a weight (a ``Gather``
    tied to an output projection) or along another axis. A weight holding NaN or infinity is
    refused with :class:`~hal.errors.InputError` naming it. External weights are read through
    ``model.weights`` (mapped, not copied); those not quantized stay external.
    """
    fmt = _check_choice("format", format, ("e4m3fn", "e5m2"))
    scale = _check_choice("scale", scale, ("float32", "ue8m0"))
    rounding = _check_choice("rounding", rounding, ("up", "nearest", "down"))
    shape = _parse_block(block)
    if keep_e8m0 and scale != "ue8m0":
        msg = "keep_e8m0=True keeps UE8M0 scales as FLOAT8E8M0 tensors; it needs scale='ue8m0'"
        raise SettingError(msg)
    patterns = [skip] if isinstance(skip, str) else list(skip)
    source = load(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(source.proto)
    need = E8M0_OPSET if keep_e8m0 else BLOCKED_OPSET
    proto = _at_least_opset(proto, need, "DequantizeLinear with FLOAT8E8M0 scales" if keep_e8m0 else "blocked DequantizeLinear")
    graph = proto.graph

    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    producers = _producers(graph)
    users = _used_names(graph)

    def skipped_by_user(*names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names if n for p in patterns)

    slots: dict[str, list[tuple[onnx.NodeProto, tuple[int, int]]]] = {}
    skipped: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        name = node.input[1]
        producer = producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.input:
            skipped.setdefault(producer.input[0], f"already quantized (DequantizeLinear {producer.name or name!r})")
            continue
        tensor = initializers.get(name)
        if tensor is None:
            continue
        if skipped_by_user(node.name, name):
            skipped.setdefault(name, "skipped as asked")
            continue
        slot = _weight_slot(node, len(tensor.dims))
        if isinstance(slot, str):
            skipped.setdefault(name, slot)
            continue
        slots.setdefault(name, []).append((node, slot))

    plans: list[tuple[TensorProto, tuple[int, int], list[str]]] = []
    for name, uses in slots.items():
        if name in skipped:
            continue
        tensor = initializers[name]
        weight_users = {f"{n.op_type} {n.name or n.output[0]!r}" for n, _ in uses}
        others = [u for u in users.get(name, []) if u not in weight_users]
        if name in graph_inputs:
            skipped[name] = "is also a graph input (a caller may replace it at run time)"
        elif tensor.data_type != TensorProto.FLOAT:
            type_name = TensorProto.DataType.Name(tensor.data_type).lower()
            skipped[name] = f"element type {type_name}: only float32 weights are quantized"
        elif others:
            skipped[name] = f"also read by {', '.join(sorted(set(others)))}, not as a weight"
        elif len({slot for _, slot in uses}) > 1:
            skipped[name] = "read along different reduction axes by " + ", ".join(sorted(weight_users))
        else:
            plans.append((tensor, uses[0][1], sorted(weight_users)))

    taken = _all_names(graph)
    fp8_type = _FP8_TYPES[fmt]
    new_nodes: list[onnx.NodeProto] = []
    quantized: dict[str, Any] = {}
    remove: set[str] = set()
    for tensor, (in_axis, out_axis), consumers in plans:
        weight = _array(source, tensor)
        if not np.all(np.isfinite(weight)):
            bad = int(np.count_nonzero(~np.isfinite(weight)))
            msg = (
                f"weight {tensor.name!r} holds {bad} NaN or infinite value(s), which no FP8 scale can "
                f"represent; fix the weight, or pass skip=[{tensor.name!r}] (--skip) to leave it float32"
            )
            raise InputError(msg)
        layout = _layout(weight.shape, in_axis, out_axis, shape)
        q, scale_values = _quantize(weight, layout, fmt, scale, rounding)
        q_name = _fresh(taken, f"{tensor.name}_fp8")
        s_name = _fresh(taken, f"{tensor.name}_scale")
        graph.initializer.append(_raw_tensor(q_name, fp8_type, q.view(np.uint8)))
        attrs: dict[str, Any] = {}
        if layout["axis"] is not None:
            attrs["axis"] = layout["axis"]
        if layout["block_size"] is not None:
            attrs["block_size"] = layout["block_size"]
        if keep_e8m0:
            bits = numerics.e8m0_from_float32(scale_values, "down")  # exact: already powers of two
            graph.initializer.append(_raw_tensor(s_name, TensorProto.FLOAT8E8M0, bits))
            attrs["output_dtype"] = TensorProto.FLOAT
        else:
            graph.initializer.append(_raw_tensor(s_name, TensorProto.FLOAT, scale_values.astype(np.float32)))
        new_nodes.append(
            helper.make_node("DequantizeLinear", [q_name, s_name], [tensor.name], name=_fresh(taken, f"{tensor.name}_dequantize"), **attrs)
        )
        remove.add(tensor.name)
        quantized[tensor.name] = {
            "quantized": q_name,
            "scale": s_name,
            "consumers": consumers,
            "shape": list(weight.shape),
            "axis": layout["axis"],
            "block_size": layout["block_size"],
            "expand": layout["expand"],
            "stored_scales": int(scale_values.size),
            "logical_blocks": _logical_blocks(scale_values.shape, layout["expand"]),
        }

    kept = [t for t in graph.initializer if t.name not in remove]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    for name, reason in skipped.items():
        log.info("weight %r left as it is: %s", name, reason)
    record = {
        "operation": "fp8",
        "format": fmt,
        "scale": scale,
        "block": "channel" if shape is None else list(shape),
        "rounding": rounding if scale == "ue8m0" else None,
        "keep_e8m0": bool(keep_e8m0),
        "tensors": quantized,
        "skipped": [{"name": n, "reason": r} for n, r in skipped.items()],
    }
    return _finish(proto, source, record)


def _layout(shape: tuple[int, ...], in_axis: int, out_axis: int, block: tuple[int, int] | None) -> dict[str, Any]:
    """DequantizeLinear's axis and block_size for a weight, and the expansion of a 2-D block."""
    if block is None:
        return {"axis": out_axis, "block_size": None, "expand": None}
    rows, cols = block
    if cols >= rows:  # blocked along the reduction axis, repeated over `rows` output channels
        return {"axis": in_axis, "block_size": cols, "expand": [out_axis, rows] if rows > 1 else None}
    return {"axis": out_axis, "block_size": rows, "expand": [in_axis, cols] if cols > 1 else None}


def _logical_blocks(scale_shape: tuple[int, ...], expand: list[int] | None) -> int:
    """How many distinct blocks a stored scale tensor holds (its size without the expansion)."""
    size = int(np.prod(scale_shape, dtype=np.int64))
    if not expand:
        return size
    axis, rows = expand
    along = scale_shape[axis]
    return size // along * -(-along // rows)


def _quantize(weight: np.ndarray, layout: dict[str, Any], fmt: str, scale: str, rounding: str) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)`` for one weight: FP8 values and float32 scales in DequantizeLinear's layout."""
    values = np.asarray(weight, dtype=np.float32)
    axis, block_size, expand = layout["axis"], layout["block_size"], layout["expand"]
    if block_size is None:  # per channel: one scale per index along `axis`
        others = tuple(i for i in range(values.ndim) if i != axis)
        amax = np.abs(values).max(axis=others) if others else np.abs(values)
    else:
        amax = numerics.block_amax(values, axis, block_size, expand=tuple(expand) if expand else None)
    scales = numerics.scale_for(amax, fmt, scale, rounding)
    full = numerics.expand_scale(scales, values.shape, axis, block_size)
    q = numerics.saturate_cast(values / full, fmt)
    return q, scales


# -- requantize --------------------------------------------------------------------------------


def requantize(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto | Model,
    *,
    scale: str = "ue8m0",
    rounding: str = "up",
    keep_e8m0: bool = False,
) -> Model:
    """Move a model's FP8 weights from float32 block scales to UE8M0 (power-of-two) scales,
    requantizing the FP8 values; returns a :class:`hal.Model` as :func:`fp8` does.

    Every ``DequantizeLinear`` whose input is an FP8 initializer and whose scale is a float32
    initializer (per tensor, per axis or blocked, the DeepSeek-V3 layout of 128x128 blocks
    included) is converted with :func:`hal.fp8.requantize_blocks`: each scale becomes the power
    of two ``rounding`` picks from it (equal scales stay equal, so a 128x128 layout stays one),
    the values are dequantized exactly and rounded once to the same FP8 format with saturation.
    ``"up"`` (the default, as ONNX's and NVIDIA's MXFP8 recipe) never clips. ``keep_e8m0=True``
    stores the new scales as FLOAT8E8M0 (opset 24, ``output_dtype`` float32). Scales that are not
    positive and finite are refused with :class:`~hal.errors.InputError` naming the tensor;
    nodes with a nonzero zero point, or whose tensors other nodes share, are skipped (see
    :func:`summary`).
    """
    _check_choice("scale", scale, ("ue8m0",))
    rounding = _check_choice("rounding", rounding, ("up", "nearest", "down"))
    source = load(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(source.proto)
    if keep_e8m0:
        proto = _at_least_opset(proto, E8M0_OPSET, "DequantizeLinear with FLOAT8E8M0 scales")
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    users = _used_names(graph)
    done: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    replaced: dict[str, TensorProto] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        q_tensor, s_tensor = initializers.get(node.input[0]), initializers.get(node.input[1])
        label = node.output[0]
        if q_tensor is None or s_tensor is None or q_tensor.data_type not in _FP8_NAMES:
            continue
        if s_tensor.data_type != TensorProto.FLOAT:
            type_name = TensorProto.DataType.Name(s_tensor.data_type).lower()
            skipped[label] = f"its scale is {type_name}, not float32"
            continue
        if len(users.get(q_tensor.name, [])) > 1 or len(users.get(s_tensor.name, [])) > 1:
            skipped[label] = "its FP8 values or scale are shared with another node"
            continue
        if len(node.input) > 2 and node.input[2]:
            zero = initializers.get(node.input[2])
            if zero is None or np.any(_array(source, zero).astype(np.float32) != 0):
                skipped[label] = "it has a zero point that is not a constant zero"
                continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scales = np.asarray(_array(source, s_tensor), dtype=np.float32)
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            msg = (
                f"scale {s_tensor.name!r} of {label!r} holds zero, negative or non-finite values; a block "
                "scale must be positive and finite: fix the model's scales"
            )
            raise InputError(msg)
        q = _array(source, q_tensor).view(numerics.dtype_of(_FP8_NAMES[q_tensor.data_type]))
        block_size = attrs.get("block_size") or None
        axis = attrs.get("axis", 1)
        if scales.ndim == 0 or scales.size == 1 and block_size is None:
            axis = None
        new_q, bits, values = numerics.requantize_blocks(q, scales, axis=axis, block_size=block_size, round_mode=rounding)
        replaced[q_tensor.name] = _raw_tensor(q_tensor.name, q_tensor.data_type, new_q.view(np.uint8))
        if keep_e8m0:
            replaced[s_tensor.name] = _raw_tensor(s_tensor.name, TensorProto.FLOAT8E8M0, bits.reshape(scales.shape))
            node.attribute.append(helper.make_attribute("output_dtype", TensorProto.FLOAT))
        else:
            replaced[s_tensor.name] = _raw_tensor(s_tensor.name, TensorProto.FLOAT, values.reshape(scales.shape))
        changed = int(np.count_nonzero(new_q.view(np.uint8) != q.view(np.uint8)))
        done[label] = {"quantized": q_tensor.name, "scale": s_tensor.name, "changed_values": changed}
    for i, tensor in enumerate(graph.initializer):
        if tensor.name in replaced:
            graph.initializer[i].CopyFrom(replaced[tensor.name])
    record = {
        "operation": "requantize",
        "scale": scale,
        "rounding": rounding,
        "keep_e8m0": bool(keep_e8m0),
        "tensors": done,
        "skipped": [{"name": n, "reason": r} for n, r in skipped.items()],
        "previous": summary(source),
    }
    return _finish(proto, source, record)


# -- saving ------------------------------------------------------------------------------------


def save(model: Model | onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write a (quantized) model to ``path``. Up to :data:`EXTERNAL_THRESHOLD` bytes of weights
    (1 GiB) go inside the one file; past that every tensor over 1 KiB goes to ``<name>.data``
    beside it (external tensors copied from their mapped files by
    :meth:`hal.weights.Weights.save_beside`, in-memory ones appended by onnx). Returns the path.
    Raises :class:`~hal.errors.OutputPathError` when the path cannot take the file."""
    from hal.cache import atomic_write

    target = Path(path)
    if target.is_dir() or not target.parent.is_dir():
        msg = f"cannot write the model to {target}: name a file in an existing directory"
        raise OutputPathError(msg)
    proto = model.proto if isinstance(model, Model) else model
    weights = model.weights if isinstance(model, Model) else None
    external = weights.nbytes if weights is not None else 0
    try:
        if proto.ByteSize() + external <= EXTERNAL_THRESHOLD:
            whole = proto if weights is None else weights.inline(proto)
            atomic_write(target, whole.SerializeToString())
            os.chmod(target, 0o666 & ~_umask())
            return target
        data_name = f"{target.name}.data"
        if weights is not None:
            proto = weights.save_beside(proto, target, data_name)
        else:
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)
            proto = copy
            (target.parent / data_name).unlink(missing_ok=True)
        # onnx appends the in-memory tensors to the data file save_beside wrote.
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=False)
    except OSError as exc:
        msg = f"cannot write the model to {target}: {exc.strerror or exc}; choose another path"
        raise OutputPathError(msg) from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
