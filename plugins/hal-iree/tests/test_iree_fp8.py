"""Issue 12, item 5 on iree:local-task: quantized models run within the accuracy report's
tolerance of the float32 model and agree with ort:cpu's answer for the quantized model. IREE's
ONNX importer has no per-axis or blocked DequantizeLinear; the device declares no scaled format,
so the core spells those as Cast and Mul (exact) and the FP8 weights stay FP8."""

from __future__ import annotations

import numpy as np
import pytest

import hal
import hal.quantize
from hal.plugin import NumberFormat, StepKind, Support
from hal.testing import models

from iree_helpers import to_strict


def relative(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def mlp():
    model = models.mlp(batch=4, width=128, layers=2)
    return model, models.random_feeds(model)


@pytest.mark.parametrize(("scale", "block", "keep"), [("float32", (128, 128), False), ("ue8m0", (1, 32), True),
                                                      ("float32", "channel", False)])
def test_quantized_mlp_within_the_reported_error(mlp, scale, block, keep):
    model, feeds = mlp
    fp8 = hal.quantize.fp8(model, format="e4m3fn", scale=scale, block=block, keep_e8m0=keep)
    report = hal.quantize.accuracy(model, fp8, feeds=feeds)
    reference = hal.compile(model).to("ort:cpu").run(feeds)["y"]
    on_cpu = hal.compile(fp8).to("ort:cpu").run(feeds)["y"]
    exe = to_strict(hal.compile(fp8), "iree:local-task")
    out = exe.run(feeds)["y"]
    assert exe.verification is not None and exe.verification.passed
    assert relative(out, reference) <= report.end_to_end * 1.001
    assert relative(out, on_cpu) < 1e-5  # float32 rounding: the device computes the quantized model right
    caps = exe.device.capabilities
    element = NumberFormat("float8_e4m3fn")
    steps = [s.detail for s in exe.lowering if s.kind is StepKind.LEGALIZE_SCALED]
    if caps.support(element) is not Support.NATIVE and not [s for s in caps.scaled if s.element is element]:
        assert len(steps) == 1 and "Cast and Mul" in steps[0] and "FP8 kept" in steps[0]
        assert ("UE8M0" in steps[0]) == keep
    else:  # a build that declares scaled formats takes the model as written
        assert not steps
