"""A base for backends built on an onnxruntime distribution (CPU, CUDA, TensorRT, CANN, ...).

Subclasses say which execution providers to ask for; this module creates the session, refuses a
session that silently landed on another provider, and moves ml_dtypes tensors (bfloat16, FP8,
int4, ...) in and out by their raw bits, which onnxruntime's Python API does not accept directly.

onnxruntime-gpu and onnxruntime-cann list their execution providers whether or not CUDA or the
CANN toolkit is installed, and when creating the provider fails they fall back to the CPU. A
subclass that names its providers' libraries (:attr:`OrtBackend.provider_libraries`) and turns
:attr:`OrtBackend.cpu_fallback` off gets the guard: :meth:`OrtBackend.runtime_problem` says at
discovery why a device cannot run (the loader's own message), sessions forbid CPU placement, and a
failed prepare names the library that did not load.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
from attrs import evolve

from hal._paths import cache_root, cache_skipped
from hal.backend import Backend, CompileOptions, Device
from hal.cache import Artifact, atomic_write, cache_key
from hal.capabilities import (
    Capabilities,
    FormatTable,
    NumberFormat,
    Support,
    ValueKind,
)
from hal.errors import CompileError, UnavailableDeviceError, first_line
from hal.tensors import bits_view, from_bits, pack

if TYPE_CHECKING:
    from hal.lowering import LoweredModel

__all__ = [
    "ORT_IO_KINDS", "OrtBackend", "OrtRunner", "RuntimeLimits", "fit_capabilities", "probe_runtime_limits",
    "runtime_limits",
]

log = logging.getLogger("hal.backends.onnxruntime")

#: Formats onnxruntime's Python API cannot take or return as numpy arrays.
RAW_BIT_FORMATS = frozenset(
    {
        NumberFormat.BFLOAT16,
        NumberFormat.FLOAT8_E4M3FN,
        NumberFormat.FLOAT8_E4M3FNUZ,
        NumberFormat.FLOAT8_E5M2,
        NumberFormat.FLOAT8_E5M2FNUZ,
        NumberFormat.FLOAT8_E8M0,
        NumberFormat.INT4,
        NumberFormat.UINT4,
        NumberFormat.FLOAT4_E2M1,
        NumberFormat.INT2,
        NumberFormat.UINT2,
    }
)


_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\)")
_UNKNOWN_OP = re.compile(r"(?:([\w.]+):)?(\w+)\(-?\d+\) is not a registered function/op")


def _missing_kernels(exc: BaseException) -> tuple[str, ...]:
    """Operators onnxruntime said it has no kernel for, as ``Op-opset``."""
    text = str(exc)
    found = [f"{op}-{v}" for op, v in _MISSING_KERNEL.findall(text)]
    found += [f"{domain}.{op}" if domain else op for domain, op in _UNKNOWN_OP.findall(text)]
    return tuple(dict.fromkeys(found))


#: External tensors smaller than this go into the graph given to onnxruntime: its shape inference
#: cannot read a Reshape's shape (or any value it needs at load) from external data, even from the
#: model's own file ("Cannot parse data from external tensors"). onnx writes tensors under 1 KiB
#: inside the model by default (``size_threshold=1024``); a model that put them outside still runs.
INLINE_BELOW = 1024


#: ``to("ort:cpu", graph_optimization=...)``: "all" (onnxruntime's every graph optimization;
#: external weights are copied into the session, whose optimizers read them), "disabled" (no graph
#: optimization: slower kernels, external weights used in place, no copy), or "auto" (default:
#: "disabled" for external weights of :data:`IN_PLACE_FROM` bytes or more, else "all").
GRAPH_OPTIMIZATION = ("auto", "all", "disabled")
#: From this many bytes of external weights, "auto" keeps them in place: a copy would double the
#: memory of a model that is large because of them (3 GiB model: peak 2.07x the weights and 2.4x
#: onnxruntime's own time copied, 0.70x and 0.82x in place; BENCHMARKS.md "Large models").
IN_PLACE_FROM = 2**31


def _optimizations_off(options: CompileOptions) -> bool:
    value = options.extra.get("graph_optimization", "auto")
    if value not in GRAPH_OPTIMIZATION:
        msg = f"graph_optimization={value!r} is not one of {', '.join(map(repr, GRAPH_OPTIMIZATION))}"
        raise CompileError(msg)
    return value == "disabled"


def _settled(options: CompileOptions, model: LoweredModel) -> CompileOptions:
    """``options`` with "auto" resolved for ``model`` (see :data:`GRAPH_OPTIMIZATION`)."""
    from attrs import evolve

    if options.extra.get("graph_optimization", "auto") != "auto":
        return options
    large = model.weights is not None and model.weights.nbytes >= IN_PLACE_FROM
    return evolve(options, extra={**options.extra, "graph_optimization": "disabled" if large else "all"})


def external_initializers(model: LoweredModel) -> tuple[Any, list[tuple[str, Any]]]:
    """The graph for onnxruntime, and its external initializers as OrtValues over the mapped
    bytes: onnxruntime never opens the file the model names (see :data:`GRAPH_OPTIMIZATION` for
    whether it copies them). External tensors it cannot take that way (inside
    subgraphs or attributes, sub-byte types, strings, and those under :data:`INLINE_BELOW` bytes)
    are copied into the graph; the rest of the model stays as small as its graph."""
    import onnxruntime as ort

    from hal.weights import external_tensors

    weights = model.weights
    assert weights is not None
    proto = model.proto
    values: list[tuple[str, Any]] = []
    taken: set[str] = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location != tensor.EXTERNAL:
            continue
        fmt = NumberFormat.from_onnx(tensor.data_type)
        if fmt.bits < 8 or fmt is NumberFormat.STRING:
            continue
        array = weights.array(tensor)
        if array.nbytes < INLINE_BELOW:
            continue  # copied into the graph, where onnxruntime's shape inference can read it
        if fmt in RAW_BIT_FORMATS or array.dtype.kind not in "biufc":
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits_view(array), tensor.data_type)
        else:
            value = ort.OrtValue.ortvalue_from_numpy(array)
        values.append((tensor.name, value))
        taken.add(tensor.name)
    if any(t.name not in taken for t in external_tensors(proto)):
        proto = weights.inline(proto, keep_external=taken)
    return proto, values


@contextlib.contextmanager
def _placeholder_directory(proto: Any, weights: Any) -> Iterator[Path]:
    """A private directory holding ``proto`` as ``model.onnx`` and, for each external data file
    it names, an empty sparse file of that size (no disk space).

    onnxruntime checks that every external data location exists inside the model's directory
    (relative to the working directory for a model given as bytes), even for initializers
    ``add_external_initializers`` replaces, and refuses a symbolic link that leads outside it. The
    placeholders satisfy the check and are never read: every external initializer is replaced
    (checked by the tests: the answers are the weights', not zeros). Removed on exit; the
    session has read the model by then.
    """
    import onnx

    from hal.weights import external_tensors

    with tempfile.TemporaryDirectory(prefix="hal-ort-") as tmp:
        root = Path(tmp)
        for tensor in external_tensors(proto):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            placeholder = root / weights.normal_location(location)
            if not placeholder.exists():
                placeholder.parent.mkdir(parents=True, exist_ok=True)
                with open(placeholder, "wb") as f:
                    f.truncate(weights.file_size(location))
        path = root / "model.onnx"
        onnx.save_model(proto, str(path))
        yield path


#: The kinds of graph input and output :class:`OrtRunner` passes besides tensors: onnxruntime's
#: ``run`` takes a list of arrays for a sequence and None for an absent optional, and returns them
#: alike. Declare them in ``Capabilities.io_kinds`` of a backend whose runner is an OrtRunner.
ORT_IO_KINDS = frozenset({ValueKind.SEQUENCE, ValueKind.OPTIONAL, ValueKind.OPTIONAL_SEQUENCE})


class OrtRunner:
    """Runs one onnxruntime session. Plain numpy feeds take the direct path; ml_dtypes feeds and
    outputs go through OrtValues holding their raw bits.

    Sequences and optionals take the direct path as lists and None (onnxruntime converts each
    array). Raises :class:`~hal.errors.CompileError` for a model that has them together with a
    format passed by its raw bits: OrtValues hold no sequences, and numpy arrays no bfloat16.
    """

    def __init__(self, session: Any, model: LoweredModel) -> None:
        import onnxruntime as ort

        self.session = session
        self.keep: Any = None  # what the session's buffers live in (external initializers)
        self._ort = ort
        self._raw_in = {i.name: i.format for i in model.inputs if i.format in RAW_BIT_FORMATS}
        self._raw_out = {o.name: o.format for o in model.outputs if o.format in RAW_BIT_FORMATS}
        self._run_options = ort.RunOptions()
        # The binding's own run skips InferenceSession.run's Python-side checks, which the core
        # has already made; about 4 us of the 9 us a one-Add model costs per call here.
        inner = getattr(session, "_sess", None)
        self._direct = inner.run if inner is not None and hasattr(inner, "run") else None
        containers = [v.name for v in (*model.inputs, *model.outputs) if v.kind is not ValueKind.TENSOR]
        if containers:
            raw = sorted({f.value for f in (*self._raw_in.values(), *self._raw_out.values())})
            if raw:
                msg = (
                    f"onnxruntime takes sequences and optionals ({', '.join(containers)}) only as numpy arrays, "
                    f"which cannot hold {', '.join(raw)}, and the OrtValues that carry those hold no sequences: "
                    "this model cannot pass through its Python API; cast those inputs and outputs to a format "
                    "numpy holds"
                )
                raise CompileError(msg)
            if self._direct is None:
                self.run = self._run_public  # type: ignore[method-assign]
        elif self._raw_in or self._raw_out or self._direct is None:
            self.run = self._run_raw  # type: ignore[method-assign]

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        return self._direct(output_names, feeds, self._run_options)  # type: ignore[misc]

    def _run_public(self, feeds: dict[str, Any], output_names: Sequence[str]) -> list[Any]:
        return self.session.run(list(output_names), feeds, self._run_options)  # type: ignore[no-any-return]

    def _run_raw(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        OrtValue = self._ort.OrtValue
        values = {}
        keep = []  # OrtValues made from numpy memory must not outlive it
        for name, array in feeds.items():
            fmt = self._raw_in.get(name)
            if fmt is None:
                values[name] = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            elif fmt.bits < 8:
                packed = pack(array, fmt)
                value = OrtValue.ortvalue_from_shape_and_type(list(array.shape), fmt.onnx_type, "cpu", 0)
                if packed.size:
                    ctypes.memmove(value.data_ptr(), packed.ctypes.data, packed.nbytes)
                values[name] = value
            else:
                bits = bits_view(array)
                keep.append(bits)
                values[name] = OrtValue.ortvalue_from_numpy_with_onnx_type(bits, fmt.onnx_type)
        results = self.session.run_with_ort_values(list(output_names), values, self._run_options)
        outputs = []
        for name, value in zip(output_names, results):
            fmt = self._raw_out.get(name)
            if fmt is None:
                outputs.append(value.numpy())
                continue
            shape = tuple(value.shape())
            size = value.tensor_size_in_bytes()
            raw = np.empty(size, np.uint8)
            if size:
                ctypes.memmove(raw.ctypes.data, value.data_ptr(), size)
            outputs.append(from_bits(raw, fmt, shape))
        return outputs


class RuntimeLimits(NamedTuple):
    """What the installed onnxruntime's model loader reads, found by asking it (see
    :func:`runtime_limits`)."""

    version: str
    max_ir_version: int
    max_opset: int
    float8_e8m0: bool  # Cast to/from FLOAT8E8M0 has CPU kernels (onnxruntime >= 1.25)


_IR_REFUSED = re.compile(r"max supported IR version: (\d+)")


def _probe_model(ir: int, opset: int, to: int | None = None) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    if to is None:
        node, y = helper.make_node("Identity", ["x"], ["y"]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    else:
        node, y = helper.make_node("Cast", ["x"], ["y"], to=to), helper.make_tensor_value_info("y", to, [1])
    graph = helper.make_graph([node], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir).SerializeToString()


def _loads(data: bytes) -> str | None:
    """None when onnxruntime's CPU provider creates a session for ``data``, else its message."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any refusal is the answer we are probing for
        return str(exc)
    return None


@functools.cache
def runtime_limits() -> RuntimeLimits:
    """The newest IR version and opset the installed onnxruntime loads, and whether it has the
    float8_e8m0 Cast kernels. onnxruntime-gpu 1.31 and onnxruntime-cann 1.24 read at most IR 13,
    which onnx 1.23's ``make_model`` exceeds; 1.24 has no float8_e8m0 kernels.

    Found by creating a few one-node sessions (:func:`probe_runtime_limits`), which needs onnx
    imported (about 0.3 s); the answer is kept in the HAL cache directory, keyed by the
    onnxruntime and onnx versions and onnxruntime's location, so later processes read a file."""
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime as ort

    try:
        onnx_version = version("onnx")
    except PackageNotFoundError:
        onnx_version = "unknown"
    key = cache_key(onnxruntime=str(ort.__version__), path=str(ort.__file__), onnx=onnx_version, probe=1)
    path = cache_root() / "runtime" / f"onnxruntime-{key[:24]}.json"
    try:
        data = json.loads(path.read_text())
        limits = RuntimeLimits(**data)
        if limits.version == ort.__version__ and all(
            isinstance(v, int) for v in (limits.max_ir_version, limits.max_opset)
        ):
            return limits
    except (OSError, ValueError, TypeError):  # absent or damaged: probe again and rewrite it
        pass
    limits = probe_runtime_limits()
    try:
        atomic_write(path, json.dumps(limits._asdict()).encode())
    except OSError as exc:  # a read-only or full disk: probe again in the next process
        cache_skipped(path.parent, exc)
    return limits


def probe_runtime_limits() -> RuntimeLimits:
    """Ask the installed onnxruntime what it loads (see :func:`runtime_limits`), uncached."""
    import onnx
    import onnxruntime as ort

    ir = onnx.IR_VERSION
    refused = _loads(_probe_model(ir, 13))
    while refused is not None and ir > 3:
        said = _IR_REFUSED.search(refused)
        ir = int(said.group(1)) if said and int(said.group(1)) < ir else ir - 1
        refused = _loads(_probe_model(ir, 13))
    opset = onnx.defs.onnx_opset_version()
    while opset > 7 and _loads(_probe_model(ir, opset)) is not None:
        opset -= 1
    e8m0 = ir >= 12 and opset >= 25 and _loads(_probe_model(ir, 25, onnx.TensorProto.FLOAT8E8M0)) is None
    return RuntimeLimits(str(ort.__version__), ir, opset, e8m0)


def fit_capabilities(caps: Capabilities, *, cpu_kernels: bool = True) -> Capabilities:
    """``caps`` narrowed to what the installed onnxruntime reads: the opset range capped at its
    newest opset (and ``max_loadable`` raised to it when it reads newer opsets than the table
    prefers) and its newest IR version. With ``cpu_kernels`` (a table for the CPU execution
    provider), float8_e8m0 is also dropped when the CPU provider has no kernels for it; other
    providers' kernels are their plugin's business. Every onnxruntime-based backend applies this
    to its declared table."""
    limits = runtime_limits()
    opsets = caps.opsets
    top = max(opsets.min, min(opsets.max, limits.max_opset))
    fitted = evolve(
        opsets,
        max=top,
        max_ir_version=limits.max_ir_version
        if opsets.max_ir_version is None
        else min(opsets.max_ir_version, limits.max_ir_version),
        max_loadable=limits.max_opset if limits.max_opset > top else None,
    )
    changes: dict[str, Any] = {"opsets": fitted}
    if cpu_kernels and not limits.float8_e8m0 and caps.formats[NumberFormat.FLOAT8_E8M0] is not Support.NONE:
        levels = dict(caps.formats)
        levels[NumberFormat.FLOAT8_E8M0] = Support.NONE
        changes["formats"] = FormatTable(levels)
    return evolve(caps, **changes)


class OrtBackend(Backend):
    """Base for onnxruntime-based backends. Subclasses implement :meth:`discover` and
    :meth:`providers`; :meth:`prepare` is shared.

    A backend for an accelerator sets :attr:`provider_libraries`, :attr:`install_advice` and
    ``cpu_fallback = False``, and calls :meth:`runtime_problem` in its :meth:`discover`: then a
    device is available only where its provider really loads, and no session of it ever runs a
    node on the CPU."""

    #: Name of the onnxruntime distribution this backend needs, for error messages.
    distribution = "onnxruntime"
    #: Sessions created from a cached optimized model, in this process (tests read it).
    cache_hits = 0
    #: Execution provider -> its library in onnxruntime's ``capi`` folder, loaded with ctypes to
    #: learn why the provider cannot be created (onnxruntime itself only logs it).
    provider_libraries: ClassVar[Mapping[str, str]] = {}
    #: What to do when a provider library does not load (appended to the loader's message).
    install_advice = ""
    #: False: sessions set ``session.disable_cpu_ep_fallback`` (and :meth:`providers` must not
    #: name CPUExecutionProvider), so no node is placed on the CPU behind the caller's back.
    cpu_fallback = True

    @property
    def version(self) -> str:
        import onnxruntime

        return str(onnxruntime.__version__)

    def provider_problem(self, provider: str, install: str | None = None) -> tuple[str | None, str]:
        """Why the installed onnxruntime cannot offer ``provider`` (None when it lists it) and
        its version ("" when it does not import). ``install`` is the pip advice for an import
        failure (default: :attr:`distribution`). Listing a provider does not prove its libraries
        load: plugins check those themselves."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return f"onnxruntime does not import ({exc}); pip install {install or self.distribution}", ""
        version = str(ort.__version__)
        available = ort.get_available_providers()
        if provider not in available:
            return (
                f"this onnxruntime build ({version}, providers {available}) has no {provider}; "
                f"uninstall onnxruntime and install {self.distribution} (they share the module)"
            ), version
        return None, version

    def library_problem(self, provider: str) -> str | None:
        """Why ``provider``'s library (:attr:`provider_libraries`) cannot load here, with the
        loader's message (``libcublasLt.so.13: cannot open shared object file``); None when it
        loads, when onnxruntime is not installed, or for a provider without a listed library."""
        library = self.provider_libraries.get(provider)
        spec = importlib.util.find_spec("onnxruntime")
        if library is None or spec is None or spec.origin is None:
            return None
        path = os.path.join(os.path.dirname(spec.origin), "capi", library)
        if not os.path.exists(path):
            return (
                f"{provider} needs {library}, which this onnxruntime does not ship; "
                f"uninstall onnxruntime and install {self.distribution}"
            )
        try:
            ctypes.CDLL(path)
        except OSError as exc:
            return f"{provider} cannot load: {exc}"
        return None

    def runtime_problem(self, provider: str, install: str | None = None) -> tuple[str | None, str]:
        """Why this machine cannot run ``provider`` (None if it can) and onnxruntime's version
        ("" when it does not import): :meth:`provider_problem`, then :meth:`library_problem`
        followed by :attr:`install_advice`. What :meth:`discover` puts in a device's ``reason``."""
        problem, version = self.provider_problem(provider, install)
        if problem is None:
            missing = self.library_problem(provider)
            problem = f"{missing}; {self.install_advice}" if missing else None
        return problem, version

    def providers(self, device: Device, options: CompileOptions) -> list[tuple[str, dict[str, Any]]]:
        """Execution providers, most preferred first, with their options."""
        return [("CPUExecutionProvider", {})]

    def session_options(self, device: Device, options: CompileOptions) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        # onnxruntime prints its warnings and errors to stderr in colour (a failed run logs the
        # error it also raises); the HAL raises and logs its own, so its sessions keep quiet.
        so.log_severity_level = 4
        if not self.cpu_fallback:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if not options.reduced_precision:
            # onnxruntime fuses DequantizeLinear(int4/int8 weights) + MatMul into MatMulNBits and,
            # by default (accuracy level 4), quantizes the activations to int8 on the fly: 0.6% off
            # the float32 answer. Level 1 computes in float32, as the model says.
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        for key, value in dict(options.extra.get("session_config", {})).items():
            so.add_session_config_entry(str(key), str(value))
        threads = options.extra.get("intra_op_num_threads")
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        if _optimizations_off(options):
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return so

    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> OrtRunner:
        if not device.available:
            msg = f"device {device.id} is unavailable: {device.reason}"
            raise UnavailableDeviceError(msg)
        _optimizations_off(options)  # an unknown setting is named before anything is built
        options = _settled(options, model)
        providers = self.providers(device, options)  # a device this backend cannot address fails here
        try:
            return self._prepare(model, device, options, providers)
        except CompileError as exc:
            # onnxruntime's own message ("nodes assigned to the default CPU EP ...") hides the
            # cause, which it only logs: name the library the provider could not load.
            causes = [p for p in dict.fromkeys(self.library_problem(name) for name, _ in providers) if p]
            if not causes:
                raise
            msg = f"{exc}; {'; '.join(causes)}; {self.install_advice}"
            enriched = CompileError(msg)
            enriched.__dict__.update(exc.__dict__)  # keep what the core recorded (refused operators)
            raise enriched from exc

    def _prepare(
        self, model: LoweredModel, device: Device, options: CompileOptions, providers: list[tuple[str, dict[str, Any]]]
    ) -> OrtRunner:
        import onnxruntime as ort

        wanted = providers[0][0]
        if wanted not in ort.get_available_providers():
            msg = (
                f"{wanted} is not in this onnxruntime build ({ort.get_available_providers()}); "
                f"install {self.distribution} for device {device.id}"
            )
            raise CompileError(msg)
        if model.weights is not None:
            # External data: onnxruntime takes the mapped bytes as they are (no copy, no path of
            # the model's opened again); its optimized-model cache would write them inline.
            proto, initializers = external_initializers(model)
            with _placeholder_directory(proto, model.weights) as path:
                session = self._new_session(str(path), None, device, options, providers, initializers)
            runner = self._checked_runner(session, model, device, wanted)
            runner.keep = (initializers, model.weights)  # the buffers must outlive the session
            return runner
        # The core's digest names the cache entry, so a hit neither serializes nor hashes the model.
        artifact = self._cache_artifact(model, device, options, providers)
        session = self._cached_session(artifact, device, options, providers)
        if session is None:
            session = self._new_session(model.proto.SerializeToString(), artifact, device, options, providers)
        return self._checked_runner(session, model, device, wanted)

    def _checked_runner(self, session: Any, model: LoweredModel, device: Device, wanted: str) -> OrtRunner:
        used = session.get_providers()
        if not used or used[0] != wanted:
            msg = (
                f"onnxruntime was asked for {wanted} on {device.id} but created a session on {used}; "
                "refusing to run on a device that was not asked for"
            )
            raise CompileError(msg)
        return OrtRunner(session, model)

    def _create(self, data: bytes, so: Any, providers: list[tuple[str, dict[str, Any]]]) -> Any:
        import onnxruntime as ort

        return ort.InferenceSession(
            data, sess_options=so, providers=[n for n, _ in providers], provider_options=[o for _, o in providers]
        )

    def _cache_artifact(
        self, model: LoweredModel, device: Device, options: CompileOptions, providers: list[Any]
    ) -> Artifact | None:
        """onnxruntime's optimized model of this compile, ``<cache_dir>/<key>.ort.onnx``, checked
        on read against its record (see :class:`hal.cache.Artifact`); None when not cached."""
        if not options.cache_dir or options.extra.get("session_config") or model.proto.ByteSize() > 2**30:
            return None  # custom session configs may change what gets optimized: do not share
        key = cache_key(
            model=model.digest, device=device.id, providers=providers,
            onnxruntime=self.version, threads=options.extra.get("intra_op_num_threads"),
            optimization=options.extra.get("graph_optimization"),
            reduced_precision=options.reduced_precision,  # the optimized model bakes precision in
        )
        return Artifact(Path(options.cache_dir) / f"{key}.ort.onnx", key)

    def _cached_session(
        self, artifact: Artifact | None, device: Device, options: CompileOptions, providers: list[Any]
    ) -> Any:
        """A session from onnxruntime's optimized model of an earlier compile, or None (a damaged
        or foreign file is removed with a WARNING and rebuilt)."""
        import onnxruntime as ort

        data = artifact.read() if artifact is not None else None
        if data is None:
            return None
        so = self.session_options(device, options)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done already
        try:
            session = self._create(data, so, providers)
        except Exception as exc:  # intact but from an incompatible build: rebuild it
            log.warning("cached onnxruntime model %s unusable (%s); rebuilding", artifact.path, first_line(exc))
            artifact.discard()
            return None
        self.cache_hits += 1
        return session

    def _new_session(
        self,
        data: bytes,
        artifact: Artifact | None,
        device: Device,
        options: CompileOptions,
        providers: list[Any],
        initializers: Sequence[tuple[str, Any]] = (),
    ) -> Any:
        so = self.session_options(device, options)
        if initializers and _optimizations_off(options):
            # No graph optimizer runs, so none reads a weight's value: the kernels use the
            # mapped buffers as they are (no copy of the weights).
            for name, value in initializers:
                so.add_initializer(name, value)
        elif initializers:
            # The graph optimizers (constant folding, Conv+BatchNormalization and other fusions)
            # read weights' values, and see only these: onnxruntime copies them in. With
            # add_initializer (no copy) they read the placeholder files' zeros and answered wrong.
            so.add_external_initializers([n for n, _ in initializers], [v for _, v in initializers])
        tmp = None
        if artifact is not None:
            # onnxruntime writes the optimized model while creating the session; it goes to a
            # private name and is moved into place with its record, so readers never see half a file.
            tmp = artifact.temp_path()
            so.optimized_model_filepath = str(tmp)
        try:
            session = self._create(data, so, providers)
        except Exception as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if tmp is None or _missing_kernels(exc):  # the model is at fault, not the cache
                msg = f"onnxruntime cannot compile the model for {device.id}: {first_line(exc)}"
                raise CompileError(msg, operators=_missing_kernels(exc)) from exc
            # Saving the optimized model may be what failed (a full disk: "Protobuf serialization
            # failed"): compile again without the cache, which also says whether the model is at fault.
            session = self._new_session(data, None, device, options, providers)
            cache_skipped(tmp.parent, OSError(f"onnxruntime could not save its optimized model: {first_line(exc)}"))
            return session
        if tmp is not None and artifact is not None:
            artifact.adopt(tmp)
        return session
