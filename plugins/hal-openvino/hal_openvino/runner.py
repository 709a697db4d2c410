"""Runs one compiled OpenVINO model: the hot path of the plugin.

One infer request is created per runner and reused. Inputs are wrapped as ``ov.Tensor`` sharing
the caller's memory (no copy for C-contiguous arrays); ml_dtypes inputs (bfloat16, fp8, e8m0) are
wrapped by their raw bits with OpenVINO's element type, 4-bit ones packed as ONNX packs them.
Outputs are copied out of the request's buffers, so a result never changes under the caller
when the executable runs again.

Not thread-safe: one runner serves one call at a time, like the request it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hal.capabilities import NumberFormat
from hal.errors import CompileError
from hal.tensors import bits_view, pack, unpack

if TYPE_CHECKING:
    import onnx

__all__ = ["OV_TYPES", "OpenVinoRunner"]

#: ONNX element type -> ``openvino.Type`` attribute name. Formats absent here have no OpenVINO type.
OV_TYPES = {
    NumberFormat.FLOAT32: "f32",
    NumberFormat.UINT8: "u8",
    NumberFormat.INT8: "i8",
    NumberFormat.UINT16: "u16",
    NumberFormat.INT16: "i16",
    NumberFormat.INT32: "i32",
    NumberFormat.INT64: "i64",
    NumberFormat.BOOL: "boolean",
    NumberFormat.FLOAT16: "f16",
    NumberFormat.FLOAT64: "f64",
    NumberFormat.UINT32: "u32",
    NumberFormat.UINT64: "u64",
    NumberFormat.BFLOAT16: "bf16",
    NumberFormat.FLOAT8_E4M3FN: "f8e4m3",
    NumberFormat.FLOAT8_E5M2: "f8e5m2",
    NumberFormat.FLOAT8_E8M0: "f8e8m0",
    NumberFormat.UINT4: "u4",
    NumberFormat.INT4: "i4",
    NumberFormat.FLOAT4_E2M1: "f4e2m1",
    NumberFormat.STRING: "string",
}
#: Formats numpy has no native dtype for: moved by their raw bits (same width).
_RAW = frozenset(
    {NumberFormat.BFLOAT16, NumberFormat.FLOAT8_E4M3FN, NumberFormat.FLOAT8_E5M2, NumberFormat.FLOAT8_E8M0}
)
#: Sub-byte formats: ml_dtypes keeps one per byte, OpenVINO two per byte, first in the low bits.
_PACKED = frozenset({NumberFormat.INT4, NumberFormat.UINT4, NumberFormat.FLOAT4_E2M1})


def _elem(value_info: onnx.ValueInfoProto) -> NumberFormat | None:
    if not value_info.type.HasField("tensor_type"):
        return None
    return NumberFormat.from_onnx(value_info.type.tensor_type.elem_type)


def _port_index(ports: Sequence[Any]) -> dict[str, int]:
    index = {}
    for i, port in enumerate(ports):
        for name in port.get_names():
            index.setdefault(name, i)
    return index


class OpenVinoRunner:
    """A compiled OpenVINO model behind :class:`hal.Runner`'s ``run(feeds, output_names)``."""

    def __init__(self, compiled: Any, model: onnx.ModelProto) -> None:
        import openvino
        from openvino import _pyopenvino

        self.compiled = compiled
        self.request = compiled.create_infer_request()
        initializers = {t.name for t in model.graph.initializer}
        in_ports = _port_index(compiled.inputs)
        out_ports = _port_index(compiled.outputs)
        tensor = _pyopenvino.Tensor

        # (feed name, request input index, converter or None for the zero-copy path)
        inputs: list[tuple[str, int, Callable[[np.ndarray], Any] | None]] = []
        for info in model.graph.input:
            if info.name in initializers:
                continue
            if info.name not in in_ports:
                msg = f"OpenVINO's compiled model has no input {info.name!r} (it has {sorted(in_ports)})"
                raise CompileError(msg)
            fmt = _elem(info)
            inputs.append((info.name, in_ports[info.name], self._input_converter(fmt, openvino)))
        self._inputs = tuple(inputs)

        # name -> (request output index, converter from the request's tensor to the declared array)
        outputs: dict[str, tuple[int, Callable[[Any], np.ndarray]]] = {}
        for info in model.graph.output:
            if info.name not in out_ports:
                msg = f"OpenVINO's compiled model has no output {info.name!r} (it has {sorted(out_ports)})"
                raise CompileError(msg)
            index = out_ports[info.name]
            fmt = _elem(info)
            produced = compiled.outputs[index].get_element_type()
            outputs[info.name] = (index, self._output_converter(fmt, produced, openvino))
        self._outputs = outputs
        self._tensor = tensor
        self._set_input = self.request.set_input_tensor
        self._get_output = self.request.get_output_tensor
        # The binding's own infer, not the Python wrapper's: the wrapper re-dispatches feeds and
        # builds a dict of every output per call (about half the cost of a small model here).
        self._infer = _pyopenvino.InferRequest.infer

    @staticmethod
    def _input_converter(fmt: NumberFormat | None, openvino: Any) -> Callable[[np.ndarray], Any] | None:
        if fmt is None or fmt not in OV_TYPES or (fmt not in _RAW and fmt not in _PACKED):
            return None
        ov_type = getattr(openvino.Type, OV_TYPES[fmt])
        tensor = openvino.Tensor
        if fmt in _PACKED:
            return lambda array: tensor(pack(array, fmt), list(array.shape), ov_type)
        return lambda array: tensor(bits_view(array), list(array.shape), ov_type)

    @staticmethod
    def _output_converter(fmt: NumberFormat | None, produced: Any, openvino: Any) -> Callable[[Any], np.ndarray]:
        if fmt in _PACKED:
            assert fmt is not None
            return lambda t: unpack(t.data.view(np.uint8).copy(), fmt, tuple(t.shape))
        if fmt in _RAW:
            assert fmt is not None
            dtype = fmt.dtype
            # OpenVINO shows bf16 as float16 and fp8 as uint8: same width, reinterpret the bits.
            return lambda t: t.data.view(dtype).copy()
        declared = None if fmt is None or fmt is NumberFormat.STRING else fmt.dtype
        if declared is not None and produced.to_dtype() != declared:
            # A plugin may hand back a wider or narrower type than the model declares.
            return lambda t: t.data.astype(declared)
        return lambda t: t.data.copy()

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Run once on feeds already checked by the core; one array per requested output."""
        tensor = self._tensor
        set_input = self._set_input
        for name, index, convert in self._inputs:
            array = feeds[name]
            if convert is None:
                flags = array.flags
                if not (flags.c_contiguous and flags.writeable):
                    # OpenVINO shares only contiguous, writable memory; copy the rest once.
                    array = np.array(array, order="C")
                set_input(index, tensor(array, shared_memory=True))
            else:
                set_input(index, convert(array))
        self._infer(self.request, {}, True, False)
        outputs = self._outputs
        get_output = self._get_output
        return [convert(get_output(index)) for index, convert in (outputs[name] for name in output_names)]
