"""The ``cuda`` backend: NVIDIA GPUs found through NVML, models run by onnxruntime-gpu.

Discovery asks NVML (``pynvml``, from the nvidia-ml-py distribution) for every GPU: name, memory,
compute capability, NVLink links. The compute capability decides the number formats
(:func:`hal_nvidia.chips.format_levels`); peak throughput comes from the small table in
:mod:`hal_nvidia.chips`. Device ids are CUDA ordinals (``cuda:0``, ``cuda:1``, ...), the same
numbers onnxruntime's ``device_id`` takes, honouring ``CUDA_VISIBLE_DEVICES``.

Without a driver there is no GPU to list: as every backend does when it can see nothing, it lists
the device a user would name, ``cuda:0``, unavailable, declaring nothing, whose reason says what
is missing and what to do. No further GPU is invented.

Preparing a model never lands on the CPU behind the caller's back (the guard is
:class:`hal.plugin.OrtBackend`'s): the session asks for ``CUDAExecutionProvider`` (or
``TensorrtExecutionProvider`` first, with ``extra={"provider": "tensorrt"}``) without the CPU
provider, with ``session.disable_cpu_ep_fallback = 1`` so no node may be placed on the CPU, and the
providers the session really got are checked. onnxruntime-gpu without the CUDA libraries lists
``CUDAExecutionProvider`` but cannot create it; discovery lists such GPUs unavailable with the
loader's message, and preparing ends in a :class:`~hal.plugin.CompileError` naming the library.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from hal.plugin import (
    Capabilities, CompileError, CompileOptions, Device, DeviceKind, E8M0Encoding, Interconnect,
    InterconnectKind, Maturity, Memory, OpsetRange, OrtBackend, Stability, fit_capabilities,
)
from hal_nvidia import chips

__all__ = ["NO_GPU_ID", "CudaBackend", "GpuInfo", "capabilities_for", "provider_library_problem"]

#: Id of the one device listed, unavailable, when no GPU can be seen (no driver, no pynvml, no GPU).
NO_GPU_ID = "cuda:0"

#: Opsets onnxruntime-gpu accepts; the same library as the CPU build the core declares 7-25 for.
_OPSETS = OpsetRange(7, 25)


class GpuInfo:
    """What NVML says about one GPU (kept plain so tests and callers can build one by hand)."""

    def __init__(
        self,
        *,
        index: int,
        name: str,
        compute_capability: tuple[int, int],
        memory_bytes: int | None,
        uuid: str = "",
        pci_bus_id: str = "",
        nvlink_links: int = 0,
        nvlink_version: int | None = None,
        nvlink_peers: Sequence[int] = (),
    ) -> None:
        self.index = index
        self.name = name
        self.compute_capability = compute_capability
        self.memory_bytes = memory_bytes
        self.uuid = uuid
        self.pci_bus_id = pci_bus_id
        self.nvlink_links = nvlink_links
        self.nvlink_version = nvlink_version
        self.nvlink_peers = tuple(nvlink_peers)


def capabilities_for(gpu: GpuInfo, peer_ids: Sequence[str] = ()) -> Capabilities:
    """The :class:`Capabilities` of one GPU: formats from its compute capability, figures from
    :data:`hal_nvidia.chips.CHIPS`, NVLink from what NVML reported."""
    cc = gpu.compute_capability
    chip = chips.find_chip(gpu.name)
    generation = chips.nvlink_generation(gpu.nvlink_version) if gpu.nvlink_version else None
    if gpu.nvlink_links:
        per_link = chips.NVLINK_LINK_GBPS.get(generation) if generation else None
        interconnect = Interconnect(
            kind=InterconnectKind.NVLINK,
            bandwidth_gbps=per_link * gpu.nvlink_links if per_link else None,
            links=gpu.nvlink_links,
            peers=tuple(peer_ids),
        )
    else:
        interconnect = Interconnect(kind=InterconnectKind.PCIE)
    incompatibilities = []
    if cc < (7, 0):
        incompatibilities.append(
            f"compute capability {cc[0]}.{cc[1]} is older than current CUDA builds of onnxruntime support (7.0+)"
        )
    return Capabilities(
        formats=chips.format_levels(cc),
        scaled=chips.scaled_formats(cc),
        e8m0_encoding=E8M0Encoding.OCP if cc >= (10, 0) else None,
        interconnect=interconnect,
        stability=Stability(maturity=Maturity.STABLE, incompatibilities=tuple(incompatibilities)),
        memory=Memory(capacity_bytes=gpu.memory_bytes, bandwidth_gbps=chip.memory_gbps if chip else None),
        peak_tflops=dict(chip.peak_tflops) if chip else {},
        opsets=_OPSETS,
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _visible_order(gpus: Sequence[GpuInfo]) -> list[GpuInfo] | None:
    """The GPUs CUDA will number 0, 1, ... under ``CUDA_VISIBLE_DEVICES`` (NVML ignores it).

    Returns None when the variable is set to something we cannot map (MIG ids, garbage); the
    caller then says so instead of guessing an ordinal.
    """
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(gpus)
    out: list[GpuInfo] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            break
        if part.isdigit():
            match = next((g for g in gpus if g.index == int(part)), None)
        elif part.startswith("GPU-"):
            match = next((g for g in gpus if g.uuid and g.uuid.startswith(part)), None)
        else:
            return None
        if match is None:  # CUDA stops at the first id it cannot resolve
            break
        out.append(match)
    return out


class CudaBackend(OrtBackend):
    """NVIDIA GPUs through NVML and onnxruntime-gpu. Backend name ``cuda``.

    ``CompileOptions.extra`` keys: ``provider`` (``"cuda"``, the default, or ``"tensorrt"``),
    ``cuda_options`` / ``tensorrt_options`` (dicts passed to the provider), and the keys
    :class:`~hal.backends.onnxruntime.OrtBackend` reads (``session_config``,
    ``intra_op_num_threads``).
    """

    name = "cuda"
    distribution = "onnxruntime-gpu"
    #: The onnxruntime-gpu library behind each execution provider, loaded to say why one fails.
    provider_libraries = {
        "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
        "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
    }
    install_advice = (
        "install the CUDA and cuDNN versions this onnxruntime-gpu was built for (TensorRT too for "
        "extra provider='tensorrt') and put them on the library path"
    )
    cpu_fallback = False

    def __init__(self, nvml: ModuleType | None = None) -> None:
        # Tests hand in a fake pynvml; otherwise pynvml is imported in discover(), not here.
        self._nvml = nvml

    # -- discovery -------------------------------------------------------------------------------

    def _placeholder(self, reason: str) -> Device:
        return self.unavailable(reason, vendor="NVIDIA", kind=DeviceKind.GPU, name="no NVIDIA GPU found")

    def _load_nvml(self) -> ModuleType:
        if self._nvml is not None:
            return self._nvml
        import pynvml

        return pynvml

    def read_gpus(self, nvml: ModuleType) -> tuple[list[GpuInfo], str]:
        """Every GPU NVML sees, in NVML order, and the driver version. NVML must be initialised."""
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = ""
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(int(nvml.nvmlDeviceGetCount()))]
        gpus = []
        for index, handle in enumerate(handles):
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            try:
                memory: int | None = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            except nvml.NVMLError:
                memory = None
            links, version = self._nvlinks(nvml, handle)
            peers = []
            if links:
                for other_index, other in enumerate(handles):
                    if other_index == index:
                        continue
                    try:
                        status = nvml.nvmlDeviceGetP2PStatus(handle, other, nvml.NVML_P2P_CAPS_INDEX_NVLINK)
                    except nvml.NVMLError:
                        continue
                    if status == nvml.NVML_P2P_STATUS_OK:
                        peers.append(other_index)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    compute_capability=(int(major), int(minor)),
                    memory_bytes=memory,
                    uuid=self._optional(nvml, nvml.nvmlDeviceGetUUID, handle),
                    pci_bus_id=self._pci_bus_id(nvml, handle),
                    nvlink_links=links,
                    nvlink_version=version,
                    nvlink_peers=peers,
                )
            )
        return gpus, driver

    @staticmethod
    def _optional(nvml: ModuleType, function: Any, *args: Any) -> str:
        try:
            return _text(function(*args))
        except nvml.NVMLError:
            return ""

    @staticmethod
    def _pci_bus_id(nvml: ModuleType, handle: Any) -> str:
        try:
            return _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
        except nvml.NVMLError:
            return ""

    @staticmethod
    def _nvlinks(nvml: ModuleType, handle: Any) -> tuple[int, int | None]:
        """Active NVLink links and the NVML version value of the first one (0, None if none)."""
        active = 0
        version = None
        for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
            try:
                state = nvml.nvmlDeviceGetNvLinkState(handle, link)
            except nvml.NVMLError:
                # NOT_SUPPORTED (no NVLink at all) or INVALID_ARGUMENT (past this GPU's last
                # link): both mean there is nothing more to count.
                break
            if state != nvml.NVML_FEATURE_ENABLED:
                continue
            active += 1
            if version is None:
                try:
                    version = int(nvml.nvmlDeviceGetNvLinkVersion(handle, link))
                except nvml.NVMLError:
                    version = None
        return active, version

    def discover(self) -> list[Device]:
        try:
            nvml = self._load_nvml()
        except ImportError as exc:
            return [self._placeholder(f"pynvml does not import ({exc}); pip install nvidia-ml-py")]
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return [
                self._placeholder(
                    f"NVML cannot start ({exc}): no NVIDIA driver on this machine (libnvidia-ml.so.1 "
                    "is part of it); install the NVIDIA driver and CUDA 12/13, or pick another device"
                )
            ]
        try:
            gpus, driver = self.read_gpus(nvml)
        except nvml.NVMLError as exc:
            return [self._placeholder(f"NVML failed while listing GPUs ({exc}); check `nvidia-smi`")]
        finally:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass
        if not gpus:
            return [self._placeholder(f"the NVIDIA driver {driver} sees no GPU; check `nvidia-smi`")]
        visible = _visible_order(gpus)
        if visible is None:
            return [
                self._placeholder(
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} names devices this "
                    "backend cannot map to GPUs (use indices or GPU- UUIDs)"
                )
            ]
        if not visible:
            return [self._placeholder("CUDA_VISIBLE_DEVICES hides every GPU; unset it or list GPU indices")]
        problem, ort_version = self.runtime_problem("CUDAExecutionProvider")
        ordinal = {gpu.index: n for n, gpu in enumerate(visible)}
        devices = []
        for n, gpu in enumerate(visible):
            peers = [f"{self.name}:{ordinal[p]}" for p in gpu.nvlink_peers if p in ordinal]
            cc = gpu.compute_capability
            chip = chips.find_chip(gpu.name)
            caps = capabilities_for(gpu, peers)
            if ort_version:  # what the installed onnxruntime-gpu reads (IR version, opsets)
                caps = fit_capabilities(caps, cpu_kernels=False)
            details: dict[str, Any] = {
                "compute_capability": f"{cc[0]}.{cc[1]}",
                "nvml_index": gpu.index,
                "uuid": gpu.uuid,
                "pci_bus_id": gpu.pci_bus_id,
                "driver": driver,
                "onnxruntime": ort_version,
            }
            if gpu.nvlink_version is not None:
                details["nvlink_generation"] = chips.nvlink_generation(gpu.nvlink_version) or "unknown"
            if chip is not None:
                details["profile"] = f"{chip.model}: {chip.source}"
            devices.append(
                Device(
                    id=f"{self.name}:{n}",
                    backend=self.name,
                    vendor="NVIDIA",
                    name=gpu.name,
                    kind=DeviceKind.GPU,
                    capabilities=caps,
                    available=problem is None,
                    reason=problem,
                    details=details,
                    handle=n,  # the CUDA ordinal onnxruntime's device_id takes
                )
            )
        return devices

    # -- compiling -------------------------------------------------------------------------------

    def providers(self, device: Device, options: CompileOptions) -> list[tuple[str, dict[str, Any]]]:
        ordinal = self.handle_of(device, int)
        cuda = {"device_id": ordinal, **dict(options.extra.get("cuda_options", {}))}
        # No CPUExecutionProvider in the list: with session.disable_cpu_ep_fallback onnxruntime
        # rejects a list that names it, and without it nothing may land on the CPU.
        chosen = str(options.extra.get("provider", "cuda")).lower()
        if chosen == "cuda":
            return [("CUDAExecutionProvider", cuda)]
        if chosen == "tensorrt":
            trt: dict[str, Any] = {"device_id": ordinal}
            if options.cache_dir:
                # TensorRT engines take minutes to build; keep them with the HAL's cache.
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=options.cache_dir)
            trt.update(dict(options.extra.get("tensorrt_options", {})))
            return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda)]
        msg = f"extra provider={chosen!r} is not one of 'cuda', 'tensorrt'"
        raise CompileError(msg)


def provider_library_problem(provider: str) -> str | None:
    """Why onnxruntime-gpu's library for ``provider`` cannot load here (None if it loads).

    onnxruntime-gpu lists CUDAExecutionProvider whether or not CUDA, cuDNN or TensorRT are
    installed, and only logs why creating it failed; loading the provider library ourselves gives
    the loader's message (``libcublasLt.so.13: cannot open shared object file``).
    """
    return CudaBackend().library_problem(provider)
