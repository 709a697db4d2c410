"""Issue 12, item 5 on openvino:CPU: quantized models run within the accuracy report's tolerance
of the float32 model and agree with ort:cpu's answer for the quantized model; the lowering is
what the device declares (OpenVINO holds FP8 and runs DequantizeLinear with the scaled formats
it declares; UE8M0 scales it does not declare become float32)."""

from __future__ import annotations

import numpy as np
import pytest

import hal
import hal.quantize
from hal.plugin import NumberFormat, StepKind, Support
from hal.testing import models

E8M0 = NumberFormat("float8_e8m0")


def relative(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def mlp():
    model = models.mlp(batch=4, width=128, layers=2)
    return model, models.random_feeds(model)


@pytest.mark.parametrize(("fmt", "scale", "block", "keep"), [
    ("e4m3fn", "float32", (128, 128), False), ("e4m3fn", "ue8m0", (1, 32), True), ("e5m2", "ue8m0", (1, 32), True),
])
def test_quantized_mlp_within_the_reported_error(cpu, mlp, fmt, scale, block, keep):
    model, feeds = mlp
    fp8 = hal.quantize.fp8(model, format=fmt, scale=scale, block=block, keep_e8m0=keep)
    report = hal.quantize.accuracy(model, fp8, feeds=feeds)
    reference = hal.compile(model).to("ort:cpu").run(feeds)["y"]
    on_cpu = hal.compile(fp8).to("ort:cpu").run(feeds)["y"]
    exe = hal.compile(fp8).to("openvino:CPU", strict=True)
    out = exe.run(feeds)["y"]
    assert exe.verification is not None and exe.verification.passed
    assert relative(out, reference) <= report.end_to_end * 1.001
    assert relative(out, on_cpu) < 1e-5  # float32 rounding: the device computes the quantized model right
    element = NumberFormat(f"float8_{fmt}")
    caps = cpu.capabilities
    assert caps.support(element) is not Support.NONE  # FP8 weights kept, not dequantized
    steps = [s.detail for s in exe.lowering if s.kind is StepKind.LEGALIZE_SCALED]
    takes_e8m0 = any(s.element is element and s.scale is E8M0 and s.support is not Support.NONE for s in caps.scaled)
    if keep and not takes_e8m0:
        assert len(steps) == 1 and "UE8M0 scales converted to float32" in steps[0]
    else:
        assert not steps
