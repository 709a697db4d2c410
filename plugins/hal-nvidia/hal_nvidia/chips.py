"""Per-chip figures NVML cannot tell us, and what a compute capability means for number formats.

Everything here is data with its source. Figures come from ``shared/reference/chips.md`` of the
onnx-hal project; a row marked ``secondary`` there (press, wikis) is marked so here, and the
device's ``details`` carry the note so ``hal devices`` shows it.

NVML tells the name, memory capacity, compute capability and NVLink state of each GPU; peak
throughput and memory bandwidth it does not, so they come from :data:`CHIPS`, matched on the name
NVML reports. A GPU not in the table gets no peak figures rather than a guess.
"""

from __future__ import annotations

import re

from attrs import frozen

from hal.plugin import NumberFormat, ScaledFormat, Support

__all__ = [
    "CHIPS",
    "NVLINK_LINK_GBPS",
    "Chip",
    "find_chip",
    "format_levels",
    "nvlink_generation",
    "scaled_formats",
]


@frozen
class Chip:
    """Figures for one NVIDIA product, matched by a regular expression on NVML's device name.

    ``peak_tflops``: dense (not sparse) throughput per format. ``memory_gbps``: HBM bandwidth.
    ``source``: where the figures come from, as chips.md says.
    """

    pattern: str
    model: str
    peak_tflops: tuple[tuple[str, float], ...]
    memory_gbps: float | None
    source: str

    def matches(self, nvml_name: str) -> bool:
        return re.search(self.pattern, nvml_name, re.IGNORECASE) is not None


#: Known chips, most specific pattern first (an H100 PCIe must not pick up the SXM figures).
#: NVML names seen in the wild: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
#: "NVIDIA A100-SXM4-80GB" (PCIe cards differ in
#: bandwidth and are left out), "NVIDIA B200", "NVIDIA H800", "NVIDIA H20", "NVIDIA H200" (seen).
CHIPS: tuple[Chip, ...] = (
    Chip(
        r"\bH100\b.*(SXM|HBM3)",
        "H100 SXM",
        (("float8_e4m3fn", 1979.0), ("float8_e5m2", 1979.0), ("bfloat16", 989.0), ("float16", 989.0)),
        3350.0,
        "NVIDIA H100 datasheet (chips.md); float16 dense equals bfloat16 in the same datasheet",
    ),
    Chip(
        r"\bH200\b(?!.*NVL)",
        "H200 SXM",
        (("float8_e4m3fn", 1979.0), ("float8_e5m2", 1979.0), ("bfloat16", 989.0), ("float16", 989.0)),
        4800.0,
        "NVIDIA H200 datasheet (SXM: the H100's compute, 141 GB HBM3e at 4.8 TB/s); not in chips.md, "
        "unverified here. NVML's name 'NVIDIA H200' as read on a lent H200 (2026-12-04)",
    ),
    Chip(
        r"\bH800\b(?!.*PCIe)",
        "H800",
        (("float8_e4m3fn", 1979.0), ("float8_e5m2", 1979.0), ("bfloat16", 989.0), ("float16", 989.0)),
        None,
        "secondary (chips.md: 'as H100'); NVLink 400 GB/s secondary, ~300 in another report",
    ),
    Chip(
        r"\bH20\b",
        "H20",
        (("float16", 148.0),),
        4000.0,
        "secondary (chips.md): FP16 148 TFLOPS, 96 GB HBM3 4.0 TB/s",
    ),
    Chip(
        r"\bA100-SXM4-80GB\b",
        "A100 80GB SXM",
        (("bfloat16", 312.0), ("float16", 312.0)),
        2000.0,
        "NVIDIA A100 datasheet (chips.md); float16 dense equals bfloat16 in the same datasheet",
    ),
    Chip(
        r"\bA800\b",
        "A800",
        (("bfloat16", 312.0), ("float16", 312.0)),
        None,
        "secondary (chips.md: 'as A100'); NVLink 400 GB/s secondary",
    ),
    Chip(
        r"\bB200\b",
        "B200",
        (("float8_e4m3fn", 4500.0), ("float8_e5m2", 4500.0), ("bfloat16", 2250.0), ("float16", 2250.0)),
        8000.0,
        "NVIDIA table (chips.md); memory bandwidth 7.7-8 TB/s depending on the source (unverified)",
    ),
)


def find_chip(nvml_name: str) -> Chip | None:
    """The first :data:`CHIPS` row whose pattern matches NVML's name, or None."""
    return next((chip for chip in CHIPS if chip.matches(nvml_name)), None)


#: Bidirectional GB/s of one NVLink link by generation: links x this gives the figures NVIDIA
#: quotes (A100 12 x 50 = 600, H100 18 x 50 = 900, B200 18 x 100 = 1800). NVLink 1 (P100):
#: 4 x 40 = 160. Generation 6 (Rubin) is left out: no figure we could check.
NVLINK_LINK_GBPS: dict[int, float] = {1: 40.0, 2: 50.0, 3: 50.0, 4: 50.0, 5: 100.0}

# nvmlDeviceGetNvLinkVersion returns the nvmlNvlinkVersion_t enum, not the generation
# (an A100 answers 5 = NVLink 3.1; NVIDIA fixed its docs in 2025, see hwloc issue 658).
_NVML_VERSION_TO_GENERATION = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5, 8: 6}


def nvlink_generation(nvml_version: int) -> int | None:
    """NVLink generation for a value of ``nvmlDeviceGetNvLinkVersion`` (0 = invalid -> None)."""
    return _NVML_VERSION_TO_GENERATION.get(int(nvml_version))


def format_levels(cc: tuple[int, int]) -> dict[NumberFormat, Support]:
    """Support level per number format for a compute capability (major, minor).

    What the hardware does, by architecture: fp16 tensor cores from 7.0 (Volta), bf16 from 8.0
    (Ampere), FP8 E4M3/E5M2 from 8.9 (Ada, Hopper), FP6/FP4 and MX (E8M0) block scales from 10.0
    (Blackwell). The FNUZ FP8 variants are AMD/Graphcore formats no NVIDIA chip computes in:
    storage at most (convert on load). Below a format's threshold it is emulated (16-bit floats:
    CUDA computes them through float32) or storage (8-bit and smaller: Cast only).
    """
    F = NumberFormat
    cc = (int(cc[0]), int(cc[1]))
    levels: dict[NumberFormat, Support] = dict.fromkeys(
        (F.FLOAT32, F.FLOAT64, F.INT8, F.UINT8, F.INT16, F.UINT16, F.INT32, F.UINT32, F.INT64, F.UINT64, F.BOOL),
        Support.NATIVE,
    )
    levels[F.FLOAT16] = Support.NATIVE if cc >= (7, 0) else Support.EMULATED
    levels[F.BFLOAT16] = Support.NATIVE if cc >= (8, 0) else Support.EMULATED
    fp8 = Support.NATIVE if cc >= (8, 9) else Support.STORAGE
    levels[F.FLOAT8_E4M3FN] = fp8
    levels[F.FLOAT8_E5M2] = fp8
    levels[F.FLOAT8_E4M3FNUZ] = Support.STORAGE
    levels[F.FLOAT8_E5M2FNUZ] = Support.STORAGE
    blackwell = cc >= (10, 0)
    levels[F.FLOAT8_E8M0] = Support.NATIVE if blackwell else Support.STORAGE
    levels[F.FLOAT4_E2M1] = Support.NATIVE if blackwell else Support.STORAGE
    if blackwell:
        levels[F.FLOAT6_E2M3] = Support.NATIVE
        levels[F.FLOAT6_E3M2] = Support.NATIVE
    levels[F.INT4] = Support.STORAGE
    levels[F.UINT4] = Support.STORAGE
    return levels


def scaled_formats(cc: tuple[int, int]) -> tuple[ScaledFormat, ...]:
    """Block-scaled quantizations for a compute capability.

    10.0+: OCP MX (blocks of 32 sharing one E8M0 scale) for FP8, FP6 and FP4 in the tensor cores,
    and NVFP4 (FP4 with an E4M3 scale per 16). 8.9/9.0: FP8 with float32 block scales as
    DeepSeek-V3 uses them (128x128 weights, 1x128 activations) runs, but the scales are applied
    outside the tensor cores (DeepGEMM on SM90 takes FP32 scales): emulated.
    """
    cc = (int(cc[0]), int(cc[1]))
    out: list[ScaledFormat] = []
    if cc >= (8, 9):
        for element in ("float8_e4m3fn", "float8_e5m2"):
            for block in ((128, 128), (1, 128)):
                out.append(ScaledFormat(element, "float32", block, Support.EMULATED))
    if cc >= (10, 0):
        for element in ("float8_e4m3fn", "float8_e5m2", "float6_e2m3", "float6_e3m2", "float4_e2m1"):
            out.append(ScaledFormat(element, "float8_e8m0", (1, 32), Support.NATIVE))
        out.append(ScaledFormat("float4_e2m1", "float8_e4m3fn", (1, 16), Support.NATIVE))
    return tuple(out)
