"""A fleet you do not own yet: one transformer, compiled once, placed on a simulated NVIDIA H100,
a simulated Huawei Ascend 910C and this machine's CPU.

    pip install -e plugins/hal-sim        # the simulated chips (profiles from shared figures)
    python examples/fleet.py

The model carries FP8 weights with float32 128x128 block scales, as DeepSeek-V3 ships them. For
each device the example prints what lowering had to change (the H100 keeps FP8; the 910C has no
FP8, so the weights are dequantized at compile time; the CPU runs FP8 weights through
DequantizeLinear), the estimated speed relative to the H100 (a roofline from each profile's
datasheet figures: an estimate, labelled as one, never a measurement), where the nodes ran, and
whether the answers agree with the CPU's. Simulated devices compute on this CPU through
onnxruntime; their profiles are enforced (formats, memory, operators), not their speed.
"""

from __future__ import annotations

import os
import sys

# Which simulated chips exist is read when the HAL first loads its plugins.
os.environ.setdefault("HAL_SIM_DEVICES", "h100,ascend-910c")

import numpy as np  # noqa: E402

import hal  # noqa: E402
import hal.quantize  # noqa: E402
from hal.testing import models  # noqa: E402

DEVICES = ("sim:h100:0", "sim:ascend-910c:0", "ort:cpu")
BASELINE = "sim:h100:0"


def main() -> int:
    known = {d.id: d for d in hal.devices()}
    missing = [d for d in DEVICES if d not in known or not known[d].available]
    if missing:
        why = "; ".join(f"{d}: {known[d].reason}" if d in known else f"{d}: not registered" for d in missing)
        print(f"cannot place on {', '.join(missing)} ({why}).\n"
              "Install the simulator with `pip install -e plugins/hal-sim` and keep HAL_LOAD_PLUGINS unset "
              "or include 'sim' in it.", file=sys.stderr)
        return 1

    # Wide enough that the matrix products, not kernel launches, dominate on a datacenter chip.
    transformer = models.transformer_encoder(batch=4, seq=256, d_model=1024, heads=16, layers=2, ff=4096)
    fp8 = hal.quantize.fp8(transformer, format="e4m3fn", scale="float32", block=(128, 128))
    compiled = hal.compile(fp8)  # once, for every device below
    feeds = models.random_feeds(transformer)
    shapes = {name: value.shape for name, value in feeds.items()}

    placed = {device: compiled.to(device, strict=True) for device in DEVICES}
    reference = placed["ort:cpu"].run(feeds)
    estimates = {}
    for device, exe in placed.items():
        try:
            estimates[device] = exe.estimate(shapes)
        except hal.errors.DeviceError:
            estimates[device] = None  # this device declares no figures to estimate from

    base = estimates[BASELINE]
    for device, exe in placed.items():
        print(f"\n{device}: {exe.device.vendor} {exe.device.name}")
        changed = [step for step in exe.lowering if step.kind not in ("verified", "unverified")]
        for step in changed:
            print(f"  lowering  {step.kind}: {step.detail}")
        if not changed:
            print("  lowering  nothing: the model runs as written")
        if exe.verification is not None:
            print(f"  verified  {exe.verification.summary()}")
        est = estimates[device]
        if est is None:
            print("  speed     no estimate: the device declares no peak throughput or bandwidth")
        else:
            print(f"  speed     {base.seconds / est.seconds:.2f} x {BASELINE} ({est})")
            for assumption in est.assumptions:
                print(f"            assumed: {assumption}")
        for placement in exe.placement:
            print(f"  placement {len(placement.nodes)} nodes on {placement.device}")
        out = exe.run(feeds)
        worst = max(
            float(np.max(np.abs(out[n] - reference[n])) / max(float(np.max(np.abs(reference[n]))), 1e-30))
            for n in reference
        )
        print(f"  answers   {'agree' if worst <= 1e-4 else 'DIFFER'} with ort:cpu (max error {worst:.1e} of the largest output)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
