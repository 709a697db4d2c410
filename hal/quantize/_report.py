"""How far a quantized model is from its float32 original: per tensor and end to end."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import onnx
from attrs import frozen
from onnx import TensorProto, helper, numpy_helper

from hal import fp8 as numerics
from hal.errors import HalError
from hal.model import Model, load
from hal.quantize._fp8 import _FP8_NAMES, _array, summary

_SCALE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT8E8M0)


@frozen
class TensorError:
    """One weight's error: the float32 original against what its ``DequantizeLinear`` gives.

    ``sqnr_db``: ``10 log10(sum w^2 / sum (w - w_q)^2)``; ``max_abs_error``; ``max_rel_error``:
    the largest ``|w - w_q| / |w|`` over nonzero ``w`` (1.0 where a tiny value became 0, which
    every large tensor has). ``bytes_before`` / ``bytes_after``: the original tensor against the
    FP8 values plus the scales as stored.
    """

    name: str
    shape: tuple[int, ...]
    format: str
    scale_format: str
    sqnr_db: float
    max_abs_error: float
    max_rel_error: float
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "format": self.format,
            "scale_format": self.scale_format,
            "sqnr_db": _finite(self.sqnr_db),
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


@frozen
class AccuracyReport:
    """What :func:`accuracy` measured.

    ``tensors``: one :class:`TensorError` per quantized weight. ``outputs``: each output's
    ``||out - ref|| / ||ref||`` (L2 over all elements, float64) with the float32 model as
    reference, both run on ``device`` through the HAL with the same seeded inputs; empty when
    not measured, and ``note`` says why (or how: keep_e8m0 models run with their scales as
    exact float32 copies, since onnxruntime's CPU kernels take no FLOAT8E8M0 scale).
    ``bytes_before`` / ``bytes_after``: all of each model's initializers.
    """

    tensors: tuple[TensorError, ...]
    outputs: tuple[tuple[str, float], ...]
    bytes_before: int
    bytes_after: int
    device: str | None
    seed: int
    note: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def end_to_end(self) -> float | None:
        """The largest output's relative error, None when not measured."""
        return max((e for _, e in self.outputs), default=None)

    def sqnr_summary(self) -> tuple[float, float] | None:
        """(median, minimum) SQNR in dB over the tensors, None without tensors."""
        values = [t.sqnr_db for t in self.tensors]
        if not values:
            return None
        return float(np.median(values)), float(min(values))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "outputs": [{"name": n, "relative_error": e} for n, e in self.outputs],
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_saved": self.bytes_saved,
            "device": self.device,
            "seed": self.seed,
            "note": self.note,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }

    def lines(self) -> list[str]:
        """The report as ``hal quantize --report`` prints it."""
        out = []
        width = max((len(t.name) for t in self.tensors), default=6)
        out.append(f"{'tensor':{width}}  {'shape':>14}  {'format':7} {'scale':7} {'SQNR dB':>8} {'max abs':>9} {'max rel':>8}")
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            out.append(
                f"{t.name:{width}}  {shape:>14}  {t.format:7} {t.scale_format:7} {t.sqnr_db:8.2f} "
                f"{t.max_abs_error:9.3g} {t.max_rel_error:8.3g}"
            )
        summary_ = self.sqnr_summary()
        if summary_ is not None:
            out.append(f"SQNR over {len(self.tensors)} tensors: median {summary_[0]:.2f} dB, min {summary_[1]:.2f} dB")
        for name, error in self.outputs:
            out.append(f"end to end on {self.device} (seed {self.seed}): output {name!r} ||out-ref||/||ref|| = {error:.3g}")
        if self.note:
            out.append(f"note: {self.note}")
        saved = self.bytes_saved
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        out.append(f"bytes: {self.bytes_before} -> {self.bytes_after} ({saved} saved, {ratio:.1%} of the original)")
        for name, reason in self.skipped:
            out.append(f"skipped {name}: {reason}")
        return out


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _tensor_bytes(t: TensorProto) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    if t.raw_data:
        return len(t.raw_data)
    count = math.prod(t.dims)
    size = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize if t.data_type != TensorProto.STRING else 0
    return count * size


def dequantized(model: Model) -> dict[str, tuple[np.ndarray, str, str, int]]:
    """Every weight a ``DequantizeLinear`` of FP8 initializers gives in ``model``, as the
    operator computes it (float32): ``{output name: (values, format, scale format, bytes)}``."""
    graph = model.proto.graph
    initializers = {t.name: t for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        q_t, s_t = initializers.get(node.input[0]), initializers.get(node.input[1])
        if q_t is None or s_t is None or q_t.data_type not in _FP8_NAMES or s_t.data_type not in _SCALE_TYPES:
            continue
        fmt = _FP8_NAMES[q_t.data_type]
        q = _array(model, q_t).view(numerics.dtype_of(fmt)) if q_t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(q_t)
        if s_t.data_type == TensorProto.FLOAT8E8M0:
            raw = _array(model, s_t) if s_t.data_location == TensorProto.EXTERNAL else np.frombuffer(s_t.raw_data, np.uint8)
            scale = numerics.e8m0_to_float32(np.asarray(raw).view(np.uint8).reshape(tuple(s_t.dims)))
            scale_format = "ue8m0"
        else:
            scale = np.asarray(_array(model, s_t), dtype=np.float32)
            mantissa = scale.view(np.uint32) & 0x7FFFFF
            scale_format = "pow2" if np.all(mantissa == 0) and np.all(scale.view(np.uint32) >> 23 & 0xFF > 0) else "float32"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        block_size = attrs.get("block_size") or None
        axis = attrs.get("axis", 1)
        full = numerics.expand_scale(scale, q.shape, axis if scale.ndim else None, block_size if scale.ndim else None)
        values = numerics.to_float32(q) * full.astype(np.float32)  # DequantizeLinear: one float32 product
        out[node.output[0]] = (values, fmt, scale_format, _tensor_bytes(q_t) + _tensor_bytes(s_t))
    return out


def _reference_weights(model: Model, names: set[str]) -> dict[str, np.ndarray]:
    """The named weights of the reference model: initializers, or dequantized FP8 ones."""
    out: dict[str, np.ndarray] = {}
    for tensor in model.proto.graph.initializer:
        if tensor.name in names:
            out[tensor.name] = np.asarray(_array(model, tensor), dtype=np.float32)
    missing = names - set(out)
    if missing:
        for name, (values, *_rest) in dequantized(model).items():
            if name in missing:
                out[name] = values
    return out


def _runnable(model: Model) -> tuple[Model, str | None]:
    """``model``, or a copy whose FLOAT8E8M0 scales are float32 (exact; onnxruntime's CPU
    DequantizeLinear has no kernel for an E8M0 scale)."""
    proto = model.proto
    e8m0 = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT8E8M0]
    if not e8m0:
        return model, None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    names = {t.name for t in e8m0}
    for tensor in copy.graph.initializer:
        if tensor.name in names:
            raw = _array(model, tensor) if tensor.data_location == TensorProto.EXTERNAL else np.frombuffer(tensor.raw_data, np.uint8)
            values = numerics.e8m0_to_float32(np.asarray(raw).view(np.uint8).reshape(tuple(tensor.dims)))
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    for node in copy.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[1] in names:
            kept = [a for a in node.attribute if a.name != "output_dtype"]
            del node.attribute[:]
            node.attribute.extend(kept)
    note = (
        f"{len(names)} FLOAT8E8M0 scale(s) were run as their exact float32 values (a measuring copy: "
        "onnxruntime's CPU DequantizeLinear has no kernel for an E8M0 scale)"
    )
    base_dir = model.weights.base_dir if model.weights is not None else None
    return load(copy, base_dir=base_dir), note


def _run(model: Model, feeds: dict[str, Any], device: str) -> dict[str, np.ndarray]:
    import hal

    exe = hal.compile(model).to(device, verify=False, fallback=None)
    return exe.run(feeds)


def accuracy(
    reference: str | os.PathLike[str] | bytes | onnx.ModelProto | Model,
    quantized: str | os.PathLike[str] | bytes | onnx.ModelProto | Model,
    *,
    device: str | None = "ort:cpu",
    seed: int = 0,
    feeds: dict[str, Any] | None = None,
) -> AccuracyReport:
    """Measure ``quantized`` (from :func:`fp8` or :func:`requantize`) against ``reference``.

    Per tensor: each weight a ``DequantizeLinear`` of FP8 initializers computes in ``quantized``,
    against the same-named weight of ``reference`` (a float32 initializer, or, for a model that
    was already FP8, its own dequantized value). End to end: both models compiled and run on
    ``device`` (``hal.compile(m).to(device)``, without verification or fallback) with the same
    inputs — ``feeds``, or :func:`hal.verification.seeded_feeds` from ``seed`` — and each
    output's ``||out - ref|| / ||ref||``. ``device=None`` skips that; a device that cannot run
    either model leaves ``outputs`` empty and says why in ``note``.
    """
    ref_model, q_model = load(reference), load(quantized)
    weights = dequantized(q_model)
    originals = _reference_weights(ref_model, set(weights))
    tensors = []
    for name, (values, fmt, scale_format, stored) in weights.items():
        original = originals.get(name)
        if original is None:
            continue
        err = np.abs(original.astype(np.float64) - values.astype(np.float64))
        nonzero = original != 0
        rel = float(np.max(err[nonzero] / np.abs(original[nonzero].astype(np.float64)))) if np.any(nonzero) else 0.0
        tensors.append(
            TensorError(
                name=name,
                shape=tuple(values.shape),
                format=fmt,
                scale_format=scale_format,
                sqnr_db=numerics.sqnr_db(original, values),
                max_abs_error=float(err.max()) if err.size else 0.0,
                max_rel_error=rel,
                bytes_before=_original_bytes(ref_model, name, original),
                bytes_after=stored,
            )
        )
    outputs: list[tuple[str, float]] = []
    notes = []
    if device is not None:
        from hal.verification import seeded_feeds

        runnable, note = _runnable(q_model)
        if note:
            notes.append(note)
        inputs = feeds if feeds is not None else seeded_feeds(ref_model.inputs, seed=seed)
        try:
            want = _run(ref_model, inputs, device)
            got = _run(runnable, inputs, device)
        except HalError as exc:
            notes.append(f"end-to-end error not measured: {device} could not run the models ({exc})")
        else:
            for name, ref in want.items():
                ref64 = np.asarray(ref, dtype=np.float64)
                diff = np.asarray(got[name], dtype=np.float64) - ref64
                norm = float(np.linalg.norm(ref64))
                outputs.append((name, float(np.linalg.norm(diff)) / norm if norm else float(np.linalg.norm(diff))))
    record = summary(q_model) or {}
    skipped = tuple((s["name"], s["reason"]) for s in record.get("skipped", ()))
    return AccuracyReport(
        tensors=tuple(tensors),
        outputs=tuple(outputs),
        bytes_before=sum(_tensor_bytes(t) for t in ref_model.proto.graph.initializer),
        bytes_after=sum(_tensor_bytes(t) for t in q_model.proto.graph.initializer),
        device=device,
        seed=seed,
        note="; ".join(notes) or None,
        skipped=skipped,
    )


def _original_bytes(model: Model, name: str, values: np.ndarray) -> int:
    for tensor in model.proto.graph.initializer:
        if tensor.name == name:
            return _tensor_bytes(tensor)
    stored = dequantized(model).get(name)
    return stored[3] if stored is not None else values.nbytes
