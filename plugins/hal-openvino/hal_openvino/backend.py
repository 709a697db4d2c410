"""The OpenVINO backend: discovers ``Core().available_devices`` and compiles models for them.

Precision contract: unless the caller passes ``reduced_precision=True``, every model is compiled
with the properties in ``EXACT_PRECISION`` that the device lists: ``INFERENCE_PRECISION_HINT=f32``
(OpenVINO's own default is bf16 on AVX-512 BF16 and AMX CPUs, f16 on GPUs and ARM), execution mode
``ACCURACY``, no dynamic quantization of activations (``DYNAMIC_QUANTIZATION_GROUP_SIZE=0``; the CPU
default of 32 quantizes MatMul inputs to int8 when the weights are int8/int4) and an f32 KV cache
(the CPU default is u8). So a float32 model is computed in float32 and float16/bfloat16 models no less
precisely than they declare. A device that cannot compute in f32 (no ``FP32`` in its
``OPTIMIZATION_CAPABILITIES``, e.g. an NPU) refuses the model unless reduced precision is allowed.
With ``reduced_precision=True`` all of these are left to OpenVINO, which picks bf16 or f16 where
faster; the runner's ``inference_precision`` says what it picked.

The CPU format table was probed on OpenVINO 2026.4 (see ``tests/test_openvino_capabilities.py``, which
checks it on every run); GPU and NPU tables come from ``OPTIMIZATION_CAPABILITIES`` alone.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from attrs import frozen

from hal.plugin import (
    Artifact, Backend, Capabilities, CompileError, CompileOptions, Device, DeviceKind, E8M0Encoding,
    LoweredModel, Maturity, Memory, NumberFormat, OpsetRange, ScaledFormat, Stability, Support, weightless,
)

if TYPE_CHECKING:
    import onnx

    from hal_openvino.runner import OpenVinoRunner

__all__ = [
    "EXACT_PRECISION",
    "OpenVinoBackend",
    "OpenVinoDevice",
    "capabilities_for",
    "exact_precision",
    "first_message",
]

log = logging.getLogger("hal_openvino")

#: OPTIMIZATION_CAPABILITIES entries that mean hardware compute in a format.
_CAPABILITY_FORMATS = {
    "FP32": ("float32",),
    "FP16": ("float16",),
    "BF16": ("bfloat16",),
    "INT8": ("int8", "uint8"),
    "FP64": ("float64",),
}

#: What the OpenVINO CPU plugin does with each format beyond the FP32/INT8 compute it advertises,
#: as probed on OpenVINO 2026.4 (AVX2 and AMX machines): emulated = computed after an up-cast to
#: f32/i32; storage = inputs, outputs, Cast and DequantizeLinear only (or narrowed for compute).
_CPU_NATIVE = ("float32", "int32", "int8", "uint8", "bool")
_CPU_EMULATED = ("float16", "bfloat16", "int16", "uint16", "uint32")
_CPU_STORAGE = (
    # narrowed to 32 bits inside the plugin: see _CPU_INCOMPATIBILITIES
    "int64",
    "uint64",
    "float64",
    # Cast and DequantizeLinear run; elementwise ops refuse them ("unsupported src_prc: f8e4m3")
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e8m0",
    # DequantizeLinear (weight compression) runs; Cast to them is refused by prepare()
    "int4",
    "uint4",
    "float4_e2m1",
)
#: Storage formats the CPU plugin moves (Identity, Reshape, Transpose, Slice, Gather, ... run in
#: them, checked by tests/test_openvino_capabilities.py), so lowering keeps data movement narrow.
#: Not float4_e2m1: Transpose and Gather return wrong float4 values (Identity, Reshape, Slice are
#: right), and a silent wrong answer is worse than a refusal.
_CPU_MOVABLE = ("float8_e4m3fn", "float8_e5m2", "float8_e8m0", "int4", "uint4")
_CPU_INCOMPATIBILITIES = (
    "int64/uint64 tensors are narrowed to int32 inside the CPU plugin: values outside +-2^31 come back wrong",
    "float64 is computed in float32",
    "Attention with left_window_size (sliding window) answers wrong; hal-openvino refuses it",
    "Tile with repeats computed in the graph gives wrong values for some rank-4 inputs; "
    "hal-openvino writes such a Tile as Unsqueeze/Expand/Reshape",
    "fp8 Cast ignores saturate: out-of-range values become NaN (e4m3fn) or inf (e5m2) even with saturate=1",
    "Cast to int4/uint4/float4_e2m1 corrupts memory in the CPU plugin; hal-openvino refuses such models",
    "no FNUZ fp8 types, int2/uint2, complex or string tensors",
    "Concat of float4_e2m1 or float8_e8m0 tensors does not compile (Reorder node error)",
    "Transpose and Gather of float4_e2m1 give wrong values; with Cast to float4 refused, a model "
    "cannot produce float4_e2m1 tensors here (float4 inputs and DequantizeLinear work)",
)
#: Block-scaled DequantizeLinear patterns the CPU runs (dequantized to f32, then computed).
_CPU_SCALED = (
    ("float8_e4m3fn", "float32", (1, 32)),
    ("float8_e4m3fn", "float32", (1, 128)),
    ("float8_e4m3fn", "float8_e8m0", (1, 32)),
    ("float8_e5m2", "float32", (1, 32)),
    ("int8", "float32", (1, 32)),
    ("int4", "float32", (1, 32)),
    ("int4", "float32", (1, 128)),
    ("float4_e2m1", "float8_e8m0", (1, 32)),
)
#: Cast targets that crash the CPU plugin (heap corruption in OpenVINO 2026.4): refused up front.
_CPU_BAD_CAST_TARGETS = frozenset(
    {NumberFormat.INT4.onnx_type, NumberFormat.UINT4.onnx_type, NumberFormat.FLOAT4_E2M1.onnx_type}
)
#: Highest default-domain opset the 2026.4 ONNX frontend was seen to read and run.
_MAX_OPSET = 28
#: Properties set for exact precision (unless ``reduced_precision=True``), each where the device
#: lists it in SUPPORTED_PROPERTIES. Every one is an OpenVINO 2026.4 default that trades accuracy
#: for speed (read from the CPU plugin's config.cpp and checked with ``core.get_property``).
EXACT_PRECISION: dict[str, Any] = {
    # Defaults to bf16 on AVX-512 BF16 / AMX CPUs, f16 on GPUs and ARM CPUs.
    "INFERENCE_PRECISION_HINT": "f32",
    # PERFORMANCE (the default) is what allows the narrower types above and ARM's ACL "fast math".
    "EXECUTION_MODE_HINT": "ACCURACY",
    # 32 on the CPU: MatMul activations are quantized to int8 in groups of 32 on the fly when the
    # weights are compressed (int8/int4 DequantizeLinear), 6e-3 off on VNNI CPUs. 0 turns it off.
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    # u8 on the CPU: the KV cache of stateful attention models is stored quantized.
    "KV_CACHE_PRECISION": "f32",
    "KEY_CACHE_PRECISION": "f32",
    "VALUE_CACHE_PRECISION": "f32",
}


def capabilities_for(kind: DeviceKind, optimization: Sequence[str], memory_bytes: int | None) -> Capabilities:
    """The capability table for one device from its kind and ``OPTIMIZATION_CAPABILITIES``.

    Formats named by ``optimization`` are native. On a CPU the probed table above fills in the
    rest; other device kinds declare only what their properties say, plus int32/bool (emulated)
    and int64 (storage) which every ONNX model with shapes or indices needs.
    """
    native = {fmt for cap in optimization for fmt in _CAPABILITY_FORMATS.get(cap, ())}
    memory = Memory(capacity_bytes=memory_bytes)
    if kind is DeviceKind.CPU:
        native |= set(_CPU_NATIVE)
        return Capabilities.from_levels(
            native=sorted(native),
            emulated=[f for f in _CPU_EMULATED if f not in native],
            storage=[f for f in _CPU_STORAGE if f not in native],
            scaled=[ScaledFormat(e, s, b, Support.EMULATED) for e, s, b in _CPU_SCALED],
            e8m0_encoding=E8M0Encoding.OCP,
            stability=Stability(maturity=Maturity.STABLE, incompatibilities=_CPU_INCOMPATIBILITIES),
            memory=memory,
            opsets=OpsetRange(7, _MAX_OPSET),
            dynamic_shapes=True,
            movable=_CPU_MOVABLE,
        )
    return Capabilities.from_levels(
        native=sorted(native),
        emulated=[f for f in ("int32", "bool") if f not in native],
        storage=["int64"],
        stability=Stability(
            maturity=Maturity.BETA if kind is DeviceKind.GPU else Maturity.EXPERIMENTAL,
            incompatibilities=(
                "format table read from OPTIMIZATION_CAPABILITIES only; not probed on this device type",
            ),
        ),
        memory=memory,
        opsets=OpsetRange(7, _MAX_OPSET),
        dynamic_shapes=kind is not DeviceKind.NPU,  # the NPU plugin compiles static shapes only
    )


@frozen
class OpenVinoDevice:
    """What :meth:`OpenVinoBackend.prepare` needs of a device, kept by discovery as its
    ``Device.handle``: OpenVINO's device name (``CPU``, ``GPU.0``), its
    ``OPTIMIZATION_CAPABILITIES`` and the ``EXACT_PRECISION`` properties it lists."""

    name: str
    optimization: tuple[str, ...] = ()
    precision_properties: frozenset[str] = frozenset()


def exact_precision(device: Device) -> dict[str, Any]:
    """The ``EXACT_PRECISION`` properties ``device`` lists (all it needs to compute as declared).

    The precision hint is always set: every OpenVINO device accepts it, and a device record
    without the list (a device whose SUPPORTED_PROPERTIES could not be read) still gets it.
    """
    handle = device.handle
    listed = handle.precision_properties if isinstance(handle, OpenVinoDevice) else frozenset()
    names = {"INFERENCE_PRECISION_HINT", *listed}
    return {key: value for key, value in EXACT_PRECISION.items() if key in names}


def first_message(exc: BaseException) -> str:
    """The runtime's message without OpenVINO's ``Exception from file:line`` location lines."""
    lines = [line.strip() for line in str(exc).splitlines()]
    useful = [
        line
        for line in lines
        if line and not line.startswith(("Exception from ", "Check '", "Summary:", "To facilitate"))
    ]
    if not useful:
        return type(exc).__name__
    detail = [line for line in useful[1:] if line.startswith("-- ")]
    return " ".join([useful[0], *detail])


def _kind(name: str) -> DeviceKind | None:
    base = name.split(".", 1)[0].upper()
    return {"CPU": DeviceKind.CPU, "GPU": DeviceKind.GPU, "NPU": DeviceKind.NPU}.get(base)


def _vendor(kind: DeviceKind, full_name: str) -> str:
    lowered = full_name.lower()
    for vendor in ("Intel", "AMD", "ARM", "Apple"):
        if vendor.lower() in lowered:
            return vendor
    return "Intel" if kind is not DeviceKind.CPU else "unknown"


def _cpu_refusal(proto: onnx.ModelProto) -> str | None:
    """Why OpenVINO's CPU plugin must not get ``proto``, naming the node, or None. One walk over
    every graph (subgraphs included) for what it is known to get wrong:

    - Cast to int4/uint4/float4_e2m1 corrupts memory;
    - Attention with a sliding window (``left_window_size`` >= 0) answers wrong (ONNX's
      test_attention_local_window_* cases: 0.16 off for ``attn_mask=[1, 1, 1, 1, 0, 0]``, right
      only when the first key is masked out; 0.3 off with no mask on seeded inputs).
    """
    from hal_openvino.rewrite import graphs

    for graph in graphs(proto.graph):
        for index, node in enumerate(graph.node):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Cast":
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if to in _CPU_BAD_CAST_TARGETS:
                    return (
                        f"cannot compile node {node.name or f'Cast#{index}'!r}: Cast to {NumberFormat.from_onnx(to).value} "
                        "corrupts memory in OpenVINO's CPU plugin; use DequantizeLinear/QuantizeLinear or another device"
                    )
            elif node.op_type == "Attention":
                if next((a.i for a in node.attribute if a.name == "left_window_size"), -1) >= 0:
                    return (
                        f"cannot compile node {node.name or f'Attention#{index}'!r}: OpenVINO's CPU plugin answers "
                        "Attention with left_window_size (sliding-window attention) wrong; place the model on another device"
                    )
    return None


class OpenVinoBackend(Backend):
    """OpenVINO's own runtime (not onnxruntime's OpenVINO execution provider).

    ``CompileOptions.extra`` keys: ``num_threads`` (INFERENCE_NUM_THREADS), ``performance_hint``
    (PERFORMANCE_HINT, default ``LATENCY``: one request in flight per executable), ``config``
    (a dict of further OpenVINO properties, passed to ``compile_model`` as is; it may not change
    the ``EXACT_PRECISION`` properties unless ``reduced_precision`` is True).

    OpenVINO's model cache (``CACHE_DIR``) is the core's cache directory for this backend.
    ``compile_count`` and ``cache_hits`` count what :meth:`prepare` did, as OpenVINO reports it
    (``LOADED_FROM_CACHE``): a hit loads the compiled blob and skips reading the model.
    """

    name = "openvino"

    def __init__(self) -> None:
        self._core: Any = None
        self.compile_count = 0
        self.cache_hits = 0
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        import openvino

        return str(openvino.get_version())

    def core(self) -> Any:
        """The shared ``openvino.Core`` (created on first use; it is thread-safe)."""
        if self._core is None:
            import openvino

            self._core = openvino.Core()
        return self._core

    def discover(self) -> list[Device]:
        try:
            import openvino

            core = self.core()
            names = list(core.available_devices)
        except Exception as exc:  # noqa: BLE001 - an ImportError, or a runtime that cannot start
            reason = f"OpenVINO does not start ({type(exc).__name__}: {first_message(exc)}); pip install openvino"
            return [self.unavailable(reason, vendor="Intel", kind=DeviceKind.CPU, name="OpenVINO", local_id="CPU")]
        devices = []
        for ov_name in names:
            kind = _kind(ov_name)
            if kind is None:  # a virtual or plugin device the HAL has no kind for
                continue
            props = self._properties(core, ov_name)
            optimization = tuple(str(c) for c in props.get("OPTIMIZATION_CAPABILITIES", ()))
            full_name = str(props.get("FULL_DEVICE_NAME") or ov_name)
            memory = props.get("GPU_DEVICE_TOTAL_MEM_SIZE")
            memory_bytes = int(memory) if memory else (Memory.host().capacity_bytes if kind is DeviceKind.CPU else None)
            precision = frozenset(k for k in EXACT_PRECISION if k in props["SUPPORTED_PROPERTIES"])
            devices.append(
                Device(
                    id=f"{self.name}:{ov_name}",
                    backend=self.name,
                    vendor=_vendor(kind, full_name),
                    name=full_name,
                    kind=kind,
                    capabilities=capabilities_for(kind, optimization, memory_bytes),
                    details={
                        "openvino": openvino.get_version(),
                        "openvino_device": ov_name,
                        "optimization_capabilities": ",".join(optimization),
                        "architecture": str(props.get("DEVICE_ARCHITECTURE", "")),
                        "precision_properties": ",".join(k for k in EXACT_PRECISION if k in precision),
                    },
                    handle=OpenVinoDevice(ov_name, optimization, precision),
                )
            )
        if not devices:
            reason = f"OpenVINO {openvino.get_version()} lists no CPU, GPU or NPU ({names}); check its plugins"
            return [self.unavailable(reason, vendor="Intel", kind=DeviceKind.CPU, name="OpenVINO", local_id="CPU")]
        return devices

    @staticmethod
    def _properties(core: Any, ov_name: str) -> dict[str, Any]:
        # Some properties are listed as supported but fail to convert to Python: skip those.
        wanted = ("FULL_DEVICE_NAME", "OPTIMIZATION_CAPABILITIES", "DEVICE_ARCHITECTURE", "GPU_DEVICE_TOTAL_MEM_SIZE")
        try:
            supported = set(core.get_property(ov_name, "SUPPORTED_PROPERTIES"))
        except Exception:  # noqa: BLE001 - a device without the list still gets a record
            supported = set(wanted)
        props: dict[str, Any] = {"SUPPORTED_PROPERTIES": supported}
        for key in wanted:
            if key in supported:
                try:
                    props[key] = core.get_property(ov_name, key)
                except Exception:  # noqa: BLE001, S112
                    continue
        return props

    def compile_config(self, device: Device, options: CompileOptions) -> dict[str, Any]:
        """The properties passed to ``compile_model`` (see the class docstring and README)."""
        config: dict[str, Any] = {"PERFORMANCE_HINT": str(options.extra.get("performance_hint", "LATENCY"))}
        if not options.reduced_precision:
            optimization = self.handle_of(device, OpenVinoDevice).optimization
            if "FP32" not in optimization:
                msg = (
                    f"{device.id} cannot compute in float32 (OPTIMIZATION_CAPABILITIES: {','.join(optimization)}); "
                    "pass reduced_precision=True to let OpenVINO compute in a narrower type"
                )
                raise CompileError(msg)
            config.update(exact_precision(device))
        if options.cache_dir is not None:
            config["CACHE_DIR"] = str(options.cache_dir)
        threads = options.extra.get("num_threads")
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        extra_config = dict(options.extra.get("config") or {})
        if not options.reduced_precision:
            for key, value in extra_config.items():
                if key in EXACT_PRECISION and str(value).upper() != str(EXACT_PRECISION[key]).upper():
                    msg = (
                        f"config sets {key}={value} for {device.id} without reduced_precision=True; "
                        "the model's declared precision is kept unless reduced precision is allowed"
                    )
                    raise CompileError(msg)
        config.update(extra_config)
        return config

    def _compile_external(self, core: Any, model: LoweredModel, device: Device, ov_name: str, config: dict[str, Any]) -> Any:
        """A model with external data, without OpenVINO opening any path.

        OpenVINO reads external data only from a path, and resolves it to its canonical name
        before opening it: a link to the file the HAL checked leads back to the model's directory
        (where the file may have been swapped since), so none is safe to hand it. Instead the
        graph is read with each external weight as a parameter of its type and shape, and each
        such parameter is then replaced by a constant over the HAL's mapping of the checked file
        (``Weights.array(private=True)``: shared, not copied; OpenVINO's shared tensors need
        writable memory, which a copy-on-write mapping gives without touching the file). External
        tensors this cannot take (inside subgraphs, sub-byte or ml_dtypes types) go into the
        graph as bytes. Not kept in OpenVINO's model cache."""
        import openvino

        weights = model.weights
        assert weights is not None
        graph, as_parameters = _weights_as_inputs(model)
        try:
            ov_model = core.read_model(graph.SerializeToString(), b"")
        except Exception as exc:
            msg = f"OpenVINO cannot read the model for {device.id}: {first_message(exc)}"
            raise CompileError(msg) from exc
        try:
            for parameter in list(ov_model.get_parameters()):
                name = next((n for n in parameter.output(0).get_names() if n in as_parameters), None)
                if name is None:
                    continue
                array = weights.array(as_parameters[name], private=True)
                constant = openvino.op.Constant(openvino.Tensor(array, shared_memory=True))
                for target in list(parameter.output(0).get_target_inputs()):
                    target.replace_source_output(constant.output(0))
                ov_model.remove_parameter(parameter)
            ov_model.validate_nodes_and_infer_types()
            return core.compile_model(ov_model, ov_name, config)
        except Exception as exc:
            msg = f"OpenVINO cannot compile the model for {device.id}: {first_message(exc)}"
            raise CompileError(msg) from exc

    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> OpenVinoRunner:
        from hal_openvino.runner import OpenVinoRunner

        ov_name = self.handle_of(device, OpenVinoDevice).name
        if device.kind is DeviceKind.CPU:
            refusal = _cpu_refusal(model.proto)
            if refusal:
                msg = f"{device.id} {refusal}"
                raise CompileError(msg)
            model = _rewritten(model)
        config = self.compile_config(device, options)
        core = self.core()
        compiled = None
        if model.weights is not None:
            compiled = self._compile_external(core, model, device, ov_name, config)
        path = _model_file(model, options) if compiled is None else None
        if path is not None:
            try:
                compiled = core.compile_model(str(path), ov_name, config)
            except Exception as exc:  # noqa: BLE001 - the in-memory route below says why, precisely
                log.debug("compiling %s from %s failed (%s); reading it from memory", device.id, path, exc)
                path.unlink(missing_ok=True)  # a damaged file is written again next time
        if compiled is None:
            try:
                ov_model = core.read_model(model.proto.SerializeToString(), b"")
            except Exception as exc:
                msg = f"OpenVINO cannot read the model for {device.id}: {first_message(exc)}"
                raise CompileError(msg) from exc
            try:
                compiled = core.compile_model(ov_model, ov_name, config)
            except Exception as exc:
                msg = f"OpenVINO cannot compile the model for {device.id}: {first_message(exc)}"
                raise CompileError(msg) from exc
        hit = _loaded_from_cache(compiled)
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.compile_count += 1
        runner = OpenVinoRunner(compiled, model)
        if options.reduced_precision:
            # Allowed, but never silent: say what OpenVINO chose.
            log.info("%s computes floating point in %s (reduced_precision=True)", device.id, runner.inference_precision)
        return runner


def _rewritten(model: LoweredModel) -> LoweredModel:
    """``model`` with what the CPU plugin computes wrong rewritten (:mod:`hal_openvino.rewrite`),
    its digest that of the new graph (artifacts are named and checked by it)."""
    from hal_openvino.rewrite import tile_by_expand

    proto, tiles = tile_by_expand(model.proto)
    if not tiles:
        return model
    log.debug("%d Tile node(s) with computed repeats written as Expand/Reshape for OpenVINO's CPU plugin", tiles)
    data = proto.SerializeToString(deterministic=True)
    digest = hashlib.sha256(data if model.weights is None else model.digest.encode() + data).hexdigest()
    return attrs.evolve(model, proto=proto, digest=digest)


#: Element types whose numpy arrays OpenVINO's Tensor takes as they are.
_SHAREABLE = frozenset({
    NumberFormat.FLOAT32, NumberFormat.FLOAT16, NumberFormat.FLOAT64, NumberFormat.INT8, NumberFormat.UINT8,
    NumberFormat.INT16, NumberFormat.UINT16, NumberFormat.INT32, NumberFormat.UINT32, NumberFormat.INT64,
    NumberFormat.UINT64, NumberFormat.BOOL,
})


def _weights_as_inputs(model: LoweredModel) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model.proto`` in which each external main-graph initializer of a type numpy
    holds is a graph input of its type and shape instead (``{name: tensor}`` returned with it),
    and every other external tensor carries its bytes. The weights themselves are not copied."""
    import onnx

    weights = model.weights
    assert weights is not None
    as_parameters = {
        t.name: t for t in model.proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL and NumberFormat.from_onnx(t.data_type) in _SHAREABLE
    }
    graph = weightless(model.proto, lambda t: t.name not in as_parameters)
    # whatever is still external (subgraphs, other types) gets its bytes
    return weights.inline(graph), as_parameters


def _loaded_from_cache(compiled: Any) -> bool:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:  # noqa: BLE001 - a runtime without the property loaded nothing from a cache
        return False


def _model_file(model: LoweredModel, options: CompileOptions) -> Path | None:
    """The model as ``<cache_dir>/models/<sha256>.onnx`` (the core's digest), checked or written,
    or None without a cache directory or a disk to write it on.

    Given a path, OpenVINO keys its model cache by the path and the compile properties, and keeps
    the file's size and modification time (in whole seconds) in the blob, so a warm compile loads
    the blob without reading, converting or hashing the model (given an ``ov.Model``, it hashes the
    whole graph and its weights first). The name is the model's sha256, and the file is checked
    against it before OpenVINO gets the path (:class:`hal.cache.Artifact`; a file unchanged since it
    was checked is not hashed again): a changed byte, a truncated file or
    another model's file under this name is removed with a WARNING (this compile reads the model
    from memory; the next writes the file again).
    """
    if not options.cache_dir:
        return None
    cache_dir = Path(options.cache_dir)
    artifact = Artifact(cache_dir / "models" / f"{model.digest}.onnx", model.digest, sha256=model.digest)
    if not artifact.path.is_file():
        if not artifact.write(model.proto.SerializeToString(deterministic=True)):
            return None  # a full or read-only disk: compile from memory, uncached
        return artifact.path
    if artifact.check():
        return artifact.path
    # check() removed a damaged file: this compile reads the model from memory and the next one
    # writes the file again. OpenVINO may hold a blob compiled from the damaged file, and a rewrite
    # of the same size within the same second would match that blob's size and time: drop
    # OpenVINO's blobs (each is compiled again on its next use).
    _drop_blobs(cache_dir)
    return None


def _drop_blobs(cache_dir: Path) -> None:
    dropped = 0
    for blob in cache_dir.glob("*.blob"):
        try:
            blob.unlink()
            dropped += 1
        except OSError as exc:  # already gone (another process), or a read-only cache
            log.debug("cannot remove OpenVINO blob %s: %s", blob, exc)
    log.info("removed %d OpenVINO blob(s) from %s after a damaged model file", dropped, cache_dir)
