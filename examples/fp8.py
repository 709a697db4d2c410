"""One FP8 model, every chip: quantize a transformer with UE8M0 block scales, measure what that
costs, and run it on each device the HAL can see, each fitted to what the chip declares.

    python examples/fp8.py
    pip install -e plugins/hal-sim plugins/hal-openvino plugins/hal-iree   # more devices
    python examples/fp8.py

The story: a model generation moved its FP8 weights' block scales to UE8M0 (powers of two, an
exponent byte each) "for the next generation of domestic chips", keeping DeepSeek-V3's 128x128
weight blocks. One such model, in standard ONNX (DequantizeLinear with block_size and
FLOAT8E8M0 scales), then has to run on chips that disagree about every part of it:

- NVIDIA H100 computes E4M3 but takes float32 scales: the UE8M0 scales become float32 (exact);
- NVIDIA B200 takes MX formats, UE8M0 scales and all: nothing changes;
- AMD MI300X has only the FNUZ variants: values halved, scales doubled (exact);
- Huawei Ascend 910C has no FP8 at all: weights dequantized at compile time (exact);
- Huawei Ascend 950 takes UE8M0 but reads the byte 0x00 as zero (CANN): scale bytes re-encoded;
- the CPU runtimes have no kernel for some of it (onnxruntime: no E8M0 scale; IREE: no blocked
  DequantizeLinear): lowered around, exactly.

For each device the example prints what lowering changed, the verification verdict (the device
against a reference on seeded inputs, at to()), and the end-to-end error against the float32
model, which must be the error the accuracy report measured: the device computes the quantized
model right, and the quantization's error is the model's. The H100, B200, MI300X and Ascend
chips are simulated (hal-sim: their declared formats are enforced; they compute on this CPU).
"""

from __future__ import annotations

import os
import sys

# Which simulated chips exist is read when the HAL first loads its plugins.
os.environ.setdefault("HAL_SIM_DEVICES", "h100,b200,mi300x,ascend-910c,ascend-950")

import numpy as np  # noqa: E402

import hal  # noqa: E402
import hal.quantize  # noqa: E402
from hal.testing import models  # noqa: E402

DEVICES = (
    "ort:cpu", "openvino:CPU", "iree:local-task",
    "sim:h100:0", "sim:b200:0", "sim:mi300x:0", "sim:ascend-910c:0", "sim:ascend-950:0",
)
#: How far a device's end-to-end error may exceed the reported one: float32 rounding, not FP8.
SLACK = 1e-3


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    out64, ref64 = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out64 - ref64) / np.linalg.norm(ref64))


def main() -> int:
    transformer = models.transformer_encoder(batch=2, seq=64, d_model=256, heads=4, layers=2, ff=1024)
    fp8 = hal.quantize.fp8(transformer, format="e4m3fn", scale="ue8m0", block=(128, 128), keep_e8m0=True)
    feeds = models.random_feeds(transformer)

    report = hal.quantize.accuracy(transformer, fp8, feeds=feeds)
    print("accuracy report (FP8 E4M3, UE8M0 scales rounded up, 128x128 blocks):")
    for line in report.lines():
        print(f"  {line}")
    tolerance = report.end_to_end
    assert tolerance is not None, report.note

    known = {d.id: d for d in hal.devices()}
    present = [d for d in DEVICES if d in known and known[d].available]
    reference = hal.compile(transformer).to("ort:cpu").run(feeds)["y"]  # the float32 model
    compiled = hal.compile(fp8)  # once, for every device below
    on_cpu = None
    failed = []
    for device in present:
        print(f"\n{device}: {known[device].vendor} {known[device].name}")
        try:
            exe = compiled.to(device, strict=True)
        except hal.errors.HalError as exc:  # refused: the reason, never a wrong answer
            print(f"  refused   {exc}")
            continue
        changed = [step for step in exe.lowering if step.kind not in ("verified", "unverified")]
        for step in changed:
            print(f"  lowering  {step.kind}: {step.detail}")
        if not changed:
            print("  lowering  nothing: the device takes the model as written")
        if exe.verification is not None:
            print(f"  verified  {exe.verification.summary()}")
        out = exe.run(feeds)["y"]
        on_cpu = out if device == "ort:cpu" else on_cpu
        error = relative_error(out, reference)
        within = error <= tolerance * (1 + SLACK)
        failed += [] if within else [device]
        print(f"  error     {error:.4g} against the float32 model; reported {tolerance:.4g}: "
              f"{'within' if within else 'BEYOND'} it")
        if on_cpu is not None and device != "ort:cpu":
            print(f"  ort:cpu   the quantized model's answers differ by {relative_error(out, on_cpu):.1e} (float32 rounding)")

    absent = [d for d in DEVICES if d not in present]
    if absent:
        print(f"\nnot here: {', '.join(absent)}")
        print("  for more devices: pip install -e plugins/hal-sim plugins/hal-openvino plugins/hal-iree "
              "(and keep HAL_LOAD_PLUGINS unset, or name sim, openvino and iree in it)")
    if failed:
        print(f"\n{', '.join(failed)}: end-to-end error beyond the reported tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
