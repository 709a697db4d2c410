"""Runs one compiled OpenVINO model: the hot path of the plugin.

Thread-safe: each call takes an infer request from a pool and gives it back after copying the
outputs out. The pool holds at most OPTIMAL_NUMBER_OF_INFER_REQUESTS requests (1 under the default
LATENCY hint, one per stream under THROUGHPUT), made as callers first need them; a caller that finds
none idle waits for one. A request per concurrent caller was measured at 0.46-1.05x (median 0.84x)
a lock's throughput for a compute-bound model on 2 cores (each infer already uses every core), against
1.2-1.8x for a tiny one; this bounded pool was at 1.02-1.36x (BENCHMARKS.md, "Many threads on one
executable").

Inputs are wrapped as ``ov.Tensor`` sharing the caller's memory (no copy for C-contiguous,
writable arrays; others are copied once); ml_dtypes inputs (bfloat16, fp8, e8m0) are wrapped by
their raw bits with OpenVINO's element type, 4-bit ones packed as ONNX packs them. A request
keeps only a pointer to an input's memory, never a reference to the array, so every tensor of a
call (and the copy it may wrap) is held until the request has finished reading it. Outputs are
copied out of the request's buffers, so a result never changes under the caller when the
executable runs again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hal.plugin import CompileError, NumberFormat, bits_view, pack, unpack

if TYPE_CHECKING:
    from hal.plugin import LoweredModel

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


def _port_index(ports: Sequence[Any]) -> dict[str, int]:
    index = {}
    for i, port in enumerate(ports):
        for name in port.get_names():
            index.setdefault(name, i)
    return index


class OpenVinoRunner:
    """A compiled OpenVINO model behind :class:`hal.Runner`'s ``run(feeds, output_names)``.

    ``inference_precision`` is the precision OpenVINO says it computes floating-point layers in
    (``INFERENCE_PRECISION_HINT`` read back from the compiled model: ``"f32"`` unless the caller
    allowed reduced precision and the device has a faster type, e.g. ``"bf16"`` on AVX-512 BF16
    and AMX CPUs).
    """

    def __init__(self, compiled: Any, model: LoweredModel) -> None:
        import openvino
        from openvino import _pyopenvino

        self.compiled = compiled
        self.inference_precision = _precision_name(compiled)
        in_ports = _port_index(compiled.inputs)
        out_ports = _port_index(compiled.outputs)
        if len(compiled.inputs) == len(model.inputs) and any(i.name not in in_ports for i in model.inputs):
            # Every input is there, one under another name: OpenVINO's ONNX reader names a
            # parameter after the output it passes through unchanged (Dropout's y for its x). Its
            # parameters keep the graph's input order, so the unnamed ones are matched by position.
            claimed = {in_ports[i.name] for i in model.inputs if i.name in in_ports}
            for position, info in enumerate(model.inputs):
                if info.name not in in_ports and position not in claimed:
                    in_ports[info.name] = position

        # (feed name, request input index, converter to a Tensor)
        inputs: list[tuple[str, int, Callable[[np.ndarray], Any]]] = []
        for info in model.inputs:
            if info.name not in in_ports:
                # OpenVINO drops inputs the answer does not depend on: CastLike's ``like`` (only
                # its type counts), an input of static shape with no elements (ReduceL1's empty
                # ``axes``). The core still checks what the caller feeds there; it is not passed.
                # An input dropped wrongly would show in verification and in the kit's answers.
                continue
            inputs.append((info.name, in_ports[info.name], self._input_converter(info.format, openvino)))
        self._inputs = tuple(inputs)

        # name -> (request output index, converter from the request's tensor to the declared array)
        outputs: dict[str, tuple[int, Callable[[Any], np.ndarray]]] = {}
        for info in model.outputs:
            if info.name not in out_ports:
                msg = f"OpenVINO's compiled model has no output {info.name!r} (it has {sorted(out_ports)})"
                raise CompileError(msg)
            index = out_ports[info.name]
            produced = compiled.outputs[index].get_element_type()
            outputs[info.name] = (index, self._output_converter(info.format, produced, openvino))
        self._outputs = outputs
        # Idle infer requests. One request serves one call at a time ("Infer Request is busy"
        # otherwise, or worse, another caller's inputs). SimpleQueue's get/put are C calls that
        # cost well under a microsecond when uncontended, and get() waits without the GIL.
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle.put(compiled.create_infer_request())
        self._made = 1
        self._limit = _optimal_requests(compiled)
        self._grow = threading.Lock()  # taken only when no request is idle
        self._new_request = compiled.create_infer_request
        # The binding's own infer, not the Python wrapper's: the wrapper re-dispatches feeds and
        # builds a dict of every output per call (about half the cost of a small model here).
        self._infer = _pyopenvino.InferRequest.infer

    @staticmethod
    def _input_converter(fmt: NumberFormat | None, openvino: Any) -> Callable[[np.ndarray], Any]:
        tensor = openvino.Tensor
        if fmt is None or fmt not in OV_TYPES or (fmt not in _RAW and fmt not in _PACKED):
            return lambda array: _shared_tensor(array, tensor)
        ov_type = getattr(openvino.Type, OV_TYPES[fmt])
        if fmt in _PACKED:
            # pack() returns a new array: the Tensor holds it, the caller holds the Tensor.
            return lambda array: tensor(pack(array, fmt), list(array.shape), ov_type)
        # bits_view() copies non-contiguous arrays; the Tensor holds that copy too.
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
        idle = self._idle
        try:
            request = idle.get_nowait()
        except queue.Empty:  # every request is busy in another thread
            request = self._another_request()
        try:
            return self.run_on(request, feeds, output_names)
        finally:
            idle.put(request)

    def _another_request(self) -> Any:
        """A new request while fewer than OpenVINO's optimum exist, else the next one returned."""
        with self._grow:
            if self._made < self._limit:
                self._made += 1
                return self._new_request()
        return self._idle.get()

    def run_on(self, request: Any, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Run on ``request``, which no other thread may use until this returns."""
        set_input = request.set_input_tensor
        # The list holds every Tensor, and so every array (or copy) it wraps, until infer returns:
        # the request itself keeps only pointers. (Setting them one by one, then infer with no
        # inputs, measured ~1.5 us a call cheaper than passing them to infer as a dict.)
        held = []
        for name, index, convert in self._inputs:
            tensor = convert(feeds[name])
            held.append(tensor)
            set_input(index, tensor)
        self._infer(request, {}, True, False)
        outputs = self._outputs
        get_output = request.get_output_tensor
        # Copied out here, before the request can serve another call, and while ``held`` still
        # holds the inputs: an output may be an input's own memory (a graph that passes an input
        # through, Dropout or Identity, answered with freed memory when the copy went first).
        results = [convert(get_output(index)) for index, convert in (outputs[name] for name in output_names)]
        del held
        return results


def _shared_tensor(array: np.ndarray, tensor: Any) -> Any:
    """``array`` as an ``ov.Tensor`` over the same memory, or over a contiguous copy."""
    flags = array.flags
    if not (flags.c_contiguous and flags.writeable):
        # OpenVINO shares only contiguous, writable memory: read-only, strided, Fortran-order and
        # broadcast views are copied once (the Tensor holds the copy).
        array = np.array(array, order="C")
    return tensor(array, shared_memory=True)


def _optimal_requests(compiled: Any) -> int:
    """OPTIMAL_NUMBER_OF_INFER_REQUESTS: how many requests OpenVINO runs at once without the
    streams competing for cores (at least 1)."""
    try:
        return max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    except Exception:  # noqa: BLE001 - a device without the property: one request at a time
        return 1


def _precision_name(compiled: Any) -> str:
    """The compiled model's INFERENCE_PRECISION_HINT as OpenVINO's short type name (``f32``)."""
    try:
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # noqa: BLE001 - a device without the property computes in its own types
        return "dynamic"
    return str(getattr(precision, "get_type_name", lambda: precision)())
