"""A stand-in for the ``pynvml`` module that answers like a driver with the GPUs we describe.

We cannot have an H100, an A100 or a B200 on the test machines (no GPU, no NVIDIA driver), so the
tests that need one talk to this object instead of NVML. It implements only the calls
``hal_nvidia`` makes, with pynvml's signatures, error class and constants, and raises like NVML
does for a link index past the GPU's last one.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from attrs import define, field

NVML_FEATURE_ENABLED = 1
NVML_FEATURE_DISABLED = 0
NVML_P2P_CAPS_INDEX_NVLINK = 2
NVML_P2P_STATUS_OK = 0
NVML_P2P_STATUS_NOT_SUPPORTED = 5
NVML_NVLINK_MAX_LINKS = 36
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_LIBRARY_NOT_FOUND = 12


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {2: "Invalid Argument", 3: "Not Supported", 12: "NVML Shared Library Not Found"}.get(
            self.value, f"NVML Error with code {self.value}"
        )


@define
class FakeGpu:
    name: str
    cc: tuple[int, int]
    memory_bytes: int
    nvlinks: int = 0
    #: what nvmlDeviceGetNvLinkVersion answers: the nvmlNvlinkVersion_t enum (H100: 6 = 4.0)
    nvlink_version: int = 0
    uuid: str = ""
    bus_id: bytes = b"00000000:00:00.0"
    #: links reported but down (state disabled)
    down_links: int = 0
    peers: list[int] = field(factory=list)


# Figures as NVML reports them on the real products (names as nvidia-smi prints them).
H100 = FakeGpu("NVIDIA H100 80GB HBM3", (9, 0), 81559 * 2**20, nvlinks=18, nvlink_version=6, uuid="GPU-h100-0")
A100 = FakeGpu("NVIDIA A100-SXM4-80GB", (8, 0), 81920 * 2**20, nvlinks=12, nvlink_version=5, uuid="GPU-a100-0")
B200 = FakeGpu("NVIDIA B200", (10, 0), 183359 * 2**20, nvlinks=18, nvlink_version=7, uuid="GPU-b200-0")
L4 = FakeGpu("NVIDIA L4", (8, 9), 23034 * 2**20, uuid="GPU-l4-0")


def make_nvml(gpus: Sequence[FakeGpu], *, driver: str = "575.51.03", init_error: int | None = None) -> Any:
    """A module object with pynvml's API answering for ``gpus`` (NVML index = list position)."""
    nvml = types.ModuleType("pynvml")
    state = {"initialised": 0}

    def check() -> None:
        if not state["initialised"]:
            raise NVMLError(9)  # Driver Not Loaded / uninitialised, as NVML answers

    def init() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        state["initialised"] += 1

    def shutdown() -> None:
        check()
        state["initialised"] -= 1

    def handle(i: int) -> int:
        check()
        if not 0 <= i < len(gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return i

    def link_state(h: int, link: int) -> int:
        gpu = gpus[h]
        if not gpu.nvlinks:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if link >= gpu.nvlinks + gpu.down_links:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return NVML_FEATURE_ENABLED if link < gpu.nvlinks else NVML_FEATURE_DISABLED

    def p2p(h1: int, h2: int, index: int) -> int:
        assert index == NVML_P2P_CAPS_INDEX_NVLINK
        return NVML_P2P_STATUS_OK if h2 in gpus[h1].peers else NVML_P2P_STATUS_NOT_SUPPORTED

    nvml.__dict__.update(
        NVMLError=NVMLError,
        NVML_FEATURE_ENABLED=NVML_FEATURE_ENABLED,
        NVML_P2P_CAPS_INDEX_NVLINK=NVML_P2P_CAPS_INDEX_NVLINK,
        NVML_P2P_STATUS_OK=NVML_P2P_STATUS_OK,
        NVML_NVLINK_MAX_LINKS=NVML_NVLINK_MAX_LINKS,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlSystemGetDriverVersion=lambda: (check(), driver)[1],
        nvmlDeviceGetCount=lambda: (check(), len(gpus))[1],
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: gpus[h].name,
        nvmlDeviceGetCudaComputeCapability=lambda h: gpus[h].cc,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=gpus[h].memory_bytes, free=0, used=0),
        nvmlDeviceGetUUID=lambda h: gpus[h].uuid,
        nvmlDeviceGetPciInfo=lambda h: types.SimpleNamespace(busId=gpus[h].bus_id),
        nvmlDeviceGetNvLinkState=link_state,
        nvmlDeviceGetNvLinkVersion=lambda h, link: gpus[h].nvlink_version,
        nvmlDeviceGetP2PStatus=p2p,
    )
    nvml.state = state  # type: ignore[attr-defined]
    return nvml
