"""FP8 weights fitted to a device: element format, scale format and E8M0 encoding, from its
declared :class:`~hal.capabilities.Capabilities` (never its name).

A quantized weight is ``DequantizeLinear(w, scale[, zero_point])`` over initializers, ``w`` in an
FP8 format and ``scale`` in float32, float16, bfloat16 or UE8M0 (``float8_e8m0``); a plain
``Cast`` of an FP8 initializer is the same with a scale of one. For each one, in this order:

1. **Element.** Kept where the device holds the format (any support but ``NONE``). A device
   that has only the FNUZ variant (AMD MI300) gets E4M3FN/E5M2 values as E4M3FNUZ/E5M2FNUZ:
   every finite value halved and its scale doubled, which is exact (the FNUZ grid is the FN grid
   halved); -0 (0x80, NaN in FNUZ) becomes +0, NaN becomes 0x80; E5M2's infinities have no FNUZ
   value and saturate (said in the step). A device with no FP8 at all (Ascend 910B/910C, A100,
   CPUs without it) gets the weight **dequantized at compile time**: exactly what
   ``DequantizeLinear`` computes, stored in the narrowest float the device computes natively
   that holds every value exactly (bfloat16 or float16 when all dequantized values fit, with a
   ``Cast`` to the declared type), else in the declared type. The memory this costs is checked
   by :func:`~hal.compiler.limits.check_memory` afterwards.
2. **Scale format.** UE8M0 scales on a device that does not declare the element with UE8M0
   scaling (:attr:`Capabilities.scaled`) become float32, exactly (onnxruntime's CPU
   ``DequantizeLinear`` has no kernel for them). Float scales on a device that declares the
   element with UE8M0 scaling only are kept (the device dequantizes them as written) unless the
   caller allows reduced precision (``to(..., reduced_precision=True)``): then they are
   **requantized** for its native path (lossy, rounding scales up so no value overflows), the
   step records each tensor's SQNR and the device is verified against the requantized model, the
   loss being the lowering's, not the device's. A device that only holds or emulates the element
   and declares no scaled format for it at all (IREE's llvm-cpu: its ONNX importer has no
   per-axis or blocked ``DequantizeLinear``) gets a per-axis or per-block dequantization spelled
   as ``Cast`` and ``Mul`` (exact; the weight stays FP8).
3. **E8M0 encoding.** A device reading UE8M0 bytes as Huawei CANN does (0x00 is zero) gets the
   bytes re-encoded; 2^-127 (0x00 in OCP/ONNX) cannot be held there, and such scales become
   float32 where the device takes them, else the lowering is refused.

Weights stored as external data are not read by lowering: one that needs converting is refused
with the reason (keep them inside the model, or choose a device with the model's FP8 format).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hal.capabilities import Capabilities, E8M0Encoding, NumberFormat, Support
from hal.errors import LoweringError
from hal.lowering import LoweringStep, StepKind

__all__ = ["FP8_FORMATS", "legalize_scaled"]

E4M3FN, E5M2 = NumberFormat("float8_e4m3fn"), NumberFormat("float8_e5m2")
E4M3FNUZ, E5M2FNUZ = NumberFormat("float8_e4m3fnuz"), NumberFormat("float8_e5m2fnuz")
E8M0 = NumberFormat("float8_e8m0")
FP8_FORMATS = frozenset({E4M3FN, E5M2, E4M3FNUZ, E5M2FNUZ})
_FNUZ_OF = {E4M3FN: E4M3FNUZ, E5M2: E5M2FNUZ}
_FLOAT_SCALES = frozenset({NumberFormat("float32"), NumberFormat("float16"), NumberFormat("bfloat16")})
_NARROW_FLOATS = (NumberFormat("bfloat16"), NumberFormat("float16"))


def _fmt(code: int) -> NumberFormat | None:
    try:
        return NumberFormat.from_onnx(code)
    except ValueError:
        return None


def _attr(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


class _Weights:
    """The main graph's initializers by name, read and written as numpy (ml_dtypes) arrays."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.by_name = {t.name: t for t in graph.initializer}
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        for node in graph.node:
            self.taken.update(node.output)

    def array(self, name: str, why: str) -> np.ndarray:
        tensor = self.by_name[name]
        if tensor.data_location == TensorProto.EXTERNAL:
            msg = (
                f"FP8 weight {name!r} is stored as external data, which lowering does not read, and this "
                f"device needs it converted ({why}); keep the weight inside the model or choose a device "
                "with the model's FP8 formats"
            )
            raise LoweringError(msg)
        return numpy_helper.to_array(tensor)

    def add(self, base: str, array: np.ndarray, fmt: NumberFormat) -> str:
        name, n = base, 0
        while name in self.taken:
            n += 1
            name = f"{base}__{n}"
        self.taken.add(name)
        data = np.ascontiguousarray(array).view(np.uint8).tobytes() if fmt.bits == 8 else None
        if data is not None:
            tensor = helper.make_tensor(name, fmt.onnx_type, list(array.shape), data, raw=True)
        else:
            tensor = numpy_helper.from_array(np.ascontiguousarray(array).astype(fmt.dtype), name)
            tensor.data_type = fmt.onnx_type
        self.graph.initializer.append(tensor)
        self.by_name[name] = tensor
        return name


class _Fitter:
    def __init__(self, model: onnx.ModelProto, capabilities: Capabilities, reduced_precision: bool = False) -> None:
        self.model = model
        self.caps = capabilities
        self.reduced_precision = reduced_precision
        self.weights = _Weights(model.graph)
        self.counts: Counter[str] = Counter()
        self.sqnr: list[float] = []
        self.extra_bytes = 0
        self.saturated = 0

    # -- what the device declares ---------------------------------------------------------------

    def holds(self, fmt: NumberFormat) -> bool:
        return self.caps.support(fmt) is not Support.NONE

    def scales(self, element: NumberFormat) -> set[NumberFormat]:
        return {s.scale for s in self.caps.scaled if s.element is element and s.support is not Support.NONE}

    def narrowest_exact(self, values: np.ndarray, declared: NumberFormat) -> NumberFormat:
        for fmt in _NARROW_FLOATS:
            if fmt.bits < declared.bits and self.caps.support(fmt) is Support.NATIVE:
                narrow = values.astype(fmt.dtype)
                if np.array_equal(narrow.astype(values.dtype), values, equal_nan=True):
                    return fmt
        return declared

    # -- rewriting -------------------------------------------------------------------------------

    def fit(self) -> bool:
        nodes: list[onnx.NodeProto] = []
        changed = False
        for node in self.model.graph.node:
            replaced = self._fit_node(node)
            changed |= replaced is not None
            nodes.extend([node] if replaced is None else replaced)
        if changed:
            del self.model.graph.node[:]
            self.model.graph.node.extend(nodes)
            self._drop_unused()
        return changed

    def _quantized(self, node: onnx.NodeProto) -> tuple[NumberFormat, NumberFormat | None] | None:
        """(element, scale format) when ``node`` dequantizes an FP8 initializer."""
        if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] not in self.weights.by_name:
            return None
        element = _fmt(self.weights.by_name[node.input[0]].data_type)
        if element not in FP8_FORMATS:
            return None
        if node.op_type == "Cast":
            return element, None
        if node.op_type != "DequantizeLinear" or len(node.input) < 2 or node.input[1] not in self.weights.by_name:
            return None
        return element, _fmt(self.weights.by_name[node.input[1]].data_type)

    def _fit_node(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        found = self._quantized(node)
        if found is None:
            return None
        element, scale = found
        if not self.holds(element):
            if element in _FNUZ_OF and self.holds(_FNUZ_OF[element]) and scale is not None:
                return self._to_fnuz(node, element, scale)
            return self._dequantize(node, element)
        if scale is None:
            return None
        if self._undeclared_dequantize(node, element):
            return self._expand(node, element, scale)
        return self._fit_scale(node, element, scale)

    def _output_format(self, node: onnx.NodeProto, scale: NumberFormat | None) -> NumberFormat:
        if node.op_type == "Cast":
            return NumberFormat.from_onnx(_attr(node, "to", TensorProto.FLOAT) or TensorProto.FLOAT)
        declared = _attr(node, "output_dtype", 0)
        if declared:
            return NumberFormat.from_onnx(declared)
        return scale if scale is not None and scale is not E8M0 else NumberFormat("float32")

    def _scale_values(self, node: onnx.NodeProto, scale: NumberFormat, why: str) -> np.ndarray:
        raw = self.weights.array(node.input[1], why)
        if scale is E8M0:
            from hal.fp8 import e8m0_to_float32

            return e8m0_to_float32(raw.view(np.uint8), "ocp")
        return raw.astype(np.float32)

    def _dequantize(self, node: onnx.NodeProto, element: NumberFormat) -> list[onnx.NodeProto]:
        """No FP8 on the device: the value DequantizeLinear (or Cast) would compute, as a constant."""
        why = f"it has no {element.value}"
        q = self.weights.array(node.input[0], why).astype(np.float32)  # exact
        scale_fmt = None if node.op_type == "Cast" else _fmt(self.weights.by_name[node.input[1]].data_type)
        out_fmt = self._output_format(node, scale_fmt)
        if node.op_type == "Cast":
            values = q
        else:
            from hal.fp8 import expand_scale

            scale = self._scale_values(node, scale_fmt, why)  # type: ignore[arg-type]
            axis = _attr(node, "axis", 1)
            block = _attr(node, "block_size", 0) or None
            # DequantizeLinear computes (x - zero_point) * scale in the scale's type; FP8 zero
            # points are zero (ONNX), so x * scale in float32 is the same rounding.
            values = (q * expand_scale(scale, q.shape, axis, block)).astype(np.float32)
        values = values.astype(out_fmt.dtype)
        stored = self.narrowest_exact(values, out_fmt)
        name = self.weights.add(f"{node.input[0]}__dequantized", values.astype(stored.dtype), stored)
        self.counts[f"dequantize:{element.value}:{stored.value}:{out_fmt.value}"] += 1
        self.extra_bytes += values.size * stored.bits // 8 - values.size
        if stored is out_fmt:
            return [helper.make_node("Identity", [name], [node.output[0]], name=node.name or None)]
        return [helper.make_node("Cast", [name], [node.output[0]], name=node.name or None, to=out_fmt.onnx_type)]

    def _to_fnuz(self, node: onnx.NodeProto, element: NumberFormat, scale: NumberFormat) -> list[onnx.NodeProto]:
        """Only the FNUZ variant on the device: values halved, scales doubled (exact)."""
        from hal.fp8 import saturate_cast

        target = _FNUZ_OF[element]
        why = f"it has {target.value} but not {element.value}"
        q = self.weights.array(node.input[0], why).astype(np.float32)
        infinite = int(np.count_nonzero(np.isinf(q)))
        self.saturated += infinite
        fnuz = saturate_cast(q / np.float32(2.0), target.value)  # -0 -> +0, NaN -> 0x80, inf -> max
        values = self._scale_values(node, scale, why) * np.float32(2.0)
        if scale is E8M0 and E8M0 in self.scales(target) and np.all(values <= 2.0**127):
            from hal.fp8 import e8m0_from_float32

            new_scale, scale_fmt = e8m0_from_float32(values).view(np.uint8), E8M0  # exact: powers of two
        else:
            new_scale, scale_fmt = values, NumberFormat("float32")
        x = self.weights.add(f"{node.input[0]}__{target.value}", fnuz, target)
        s = self.weights.add(f"{node.input[1]}__x2", new_scale, scale_fmt)
        self.counts[f"fnuz:{element.value}:{target.value}"] += 1
        inputs = [x, s]
        if len(node.input) > 2 and node.input[2]:
            inputs.append(self.weights.add(f"{node.input[2]}__{target.value}", np.zeros(1, target.dtype).reshape(()), target))
        return self._dq(node, inputs, scale_fmt)

    def _dq(self, node: onnx.NodeProto, inputs: list[str], scale_fmt: NumberFormat) -> list[onnx.NodeProto]:
        """``node`` on new inputs (``scale_fmt``: the new scale's format), its output still of the
        format it declared: ``output_dtype`` set for a UE8M0 scale, else a Cast where the new
        float scale's type differs from the declared output."""
        out_fmt = self._output_format(node, _fmt(self.weights.by_name[node.input[1]].data_type))
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(inputs)
        for a in list(new.attribute):
            if a.name == "output_dtype":
                new.attribute.remove(a)
        if scale_fmt is E8M0:
            new.attribute.append(helper.make_attribute("output_dtype", out_fmt.onnx_type))
            return [new]
        if scale_fmt is out_fmt:
            return [new]
        wide = f"{node.output[0]}__{scale_fmt.value}"
        self.weights.taken.add(wide)
        del new.output[:]
        new.output.append(wide)
        return [new, helper.make_node("Cast", [wide], [node.output[0]], to=out_fmt.onnx_type)]

    def _undeclared_dequantize(self, node: onnx.NodeProto, element: NumberFormat) -> bool:
        """Whether ``node`` scales per axis or per block an element the device only holds or
        emulates and declares no scaled format for (IREE's importer has no such
        DequantizeLinear; a plain Cast of FP8 and a per-tensor scale it runs)."""
        if self.caps.support(element) is Support.NATIVE or self.scales(element):
            return False
        return int(np.prod(self.weights.by_name[node.input[1]].dims, dtype=np.int64)) > 1

    def _expand(self, node: onnx.NodeProto, element: NumberFormat, scale: NumberFormat) -> list[onnx.NodeProto]:
        """``DequantizeLinear`` spelled as what it computes: ``Cast(x) * scale``, the scale
        broadcast per axis or per block (a Reshape into blocks around the Mul). Exact: FP8
        values are exact in every float type, and the product is the one DequantizeLinear rounds
        (FP8 zero points are zero). FP8 stays FP8 in the model. A blocked axis that does not
        divide by the block is dequantized at compile time instead."""
        why = f"it declares no scaled format for {element.value}"
        shape = [int(d) for d in self.weights.by_name[node.input[0]].dims]
        rank = len(shape)
        axis = _attr(node, "axis", 1) or 0
        axis = axis + rank if axis < 0 else axis
        block = _attr(node, "block_size", 0) or 0
        if not 0 <= axis < rank or (block and shape[axis] % block):
            return self._dequantize(node, element)
        out_fmt = self._output_format(node, scale)
        compute = NumberFormat("float32") if scale is E8M0 else scale
        values = self._scale_values(node, scale, why).astype(compute.dtype)
        name = node.name or node.output[0]
        cast = self._fresh(f"{node.output[0]}__{compute.value}")
        nodes = [helper.make_node("Cast", [node.input[0]], [cast], name=f"{name}__cast", to=compute.onnx_type)]
        if block:
            blocks = [*shape[:axis], shape[axis] // block, block, *shape[axis + 1:]]
            s = self.weights.add(f"{node.input[1]}__blocks", values.reshape([*blocks[: axis + 1], 1, *blocks[axis + 2:]]), compute)
            into = self.weights.add(f"{node.input[0]}__block_shape", np.array(blocks, np.int64), NumberFormat("int64"))
            back = self.weights.add(f"{node.input[0]}__shape", np.array(shape, np.int64), NumberFormat("int64"))
            grouped, scaled = self._fresh(f"{cast}__blocks"), self._fresh(f"{cast}__scaled")
            nodes += [
                helper.make_node("Reshape", [cast, into], [grouped], name=f"{name}__into_blocks"),
                helper.make_node("Mul", [grouped, s], [scaled], name=f"{name}__scale"),
            ]
            last = helper.make_node("Reshape", [scaled, back], [node.output[0]], name=f"{name}__from_blocks")
        else:
            broadcast = [1] * rank
            broadcast[axis] = shape[axis]
            s = self.weights.add(f"{node.input[1]}__axis{axis}", values.reshape(broadcast), compute)
            last = helper.make_node("Mul", [cast, s], [node.output[0]], name=f"{name}__scale")
        if out_fmt is not compute:
            wide = self._fresh(f"{node.output[0]}__{compute.value}_scaled")
            last.output[0] = wide
            nodes += [last, helper.make_node("Cast", [wide], [node.output[0]], name=f"{name}__out", to=out_fmt.onnx_type)]
        else:
            nodes.append(last)
        self.counts[f"expand:{element.value}:{scale.value}"] += 1
        return nodes

    def _fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.weights.taken:
            n += 1
            name = f"{base}__{n}"
        self.weights.taken.add(name)
        return name

    def _fit_scale(self, node: onnx.NodeProto, element: NumberFormat, scale: NumberFormat) -> list[onnx.NodeProto] | None:
        declared = self.scales(element)
        if scale is E8M0:
            if E8M0 not in declared:
                return self._scales_to_float32(node, element, "the device declares no UE8M0 scaling for it")
            if self.caps.e8m0_encoding is E8M0Encoding.CANN_ZERO:
                return self._reencode(node, element, declared)
            return None
        if (
            self.reduced_precision and scale in _FLOAT_SCALES and E8M0 in declared and not (declared & _FLOAT_SCALES)
        ):
            return self._requantize(node, element, scale)
        return None

    def _scales_to_float32(self, node: onnx.NodeProto, element: NumberFormat, why: str) -> list[onnx.NodeProto]:
        values = self._scale_values(node, E8M0, why)
        s = self.weights.add(f"{node.input[1]}__float32", values, NumberFormat("float32"))
        self.counts[f"scales-float32:{element.value}"] += 1
        return self._dq(node, [node.input[0], s, *node.input[2:]], NumberFormat("float32"))

    def _reencode(self, node: onnx.NodeProto, element: NumberFormat, declared: set[NumberFormat]) -> list[onnx.NodeProto]:
        from hal.fp8 import e8m0_reencode

        raw = self.weights.array(node.input[1], "it reads UE8M0 bytes with CANN's zero").view(np.uint8)
        try:
            bits = e8m0_reencode(raw, "ocp", "cann-zero")
        except ValueError as exc:
            if declared & _FLOAT_SCALES or not self.caps.scaled:
                return self._scales_to_float32(node, element, f"CANN's encoding cannot hold them: {exc}")
            msg = f"scale {node.input[1]!r}: {exc}; this device takes no float scales for {element.value}"
            raise LoweringError(msg) from None
        s = self.weights.add(f"{node.input[1]}__cann", bits, E8M0)
        self.counts[f"reencode:{element.value}"] += 1
        return self._dq(node, [node.input[0], s, *node.input[2:]], E8M0)

    def _requantize(self, node: onnx.NodeProto, element: NumberFormat, scale: NumberFormat) -> list[onnx.NodeProto]:
        from hal.fp8 import expand_scale, requantize_blocks, sqnr_db

        why = f"it takes {element.value} with UE8M0 scales only"
        q = self.weights.array(node.input[0], why)
        old = self._scale_values(node, scale, why)
        axis = _attr(node, "axis", 1)
        block = _attr(node, "block_size", 0) or None
        new_q, bits, values = requantize_blocks(q, old, axis=axis, block_size=block, round_mode="up")
        before = q.astype(np.float64) * expand_scale(old, q.shape, axis, block)
        after = new_q.astype(np.float64) * expand_scale(values, q.shape, axis, block)
        self.sqnr.append(sqnr_db(before, after))
        x = self.weights.add(f"{node.input[0]}__ue8m0", new_q, element)
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.counts[f"requantize:{element.value}:{scale.value}"] += 1
        if opset >= 24 and self.caps.e8m0_encoding is not E8M0Encoding.CANN_ZERO:
            s = self.weights.add(f"{node.input[1]}__ue8m0", bits, E8M0)
            return self._dq(node, [x, s, *node.input[2:]], E8M0)
        # UE8M0 values as powers of two in the old scale's type: the same numbers, any opset
        s = self.weights.add(f"{node.input[1]}__ue8m0", values.astype(scale.dtype), scale)
        return self._dq(node, [x, s, *node.input[2:]], scale)

    def _drop_unused(self) -> None:
        used = {name for node in _all_nodes(self.model.graph) for name in node.input}
        used.update(v.name for v in self.model.graph.output)
        keep = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep)

    # -- what was done ---------------------------------------------------------------------------

    def steps(self) -> list[LoweringStep]:
        steps = []
        for key, count in self.counts.items():
            action, element, *rest = key.split(":")
            n = f"{count} FP8 weight{'s' if count != 1 else ''} ({element})"
            if action == "dequantize":
                stored, declared = rest
                how = stored if stored == declared else f"{stored} (exact; Cast to {declared} where used)"
                steps.append(LoweringStep(StepKind.LEGALIZE_SCALED, (
                    f"{n} dequantized at compile time to {how}: the device has no {element} "
                    f"(exact: the values DequantizeLinear computes; {self.extra_bytes / 2**20:+.1f} MiB of weights)"
                )))
            elif action == "fnuz":
                sat = f"; {self.saturated} infinities saturated to the largest value" if self.saturated else ""
                steps.append(LoweringStep(StepKind.LEGALIZE_SCALED, (
                    f"{n} converted to {rest[0]}: the device has no {element} (exact: values halved, scales "
                    f"doubled; -0 became +0, NaN 0x80{sat})"
                )))
            elif action == "scales-float32":
                steps.append(LoweringStep(StepKind.LEGALIZE_SCALED, (
                    f"{n}: UE8M0 scales converted to float32 (exact): the device declares no {element} "
                    "with UE8M0 scaling, or cannot hold the scales in its encoding"
                )))
            elif action == "expand":
                scales = "UE8M0 scales as their float32 values, " if rest[0] == E8M0.value else ""
                steps.append(LoweringStep(StepKind.LEGALIZE_SCALED, (
                    f"{n}: DequantizeLinear with per-axis or block scales spelled as Cast and Mul ({scales}exact; "
                    f"FP8 kept): the device declares no scaled format for {element}"
                )))
            elif action == "reencode":
                steps.append(LoweringStep(StepKind.LEGALIZE_SCALED, (
                    f"{n}: UE8M0 scale bytes re-encoded for CANN's reading (0x00 is zero there; no scale used it)"
                )))
            elif action == "requantize":
                worst = min(self.sqnr) if self.sqnr else float("nan")
                median = float(np.median(self.sqnr)) if self.sqnr else float("nan")
                steps.append(LoweringStep(StepKind.REQUANTIZE, (
                    f"{n} requantized from {rest[0]} scales to UE8M0 (rounding up): the device takes {element} "
                    f"with UE8M0 scales only (lossy: weight SQNR min {worst:.1f} dB, median {median:.1f} dB; "
                    "verified against the requantized model)"
                )))
        return steps


def _all_nodes(graph: onnx.GraphProto) -> Any:
    from hal.compiler._graph import all_nodes

    return all_nodes(graph)


def legalize_scaled(
    proto: onnx.ModelProto, capabilities: Capabilities, *, reduced_precision: bool = False
) -> tuple[onnx.ModelProto, list[LoweringStep]]:
    """Fit ``proto``'s FP8 weights to the device (see the module's docstring); requantize only
    with ``reduced_precision``. Returns ``proto`` itself and no steps when nothing changes; never
    modifies ``proto``."""
    if not any(_fmt(t.data_type) in FP8_FORMATS for t in proto.graph.initializer):
        return proto, []
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    fitter = _Fitter(model, capabilities, reduced_precision)
    if not fitter.fit():
        return proto, []
    return model, fitter.steps()
