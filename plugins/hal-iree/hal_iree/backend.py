"""The IREE backend: devices ``iree:local-task``, ``iree:cuda``, ``iree:hip``, ``iree:vulkan``.

``prepare`` imports the ONNX model with IREE's Python importer, compiles it with ``iree-compile``
to a vmfb for the device's target (llvm-cpu with the host CPU's features for local-task), keeps
the vmfb in ``options.cache_dir`` and loads it into the IREE runtime. Options a caller may pass
in ``CompileOptions.extra`` (``compiled.to(device, **extra)``):

``channels_last`` (bool, default False)
    Convert NCHW convolutions to channels-last (NHWC) before codegen and propagate the
    transposes. Reported about 3x faster on a ResNet-like model; on a 2-core AVX2 EPYC it was
    0.86x (slower), so measure on your machine (``benchmarks/bench_iree.py --channels-last``).
``iree_flags`` (list of str)
    Extra ``iree-compile`` flags, appended after the plugin's own (they are part of the cache key).
``iree_opt_level`` (int 0-3)
    ``--iree-opt-level=O<n>``; IREE's default is O2.
``iree_gpu_target`` (str)
    GPU target for cuda (``sm_89``), hip (``gfx942``; required) or vulkan (``rdna3``). For
    cuda it defaults to the newest target iree-compile knows that the GPU runs, from the compute
    capability the CUDA driver reports at discovery (``details["compute_capability"]``,
    ``details["gpu_target"]``): IREE 3.13 has no sm_90, so an H100/H200 gets sm_89's PTX, which
    the driver compiles for it.

``iree_parameters`` (``"external"``, the default; ``"none"``; or an int, a size in bytes)
    Which weights the vmfb leaves to the runtime as IREE parameters. ``"external"``: every
    initializer the model stores as external data (of at least 100 elements; smaller ones, such
    as shapes, stay constants the compiler sees); they are given to the runtime at load from the
    HAL's read-only mapping of the checked files, without a copy where a tensor is 64-byte
    aligned in its file, so models past protobuf's 2 GiB compile and run and the vmfb holds the
    graph alone. ``"none"``: every weight inside the vmfb (one protobuf, up to 2 GiB, a copy).
    An int: inline initializers of at least that many bytes become parameters too (their bytes
    are copied out of the protobuf once per load).

``reduced_precision=True`` lets contractions (MatMul, Gemm, Conv) take bf16 inputs
(``--iree-global-opt-demote-contraction-inputs-type=bf16``); by default the model runs in the
types it declares.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import frozen

from hal.plugin import (
    Backend, Capabilities, CompileError, CompileOptions, Device, DeviceKind, HalError, LoweredModel, Maturity,
    Memory, OpsetRange, Stability, UnavailableDeviceError,
)
from hal_iree._compile import MAX_IMPORT_OPSET, MIN_IMPORT_OPSET

if TYPE_CHECKING:
    from hal_iree._runner import IreeRunner

__all__ = ["IREE_CPU_CAPABILITIES", "IREE_GPU_CAPABILITIES", "IreeBackend", "cpu_capabilities", "host_cpu_flags"]

log = logging.getLogger("hal_iree")

_CPU_NOTES = (
    "Cast to float8, int16, uint16, uint32, uint64 does not compile on IREE 3.13 (llvm-cpu)",
    "float8 initializers (e.g. QuantizeLinear zero points) are rejected by IREE's ONNX importer; "
    "feed float8 tensors as inputs",
    "float64 is demoted to float32 by iree-compile, so float64 models are not accepted",
)


def cpu_capabilities(cpu_flags: frozenset[str] | set[str] = frozenset()) -> Capabilities:
    """What IREE's llvm-cpu target does on a CPU with ``cpu_flags`` (from /proc/cpuinfo).

    Probed with generated models on IREE 3.13 and asserted by ``tests/test_capabilities.py``:
    float16 and bfloat16 compile and run everywhere, natively where the CPU has the arithmetic
    (AVX512-FP16 / AVX512-BF16, AMX, Arm fphp / bf16) and through float32 otherwise; float8 tensors
    fed as inputs compute through float32 (emulated); int4, float4, float8_e8m0 and complex are
    rejected by the importer or the compiler.
    """
    f16_native = bool(cpu_flags & {"avx512fp16", "fphp", "asimdhp"})
    bf16_native = bool(cpu_flags & {"avx512_bf16", "amx_bf16", "bf16"})
    native = ["float32", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool"]
    emulated = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
    (native if f16_native else emulated).append("float16")
    (native if bf16_native else emulated).append("bfloat16")
    return Capabilities.from_levels(
        native=native,
        emulated=emulated,
        # IREE's importer covers operators from opset 17 on: the core converts older models.
        opsets=OpsetRange(MIN_IMPORT_OPSET, MAX_IMPORT_OPSET),
        stability=Stability(maturity=Maturity.BETA, incompatibilities=_CPU_NOTES),
    )


def host_cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.split(":", 1)[0].strip() in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


#: The llvm-cpu table for a CPU without half-precision arithmetic (the portable baseline).
IREE_CPU_CAPABILITIES = cpu_capabilities()

#: GPU targets are not exercised by this plugin's tests (no GPU in CI): declared conservatively.
IREE_GPU_CAPABILITIES = Capabilities.from_levels(
    native=["float32", "float16", "int8", "int32", "int64", "bool"],
    opsets=OpsetRange(MIN_IMPORT_OPSET, MAX_IMPORT_OPSET),
    stability=Stability(
        maturity=Maturity.EXPERIMENTAL,
        incompatibilities=("not covered by hal-iree's test suite; pass iree_gpu_target for your GPU",),
    ),
)

#: (device name, HAL driver, device kind, vendor) for every device this backend lists.
_DRIVERS: tuple[tuple[str, str, DeviceKind, str], ...] = (
    ("local-task", "local-task", DeviceKind.CPU, "IREE"),
    ("cuda", "cuda", DeviceKind.GPU, "NVIDIA"),
    ("hip", "hip", DeviceKind.GPU, "AMD"),
    ("vulkan", "vulkan", DeviceKind.GPU, "Vulkan"),
)

_HINTS = {
    "cuda": "install the NVIDIA driver (libcuda.so) to use iree:cuda",
    "hip": "install ROCm (libamdhip64.so) to use iree:hip",
    "vulkan": "install a Vulkan loader and ICD (libvulkan.so.1) to use iree:vulkan",
    "local-task": "reinstall iree-base-runtime",
}

CHANNELS_LAST_FLAGS = (
    "--iree-preprocessing-pass-pipeline=builtin.module(util.func(iree-preprocessing-convert-conv-to-channels-last))",
    "--iree-global-opt-propagate-transposes",
)
_OPTIONS = ("channels_last", "iree_flags", "iree_opt_level", "iree_gpu_target", "iree_parameters")
_SOURCE_PREFIX = re.compile(r"^(?:Error creating driver:\s*)?(?:[\w./-]+:\d+:\s*)?(?:[A-Z_]+;\s*)?")


@frozen
class _Handle:
    """What prepare needs of a device: the IREE HAL driver, and for cuda the GPU's target."""

    driver: str
    gpu_target: str | None = None


def cuda_compute_capability(ordinal: int = 0) -> tuple[int, int] | None:
    """(major, minor) of CUDA device ``ordinal``, asked of the driver library, or None.

    IREE's runtime does not report a device's compute capability; the driver API answers in
    microseconds. ctypes rather than a CUDA Python package: libcuda is the one library iree:cuda
    needs anyway.
    """
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
        device = ctypes.c_int()
        major, minor = ctypes.c_int(), ctypes.c_int()
        if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return None
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
        if lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0:
            return None
        if lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return major.value, minor.value


class CudaContext:
    """The primary CUDA context of one GPU, made current on each thread that calls IREE.

    IREE's CUDA driver retains the device's primary context and makes it current on the thread
    that creates the device, and nowhere else: loading a module or invoking from another thread
    fails with CUDA_ERROR_INVALID_CONTEXT (seen on an H200 with iree-base-runtime 3.13: the
    HAL's discovery thread, and every thread but the first of a threaded caller). ``enter`` costs
    one thread-local lookup once a thread has the context.
    """

    def __init__(self, ordinal: int = 0) -> None:
        self._lib = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
        device = ctypes.c_int()
        self._context = ctypes.c_void_p()
        if self._lib.cuInit(0) != 0 or self._lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            msg = f"the CUDA driver cannot open device {ordinal}"
            raise CompileError(msg)
        # Retained for the life of the process, as IREE's device retains it.
        if self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._context), device) != 0:
            msg = f"the CUDA driver cannot retain the primary context of device {ordinal}"
            raise CompileError(msg)
        self._local = threading.local()

    def enter(self) -> None:
        if getattr(self._local, "current", False):
            return
        if self._lib.cuCtxSetCurrent(self._context) != 0:
            msg = "the CUDA driver cannot make the GPU's context current on this thread"
            raise CompileError(msg)
        self._local.current = True


#: ``--iree-cuda-target`` values iree-compile 3.13 accepts (each tried on a one-op module): it
#: has no sm_90 or sm_100 ("missing GPU target in #hal.executable.target", iree-org/iree#22147).
_IREE_CUDA_TARGETS = (60, 61, 70, 72, 75, 80, 86, 87, 89, 120)


def iree_cuda_target(capability: tuple[int, int]) -> str | None:
    """The newest target iree-compile knows that a GPU of ``capability`` runs: its own, or an
    older one whose PTX the driver compiles for it (sm_89 for an H100/H200's 9.0)."""
    value = capability[0] * 10 + capability[1]
    known = [t for t in _IREE_CUDA_TARGETS if t <= value]
    return f"sm_{max(known)}" if known else None


def short_reason(exc: BaseException, driver: str) -> str:
    """The runtime's error for a driver, cut to its first line without source locations,
    followed by what to do."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = _SOURCE_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
    text = text.split("; please ensure", 1)[0].split(": please ensure", 1)[0].split("; ensure", 1)[0]
    return f"{text.rstrip('.; ')}; {_HINTS.get(driver, 'check the driver installation')}"


class IreeBackend(Backend):
    """IREE as the HAL sees it. ``compile_count`` and ``cache_hits`` count what
    :meth:`prepare` did (a cache hit skips ``iree-compile`` entirely)."""

    name = "iree"

    def __init__(self) -> None:
        self.compile_count = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._instance: Any = None
        self._hal_modules: dict[str, tuple[Any, Any]] = {}
        self._cuda: CudaContext | None = None  # made on the first iree:cuda load

    @property
    def version(self) -> str:
        from iree.runtime import version as runtime_version

        from hal_iree._compile import compiler_version

        return f"compiler {compiler_version()}, runtime {runtime_version.VERSION}"

    # -- discovery -------------------------------------------------------------------------

    def discover(self) -> list[Device]:
        """Every driver this backend knows, available when the runtime can create its device."""
        try:
            import iree.runtime as rt
        except ImportError as exc:
            reason = f"iree.runtime does not import ({exc}); pip install iree-base-runtime"
            return [
                self._device(name, driver, kind, vendor, False, reason, {}) for name, driver, kind, vendor in _DRIVERS
            ]
        devices = []
        for name, driver, kind, vendor in _DRIVERS:
            details: dict[str, Any] = {"driver": driver}
            try:
                available_devices = rt.get_driver(driver).query_available_devices()
                if not available_devices:
                    raise RuntimeError(f"the {driver} driver found no devices")
                # Proves a device can be created, and drops it. Not rt.get_device(), which keeps
                # the device for the process: discovery runs on a thread that then ends, and a
                # CUDA device made there fails every later load with CUDA_ERROR_INVALID_CONTEXT
                # (seen on an H200); prepare makes its own (see _runtime).
                rt.get_driver(driver).create_default_device()
            except Exception as exc:  # the runtime raises RuntimeError or ValueError per driver
                devices.append(self._device(name, driver, kind, vendor, False, short_reason(exc, driver), details))
                continue
            first = available_devices[0]
            details["device_name"] = first.get("name", "")
            details["devices"] = len(available_devices)
            if driver == "local-task":
                details["target"] = "llvm-cpu (host CPU features)"
            elif driver == "cuda":
                capability = cuda_compute_capability()
                if capability is not None:
                    details["compute_capability"] = f"{capability[0]}.{capability[1]}"
                    details["gpu_target"] = iree_cuda_target(capability) or ""
            devices.append(self._device(name, driver, kind, vendor, True, None, details))
        return devices

    def _device(
        self,
        name: str,
        driver: str,
        kind: DeviceKind,
        vendor: str,
        available: bool,
        reason: str | None,
        details: Mapping[str, Any],
    ) -> Device:
        caps = IREE_GPU_CAPABILITIES
        if kind is DeviceKind.CPU:
            from attrs import evolve

            caps = evolve(cpu_capabilities(host_cpu_flags()), memory=Memory.host())
        label = {"local-task": "llvm-cpu"}.get(name, name)
        return Device(
            id=f"iree:{name}", backend=self.name, vendor=vendor, name=label, kind=kind,
            capabilities=caps, available=available, reason=reason, details=details,
            # the IREE HAL driver prepare compiles for and loads on, and the GPU's own target
            handle=_Handle(driver, details.get("gpu_target") or None),
        )

    # -- preparing a model -----------------------------------------------------------------

    def compile_flags(self, device: Device, options: CompileOptions) -> list[str]:
        """The ``iree-compile`` flags for ``device`` under ``options`` (also the cache key's).

        Raises :class:`CompileError` for unknown or ill-typed options.
        """
        extra = dict(options.extra or {})
        unknown = sorted(set(extra) - set(_OPTIONS))
        if unknown:
            msg = f"unknown option(s) {unknown} for {device.id}; hal-iree accepts {list(_OPTIONS)}"
            raise CompileError(msg)
        handle = self.handle_of(device, _Handle)
        driver = handle.driver
        gpu_target = extra.get("iree_gpu_target", handle.gpu_target)
        if gpu_target is not None and not isinstance(gpu_target, str):
            msg = f"iree_gpu_target must be a string such as 'sm_90' or 'gfx942', got {gpu_target!r}"
            raise CompileError(msg)
        if driver == "local-task":
            flags = [
                "--iree-hal-target-device=local",
                "--iree-hal-local-target-device-backends=llvm-cpu",
                "--iree-llvmcpu-target-cpu=host",
            ]
        elif driver == "cuda":
            flags = ["--iree-hal-target-device=cuda"] + ([f"--iree-cuda-target={gpu_target}"] if gpu_target else [])
        elif driver == "hip":
            if not gpu_target:
                msg = f"{device.id} needs the GPU architecture: pass iree_gpu_target='gfx942' (or your GPU's)"
                raise CompileError(msg)
            flags = ["--iree-hal-target-device=hip", f"--iree-rocm-target={gpu_target}"]
        elif driver == "vulkan":
            flags = ["--iree-hal-target-device=vulkan"] + (
                [f"--iree-vulkan-target={gpu_target}"] if gpu_target else []
            )
        else:
            msg = f"hal-iree does not know device {device.id}"
            raise CompileError(msg)
        level = extra.get("iree_opt_level")
        if level is not None:
            if level not in (0, 1, 2, 3):
                msg = f"iree_opt_level must be 0, 1, 2 or 3, got {level!r}"
                raise CompileError(msg)
            flags.append(f"--iree-opt-level=O{level}")
        if extra.get("channels_last"):
            flags.extend(CHANNELS_LAST_FLAGS)
        if options.reduced_precision:
            flags.append("--iree-global-opt-demote-contraction-inputs-type=bf16")
        user = extra.get("iree_flags") or ()
        if isinstance(user, str) or not all(isinstance(f, str) for f in user):
            msg = f"iree_flags must be a list of strings such as ['--iree-opt-level=O3'], got {user!r}"
            raise CompileError(msg)
        flags.extend(user)
        return flags

    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> IreeRunner:
        """Compile (or fetch from the cache) and load ``model`` for ``device``.

        Raises :class:`CompileError` naming the device and the importer's or compiler's reason,
        and :class:`UnavailableDeviceError` when the device's driver cannot create a device.
        """
        from hal_iree import _compile

        if not device.available:
            msg = f"{device.id} is unavailable: {device.reason}"
            raise UnavailableDeviceError(msg)
        flags = self.compile_flags(device, options)
        parameters = self.parameter_plan(model, options)
        compiler = _compile.compiler_version()
        host = _compile.host_cpu_fingerprint() if device.kind is DeviceKind.CPU else ""
        if parameters:
            from hal_iree._parameters import graph_sha256

            # The vmfb holds no parameter's bytes: keyed by the graph, it is shared by every model
            # with this graph whatever its weights (the core's digest covers them).
            model_id = graph_sha256(model, parameters)
        else:
            model_id = model.digest  # the core's digest spares serializing and hashing the model again
        key = _compile.cache_key(model_id, device.id, flags, compiler, host)
        cache_dir = Path(options.cache_dir) if options.cache_dir else None

        data = _compile.read_cached(cache_dir, key) if cache_dir else None
        if data is not None:
            try:
                runner = self._load(data, model, device, parameters)
            except CompileError as exc:
                log.warning("cached vmfb %s does not load (%s); rebuilding it", key[:16], exc)
            else:
                with self._lock:
                    self.cache_hits += 1
                return runner
        if parameters:
            from hal_iree._parameters import import_proto

            proto = import_proto(model, parameters)
        else:
            # Every weight inside the vmfb: external data goes into the protobuf (up to 2 GiB).
            try:
                proto = model.self_contained()
            except HalError as exc:
                msg = f"{device.id} cannot take this model's external data: {exc}"
                raise CompileError(msg) from None
        data = _compile.build_vmfb(proto, flags, device.id, workdir=None, parameters=parameters)
        with self._lock:
            self.compile_count += 1
        if cache_dir:
            info = {"device": device.id, "flags": flags, "compiler": compiler, "model_sha256": model.digest}
            if parameters:
                info["graph_sha256"] = model_id
                info["parameters"] = len(parameters)
            _compile.write_cached(cache_dir, key, data, info)
        return self._load(data, model, device, parameters)

    def parameter_plan(self, model: LoweredModel, options: CompileOptions) -> dict[str, str]:
        """``{initializer name: parameter key}``: the weights the vmfb leaves to the runtime, by
        the ``iree_parameters`` option (see the module docstring). Raises :class:`CompileError`
        for a value it does not know."""
        from hal_iree._parameters import plan

        extra = options.extra or {}
        choice = extra.get("iree_parameters", "external")
        if choice == "none":
            return {}
        if choice == "external":
            inline_bytes = None
        elif isinstance(choice, int) and not isinstance(choice, bool) and choice >= 0:
            inline_bytes = choice
        else:
            msg = f"iree_parameters must be 'external', 'none' or a size in bytes (an int >= 0), got {choice!r}"
            raise CompileError(msg)
        if any("parameter" in flag for flag in extra.get("iree_flags") or ()):
            # A flag of the caller's that reads parameters at compile time (--iree-opt-import-parameters,
            # --iree-opt-splat-parameters) would put bytes the key does not cover in the vmfb.
            return {}
        return plan(model, inline_bytes)

    def _runtime(self, driver: str) -> tuple[Any, Any, Any]:
        """(VmInstance, HalDevice, hal module) for a driver, created once per backend."""
        import iree.runtime as rt

        with self._lock:
            if self._instance is None:
                self._instance = rt.VmInstance()
            if driver not in self._hal_modules:
                device = rt.get_driver(driver).create_default_device()
                self._hal_modules[driver] = (device, rt.create_hal_module(self._instance, device))
            device, hal_module = self._hal_modules[driver]
            return self._instance, device, hal_module

    def _cuda_context(self) -> CudaContext:
        with self._lock:
            if self._cuda is None:
                self._cuda = CudaContext()
            return self._cuda

    def _load(
        self, data: bytes, model: LoweredModel, device: Device, parameters: Mapping[str, str] | None = None
    ) -> IreeRunner:
        import iree.runtime as rt

        from hal_iree._compile import ENTRY
        from hal_iree._runner import IreeRunner
        from hal_iree._shapes import ShapeOracle

        driver = self.handle_of(device, _Handle).driver
        instance, hal_device, hal_module = self._runtime(driver)
        on_thread = self._cuda_context().enter if driver == "cuda" else None
        if on_thread is not None:
            on_thread()
        try:
            vm_module = rt.VmModule.copy_buffer(instance, data)
        except Exception as exc:
            msg = f"IREE cannot load the compiled module for {device.id}: {str(exc).strip().splitlines()[0]}"
            raise CompileError(msg) from None
        function = vm_module.lookup_function(ENTRY)
        if function is None:
            msg = f"the compiled module for {device.id} has no function {ENTRY!r} ({vm_module.function_names})"
            raise CompileError(msg)
        # The entry function's arguments and results: the graph's inputs (initializers
        # excluded) and outputs, in order.
        inputs = [(i.name, i.format) for i in model.inputs]
        outputs = [(o.name, o.format) for o in model.outputs]
        try:
            shapes = (
                ShapeOracle(model.proto, [n for n, _ in inputs], [n for n, _ in outputs])
                if ShapeOracle.needed(model.proto) else None
            )
            weights = None
            if parameters:
                from hal_iree._parameters import Parameters

                weights = Parameters(instance, model, parameters)
            return IreeRunner(
                vm_module, hal_module, hal_device, instance, function, inputs, outputs, on_thread, shapes, weights
            )
        except KeyError as exc:
            msg = f"IREE's runtime cannot exchange tensors of type {exc.args[0].value} with {device.id}"
            raise CompileError(msg) from None
        except Exception as exc:
            msg = f"IREE cannot load the compiled module for {device.id}: {str(exc).strip().splitlines()[0]}"
            raise CompileError(msg) from None
