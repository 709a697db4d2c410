"""The embedded default backend: onnxruntime's CPU execution provider, device ``ort:cpu``.

It is a plugin like any other (listed in ``hal._plugins.DEFAULT_PLUGINS``), registered through
``hal_register_backends``; that keeps the contract honest.

The declared format table is what onnxruntime's CPU kernels really do, checked by
``tests/test_backend_cpu.py``: float16 builds but is computed through inserted float32 casts
(emulated); bfloat16, FP8 and 4-bit types only cast and (de)quantize (storage); float8_e8m0 and
2-bit types need opset 25 for Cast; float4_e2m1 and float6 have no kernels at all. At discovery
the table is fitted to the installed onnxruntime (:func:`hal.backends.onnxruntime.fit_capabilities`:
its newest IR version and opset, float8_e8m0 only where its kernels exist). Graph inputs and
outputs may be sequences and optionals (``io_kinds``), which onnxruntime's ``run`` passes as lists
and None.
"""

from __future__ import annotations

import os
import platform

from attrs import evolve

from hal.plugin import (
    ORT_IO_KINDS, Capabilities, Device, DeviceKind, Memory, OpsetRange, OrtBackend, ScaledFormat, Support,
    fit_capabilities, hookimpl,
)

CPU_CAPABILITIES = Capabilities.from_levels(
    native=[
        "float32",
        "float64",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "bool",
    ],
    emulated=["float16"],
    storage=[
        "string",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0",
        "int4",
        "uint4",
        "int2",
        "uint2",
    ],
    # Blocked Quantize/DequantizeLinear run (opset 21-25), computed in float32.
    scaled=[
        ScaledFormat(element, scale, block, Support.EMULATED)
        for element in ("float8_e4m3fn", "float8_e5m2", "int8", "int4")
        for scale in ("float32", "float16")
        for block in ((1, 32), (1, 128), (128, 128))
    ],
    # com.microsoft: onnxruntime's contrib operators (Gelu, FusedMatMul, ...), which its own
    # graph optimizer and transformer exporters write.
    opsets=OpsetRange(7, 25, domains=("com.microsoft",)),
    # Sequences and optionals as graph inputs and outputs: onnxruntime's run takes and returns
    # lists and None, and OrtRunner passes them.
    io_kinds=ORT_IO_KINDS,
)


def runtime_capabilities() -> Capabilities:
    """What the installed onnxruntime's CPU provider computes (:data:`CPU_CAPABILITIES` fitted to
    the installed version), without a device's memory: the engine under a simulated device
    (:func:`hal.plugin.emulate`)."""
    return fit_capabilities(CPU_CAPABILITIES)


class CpuBackend(OrtBackend):
    name = "ort"

    def discover(self) -> list[Device]:
        caps = evolve(CPU_CAPABILITIES, memory=Memory.host())
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return [
                Device(
                    "ort:cpu", self.name, "onnxruntime", platform.processor() or platform.machine(), "cpu",
                    caps, available=False, reason=f"onnxruntime does not import ({exc}); pip install onnxruntime",
                )
            ]
        available = "CPUExecutionProvider" in ort.get_available_providers()
        caps = fit_capabilities(caps)
        return [
            Device(
                id="ort:cpu",
                backend=self.name,
                vendor="onnxruntime",
                name=platform.processor() or platform.machine(),
                kind=DeviceKind.CPU,
                capabilities=caps,
                available=available,
                reason=None if available else "this onnxruntime build has no CPUExecutionProvider",
                details={"onnxruntime": ort.__version__, "cores": os.cpu_count() or 0},
            )
        ]


@hookimpl
def hal_register_backends(register):  # type: ignore[no-untyped-def]
    register(CpuBackend())
