"""Weights as IREE parameters: the vmfb holds the graph, the runtime reads the weights from the
HAL's mapping.

IREE names a weight the module does not hold ``#stream.parameter.named<"hal"::"key">``; the
``io_parameters`` module resolves the name at load time from a ``ParameterIndex``. The plugin
imports a model's external initializers that way (:func:`plan`, :func:`import_module`) and, when
it loads the vmfb, gives the index the read-only views ``LoweredModel.weights`` maps
(:func:`runtime_module`): the file's pages, no copy (IREE imports a host buffer as is when it is
64-byte aligned; a tensor the file holds at another offset is copied by IREE at load, and logged).

A vmfb built this way depends on the graph, the inline tensors and each parameter's name, type
and shape, never on a parameter's bytes: it is cached under :func:`graph_sha256`, so models that
differ only in their external weights (a fine-tuned copy) share one vmfb.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hal.plugin import NumberFormat

if TYPE_CHECKING:
    import onnx

    from hal.plugin import LoweredModel

log = logging.getLogger("hal_iree")

#: The scope every parameter of the plugin's vmfbs is named in.
SCOPE = "hal"
#: Initializers with fewer elements stay inside the vmfb even when external: shapes, axes and
#: scalars the importer and the compiler must see as constants (IREE's importer's own default).
MIN_ELEMENTS = 100
#: IREE imports a parameter's host memory without a copy only at this alignment (measured on
#: iree-base-runtime 3.13: offsets 4 and 16 were copied at load, 64 was not).
ALIGNMENT = 64
#: Past this many bytes copied at load (misaligned tensors), the log line is a WARNING.
_COPY_WARNING_BYTES = 256 << 20

_EXTERNAL = 1  # onnx.TensorProto.EXTERNAL, without importing onnx
# Formats a parameter may have: whole bytes per element, stored as IREE stores them. bool (IREE's
# i1 storage) and the packed 4- and 2-bit formats stay inline.
_NOT_PARAMETERS = frozenset({NumberFormat.BOOL, NumberFormat.STRING})


def plan(model: LoweredModel, inline_bytes: int | None) -> dict[str, str]:
    """``{initializer name: parameter key}`` for the main-graph initializers that become
    parameters: every external one of at least :data:`MIN_ELEMENTS` elements and, when
    ``inline_bytes`` is not None, every inline one of at least that many bytes (and
    :data:`MIN_ELEMENTS`). Empty when nothing qualifies (the model compiles as before, weights
    inside the vmfb)."""
    chosen: list[str] = []
    for tensor in model.proto.graph.initializer:
        try:
            fmt = NumberFormat.from_onnx(tensor.data_type)
        except ValueError:
            continue
        if fmt in _NOT_PARAMETERS or fmt.bits < 8:
            continue
        elements = 1
        for d in tensor.dims:
            elements *= d
        if elements < MIN_ELEMENTS:
            continue
        if tensor.data_location == _EXTERNAL:
            chosen.append(tensor.name)
        elif inline_bytes is not None and tensor.HasField("raw_data") and elements * fmt.bits // 8 >= inline_bytes:
            chosen.append(tensor.name)
    return _keys(chosen)


def _keys(names: list[str]) -> dict[str, str]:
    """Readable, unique keys: the name with ``:`` (IREE's scope separator) replaced."""
    keys: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = name.replace(":", "_") or "weight"
        key, n = base, 1
        while key in taken:
            key, n = f"{base}__{n}", n + 1
        taken.add(key)
        keys[name] = key
    return keys


def graph_sha256(model: LoweredModel, parameters: Mapping[str, str]) -> str:
    """The identity of what a vmfb built with ``parameters`` holds: the lowered graph, its inline
    tensors and the external ones it keeps inside (by their bytes' sha256, which the core
    remembers), each parameter's name, key, type and shape, not its bytes."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model.proto)
    for tensor in copy.graph.initializer:
        if tensor.name in parameters:
            name, data_type, dims = tensor.name, tensor.data_type, list(tensor.dims)
            tensor.Clear()
            tensor.name, tensor.data_type = name, data_type
            tensor.dims.extend(dims)
    data = copy.SerializeToString(deterministic=True) if model.weights is None else model.weights.normalized(copy)
    digest = hashlib.sha256(data)
    digest.update(b"\0" + json.dumps(dict(parameters), sort_keys=True).encode())
    return digest.hexdigest()


def import_proto(model: LoweredModel, parameters: Mapping[str, str]) -> onnx.ModelProto:
    """The model as the importer reads it: parameters stay external (the importer reads their
    name, type and shape only), every other external tensor comes inside (small: below
    :data:`MIN_ELEMENTS`, or in a subgraph)."""
    if model.weights is None:
        return model.proto
    return model.weights.inline(model.proto, keep_external=parameters.keys())


def import_module(info: Any, module: Any, parameters: Mapping[str, str]) -> Any:
    """A node importer for ``info``'s main graph (IREE's ``onnx_importer.ModelInfo``) into
    ``module`` that makes the initializers named in ``parameters`` ``util.global``\\ s initialized
    from ``#stream.parameter.named<"hal"::key>``, and imports every other one as a constant."""
    from iree.compiler.tools.import_onnx.importer_externalization_overrides import IREENodeImporter, ParamData

    # IREE's importer chooses by element count alone (and names parameters after a sanitized
    # initializer name, which can collide): the subclass chooses by name and keys them uniquely.
    data = ParamData(
        param_bit_threshold=None, num_elements_threshold=0, params_scope=SCOPE, data_dir="", param_path="",
        input_index_threshold=None,
    )
    importer = IREENodeImporter.define_function(info.main_graph, module, data)
    importer.__class__ = _importer_class()  # define_function builds the base class by name
    importer.hal_parameters = dict(parameters)
    return importer


@functools.cache
def _importer_class() -> type:
    import onnx
    from iree.compiler.extras import onnx_importer
    from iree.compiler.tools.import_onnx.importer_externalization_overrides import IREENodeImporter

    class ParameterImporter(IREENodeImporter):  # type: ignore[misc]
        hal_parameters: dict[str, str]

        def sanitize_name(self, name: str) -> str:
            return self.hal_parameters.get(name) or super().sanitize_name(name)

        def import_initializer(self, initializer: Any, extern_name: str | None = None) -> Any:
            if isinstance(initializer, onnx.TensorProto) and initializer.name not in self.hal_parameters:
                return onnx_importer.NodeImporter.import_initializer(self, initializer, extern_name)
            return super().import_initializer(initializer, extern_name)

    return ParameterImporter


class Parameters:
    """The ``io_parameters`` module of one loaded model: its index over the model's weights."""

    def __init__(self, instance: Any, model: LoweredModel, parameters: Mapping[str, str]) -> None:
        import iree.runtime as rt

        index = rt.ParameterIndex()
        copied = copied_bytes = 0
        for tensor in model.proto.graph.initializer:
            key = parameters.get(tensor.name)
            if key is None:
                continue
            if tensor.data_location == _EXTERNAL:
                assert model.weights is not None
                buffer: Any = model.weights.view(tensor)  # read-only, over the mapping
                if _address(buffer) % ALIGNMENT:
                    copied += 1
                    copied_bytes += buffer.nbytes
            else:
                buffer = _aligned_copy(tensor.raw_data)
            index.add_buffer(key, buffer)  # holds the buffer (and its mapping) until the index goes
        self.count = len(parameters)
        self.copied_bytes = copied_bytes
        if copied:
            level = logging.WARNING if copied_bytes >= _COPY_WARNING_BYTES else logging.INFO
            log.log(
                level,
                "%d external tensors (%.1f MiB) are not %d-byte aligned in their files: IREE copies them "
                "into memory at load (hal's CompiledModel.save writes aligned data files)",
                copied, copied_bytes / 2**20, ALIGNMENT,
            )
        self.index = index
        self.module = rt.create_io_parameters_module(instance, index.create_provider(scope=SCOPE))


def _address(buffer: memoryview) -> int:
    import numpy as np

    if not buffer.nbytes:
        return 0
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


def _aligned_copy(data: bytes) -> Any:
    """``data`` in a fresh :data:`ALIGNMENT`-aligned array (IREE would copy a Python bytes
    object's unaligned buffer once more)."""
    import numpy as np

    raw = np.empty(len(data) + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    out = raw[start : start + len(data)]
    out[:] = np.frombuffer(data, np.uint8)
    out.flags.writeable = False
    return out
