"""Capability profiles of Huawei Ascend NPUs, keyed by the SoC name ACL reports.

Every figure comes from ``shared/reference/chips.md`` of the onnx-hal project. Most Ascend figures
there are ``secondary`` (press, wikis); each profile carries its source note into the device's
``details``, and where the sources conflict the figure is left out (None) rather than picked.

What is firm (hiascend.com CANN type tables): the 910B and 910C have no FP8 type at all (CANN 9.0
lists int, half, bfloat16, float, double); the 950 adds float8 E4M3FN, E5M2, HiFloat8 (no ONNX
type), E8M0 and FP4 E2M1/E1M2. CANN's ``float8_e8m0.h`` reads 0x00 as zero, unlike OCP/ONNX
(2^-127): :attr:`hal.E8M0Encoding.CANN_ZERO`.
"""

from __future__ import annotations

import re

from attrs import frozen

from hal.plugin import (
    Capabilities, E8M0Encoding, Interconnect, InterconnectKind, Maturity, Memory, OpsetRange, ScaledFormat,
    Stability, Support,
)

__all__ = ["PROFILES", "UNKNOWN", "Profile", "profile_for"]

#: onnxruntime-cann 1.24 loads models up to opset 25 (26 is refused, checked here); the CANN
#: execution provider itself converts a subset of operators.
_OPSETS = OpsetRange(7, 25)

_BASE_NATIVE = ("float32", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")

_NO_FP8 = (
    "no FP8 types in CANN (type table: int, half, bfloat16, float, double): FP8 models must be "
    "dequantized to bfloat16/float16 before they run"
)


@frozen
class Profile:
    """One Ascend chip: how to recognise its SoC name, its capabilities, where they come from."""

    key: str
    model: str
    pattern: str
    capabilities: Capabilities
    source: str

    def matches(self, soc_name: str) -> bool:
        return re.fullmatch(self.pattern, soc_name.strip(), re.IGNORECASE) is not None


def _caps(
    *,
    fp8: bool,
    peak: dict[str, float],
    memory_bytes: int | None,
    memory_gbps: float | None,
    link_gbps: float | None,
    maturity: Maturity,
    incompatibilities: tuple[str, ...],
    link_kind: InterconnectKind = InterconnectKind.HCCS,
) -> Capabilities:
    native = list(_BASE_NATIVE)
    scaled: list[ScaledFormat] = []
    if fp8:
        native += ["float8_e4m3fn", "float8_e5m2", "float8_e8m0", "float4_e2m1"]
        # MX: blocks of 32 sharing one E8M0 scale. The types are in CANN's table; that the
        # block-scaled matmul runs in the cube units is Huawei's claim (secondary), unmeasured here.
        scaled = [
            ScaledFormat(element, "float8_e8m0", (1, 32), Support.NATIVE)
            for element in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1")
        ]
    return Capabilities.from_levels(
        native=native,
        # "double" is in CANN's type table, but the Da Vinci cube and vector units have no
        # float64 arithmetic (unverified): emulated.
        emulated=["float64"],
        scaled=scaled,
        e8m0_encoding=E8M0Encoding.CANN_ZERO if fp8 else None,
        interconnect=Interconnect(kind=link_kind, bandwidth_gbps=link_gbps),
        stability=Stability(maturity=maturity, incompatibilities=incompatibilities),
        memory=Memory(capacity_bytes=memory_bytes, bandwidth_gbps=memory_gbps),
        peak_tflops=peak,
        opsets=_OPSETS,
    )


_GB = 10**9

#: SoC names as ``aclrtGetSocName`` returns them: "Ascend910B1" ... "Ascend910B4" for the 910B
#: family, "Ascend910_93xx" (e.g. Ascend910_9391, _9392, _9381, _9382, _9372, _9362) for the
#: 910C / Atlas A3 parts, "Ascend950..." for the 950 (exact suffixes unverified).
PROFILES: tuple[Profile, ...] = (
    Profile(
        key="910b",
        model="Ascend 910B (Atlas A2)",
        pattern=r"Ascend910B\d*",
        capabilities=_caps(
            fp8=False,
            peak={"float16": 320.0},
            memory_bytes=64 * _GB,
            memory_gbps=None,
            link_gbps=None,
            maturity=Maturity.BETA,
            incompatibilities=(_NO_FP8,),
        ),
        source=(
            "formats: hiascend.com CANN type table; FP16 ~320 TFLOPS and 64 GB HBM2e secondary "
            "(32 GB elsewhere); HCCS bandwidth not found"
        ),
    ),
    Profile(
        key="910c",
        model="Ascend 910C (Atlas A3)",
        pattern=r"Ascend910_93\d+",
        capabilities=_caps(
            fp8=False,
            peak={"bfloat16": 780.0},
            memory_bytes=None,
            memory_gbps=None,
            link_gbps=784.0,
            maturity=Maturity.BETA,
            incompatibilities=(_NO_FP8,),
        ),
        source=(
            "formats: hiascend.com CANN type table; BF16 ~780-800 TFLOPS (lower bound kept) and HCCS "
            "784 GB/s secondary; memory left out: 128 GB 3.2 TB/s and 96 GB 1.8 TB/s conflict (secondary)"
        ),
    ),
    Profile(
        key="950",
        model="Ascend 950 (Atlas 350)",
        pattern=r"Ascend950.*",
        capabilities=_caps(
            fp8=True,
            peak={"float8_e4m3fn": 1000.0, "float8_e5m2": 1000.0},
            memory_bytes=None,
            memory_gbps=None,
            link_gbps=None,
            maturity=Maturity.EXPERIMENTAL,
            incompatibilities=(
                (
                    "E8M0 scales use CANN's encoding (0x00 = 0, not 2^-127 as in OCP/ONNX): scales "
                    "are re-encoded when lowering"
                ),
                "HiFloat8 and FP4 E1M2 have no ONNX element type",
            ),
        ),
        source=(
            "formats: hiascend.com CANN type table (E4M3FN, E5M2, HiFloat8, E8M0, FP4); ~1000 FP8 "
            "TFLOPS secondary; memory left out: 128/144 GB (secondary, conflicting); interconnect "
            "figures not found, HCCS assumed (unverified)"
        ),
    ),
)

#: Any other Ascend SoC (310P, the original 910, ...): the base types only, no figures.
UNKNOWN = Profile(
    key="unknown",
    model="Ascend NPU (no profile)",
    pattern=r".*",
    capabilities=_caps(
        fp8=False,
        peak={},
        memory_bytes=None,
        memory_gbps=None,
        link_gbps=None,
        maturity=Maturity.EXPERIMENTAL,
        incompatibilities=("no capability profile for this SoC in hal_ascend.chips; formats assumed as 910B",),
        # Every Ascend card sits on PCIe; HCCS is not something to assume for an unknown part.
        link_kind=InterconnectKind.PCIE,
    ),
    source="no profile; base CANN types assumed",
)


def profile_for(soc_name: str) -> Profile:
    """The profile whose pattern matches the whole SoC name, else :data:`UNKNOWN`."""
    return next((p for p in PROFILES if p.matches(soc_name)), UNKNOWN)
