"""The hot path: run one entry function of a loaded vmfb on numpy feeds.

Everything that does not depend on the feeds (function lookup, element types, output indices,
allocator and memory flags) is resolved once in :class:`IreeRunner`'s constructor; a call packs
the inputs into buffer views, invokes the function and copies the outputs to host arrays.

Thread-safe: an IREE VM context is thread-compatible, not thread-safe (one invocation at a time),
and the binding releases the GIL while it invokes, so each call takes a context from a pool (one
made up front, more only while several threads call at once) and gives it back after the outputs
are copied out. Modules are immutable and shared; each context holds its own module state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hal.plugin import NumberFormat
from hal_iree._shapes import ShapeOracle

if TYPE_CHECKING:
    from hal_iree._parameters import Parameters

__all__ = ["IreeRunner", "hal_element_type", "numpy_dtype"]

# NumberFormat -> (HalElementType attribute, raw dtype the bytes are passed as, or None).
# ml_dtypes arrays do not export the buffer protocol, and IREE's i1 is one byte per element:
# those are handed over as same-width unsigned integers with an explicit element type.
_ELEMENT_TYPES: dict[NumberFormat, tuple[str, str | None]] = {
    NumberFormat.FLOAT32: ("FLOAT_32", None),
    NumberFormat.FLOAT64: ("FLOAT_64", None),
    NumberFormat.FLOAT16: ("FLOAT_16", None),
    NumberFormat.BFLOAT16: ("BFLOAT_16", "uint16"),
    NumberFormat.FLOAT8_E4M3FN: ("FLOAT_8_E4M3_FN", "uint8"),
    NumberFormat.FLOAT8_E4M3FNUZ: ("FLOAT_8_E4M3_FNUZ", "uint8"),
    NumberFormat.FLOAT8_E5M2: ("FLOAT_8_E5M2", "uint8"),
    NumberFormat.FLOAT8_E5M2FNUZ: ("FLOAT_8_E5M2_FNUZ", "uint8"),
    NumberFormat.FLOAT8_E8M0: ("FLOAT_8_E8M0_FNU", "uint8"),
    NumberFormat.INT8: ("SINT_8", None),
    NumberFormat.UINT8: ("UINT_8", None),
    NumberFormat.INT16: ("SINT_16", None),
    NumberFormat.UINT16: ("UINT_16", None),
    NumberFormat.INT32: ("SINT_32", None),
    NumberFormat.UINT32: ("UINT_32", None),
    NumberFormat.INT64: ("SINT_64", None),
    NumberFormat.UINT64: ("UINT_64", None),
    NumberFormat.BOOL: ("BOOL_8", "uint8"),
    NumberFormat.COMPLEX64: ("COMPLEX_64", None),
    NumberFormat.COMPLEX128: ("COMPLEX_128", None),
}


def numpy_dtype(fmt: NumberFormat) -> np.dtype:
    """``fmt.dtype``, tolerating core versions whose table lacks float64 (it skipped every
    name starting with ``float6``, meaning the float6 formats)."""
    try:
        return fmt.dtype
    except KeyError:
        return np.dtype(fmt.value)


def hal_element_type(fmt: NumberFormat) -> tuple[Any, np.dtype | None]:
    """IREE's ``HalElementType`` for a format and the raw dtype its bytes travel as.

    Raises :class:`KeyError` for formats the runtime cannot exchange (string, 4-bit, 2-bit).
    """
    import iree.runtime as rt

    name, raw = _ELEMENT_TYPES[fmt]
    return getattr(rt.HalElementType, name), (np.dtype(raw) if raw else None)


class IreeRunner:
    """A vmfb loaded into its own VM context on one device, ready to run.

    ``inputs``: ``(name, format)`` in the entry function's argument order (the graph's
    non-initializer inputs); ``outputs``: ``(name, format)`` in result order.
    """

    def __init__(
        self,
        vm_module: Any,
        hal_module: Any,
        device: Any,
        instance: Any,
        function: Any,
        inputs: Sequence[tuple[str, NumberFormat]],
        outputs: Sequence[tuple[str, NumberFormat]],
        on_thread: Callable[[], None] | None = None,
        shapes: ShapeOracle | None = None,
        parameters: Parameters | None = None,
    ) -> None:
        import iree.runtime as rt

        # Called before any runtime call on the caller's thread (iree:cuda makes the device's
        # CUDA context current there: IREE's CUDA driver sets it on the creating thread only).
        self._on_thread = on_thread
        # Models with dynamic input dimensions: the output shapes the model gives, checked (see
        # hal_iree._shapes: IREE does not broadcast dynamic dimensions, and does not say so).
        self._shapes = shapes
        self.vm_module = vm_module  # kept alive as long as a context uses it
        self._instance = instance
        # The weights the vmfb leaves out (IREE parameters): their io_parameters module resolves
        # them as each context initializes, from buffers the index holds.
        self.parameters = parameters
        self._modules = [hal_module, *([parameters.module] if parameters is not None else []), vm_module]
        # Idle VM contexts; one per concurrent caller at most (see the module docstring).
        self._idle: deque[Any] = deque()
        self._idle.append(self.new_context())
        self._function = function
        self._device = device
        self._allocate = device.allocator.allocate_buffer_copy
        self._memory_type = rt.MemoryType.DEVICE_LOCAL
        self._usage = rt.BufferUsage.DEFAULT
        self._list = rt.VmVariantList
        self._buffer_view = rt.HalBufferView
        self._in_specs = tuple((name, *hal_element_type(fmt)) for name, fmt in inputs)
        self._n_in = len(self._in_specs)
        self._n_out = len(outputs)
        # (result index, dtype the caller gets, dtype the bytes are read as or None if the same)
        self._out_specs = tuple(
            (index, numpy_dtype(fmt), hal_element_type(fmt)[1]) for index, (_, fmt) in enumerate(outputs)
        )
        self._by_name = {name: spec for (name, _), spec in zip(outputs, self._out_specs)}
        self._all_names = [name for name, _ in outputs]
        self._mappable: bool | None = None  # learnt from the first result buffer

    def new_context(self) -> Any:
        """A fresh VM context for :meth:`run_on` (the module state of one caller)."""
        import iree.runtime as rt

        if self._on_thread is not None:
            self._on_thread()
        return rt.VmContext(self._instance, modules=self._modules)

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Run the entry function; return host copies of ``output_names``, in that order."""
        if self._on_thread is not None:
            self._on_thread()
        shapes = self._shapes
        expected = shapes.before(feeds) if shapes is not None else None
        idle = self._idle
        try:
            context = idle.pop()
        except IndexError:  # every context is invoking in another thread: make one more
            context = self.new_context()
        try:
            results = self.run_on(context, feeds, output_names)
        finally:
            idle.append(context)
        if shapes is not None:
            shapes.after(expected, output_names, results)  # type: ignore[arg-type]
        return results

    def run_on(self, context: Any, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Run in ``context``, which no other thread may use until this returns."""
        args = self._list(self._n_in)
        allocate, memory_type, usage, device = self._allocate, self._memory_type, self._usage, self._device
        for name, element_type, raw in self._in_specs:
            array = feeds[name]
            if raw is not None:
                array = array.view(raw)
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            args.push_ref(
                allocate(memory_type=memory_type, allowed_usage=usage, device=device, buffer=array,
                         element_type=element_type)
            )
        rets = self._list(self._n_out)
        context.invoke(self._function, args, rets)
        if output_names == self._all_names or output_names is self._all_names:
            specs = self._out_specs
        else:
            by_name = self._by_name
            specs = tuple(by_name[name] for name in output_names)
        return [self._fetch(rets, index, dtype, raw) for index, dtype, raw in specs]

    def _fetch(self, rets: Any, index: int, dtype: np.dtype, raw: np.dtype | None) -> np.ndarray:
        view = rets.get_as_object(index, self._buffer_view)
        if self._mappable is None:
            self._mappable = self._is_mappable(view)
        if self._mappable:
            # local-task buffers live in host memory: map and copy once (the mapping dies with
            # the buffer, so the caller must get its own copy).
            host = np.array(view.map().asarray(view.shape, raw or dtype), copy=True)
        else:
            import iree.runtime as rt

            host = np.asarray(rt.DeviceArray(self._device, view, override_dtype=raw or dtype).to_host()).copy()
        return host if raw is None else host.view(dtype)

    @staticmethod
    def _is_mappable(view: Any) -> bool:
        import iree.runtime as rt

        buffer = view.get_buffer()
        visible = int(rt.MemoryType.HOST_VISIBLE)
        mapping = int(rt.BufferUsage.MAPPING_SCOPED)
        return (buffer.memory_type() & visible) == visible and (buffer.allowed_usage() & mapping) == mapping
