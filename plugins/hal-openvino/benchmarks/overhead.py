"""HAL overhead on openvino:CPU: ``Executable.run`` vs OpenVINO called directly, same compiled settings.

    HAL_LOAD_PLUGINS=openvino python plugins/hal-openvino/benchmarks/overhead.py [--repeat 7] [--number 2000]

Prints the median per-call time (us) of 7 repeats for: OpenVINO's ``compiled_model(feeds)``,
``request.infer(feeds, share_inputs=True)`` on a kept request, and ``hal`` ``exe.run(feeds)``, all
compiled with the plugin's exact-precision properties (``EXACT_PRECISION``), plus a kept request
compiled with ``INFERENCE_PRECISION_HINT=f32`` alone (the plugin's settings before those
properties) to show what they cost.
Models: a tiny MLP (batch 1, 2x Gemm 64 + Relu: overhead-bound) and the issue's MLP
(batch 32, 4x Gemm 1024 + GELU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import hal  # noqa: E402
from hal_openvino.backend import EXACT_PRECISION  # noqa: E402
from ov_models import mlp  # noqa: E402


def timed(fn, number: int, repeat: int) -> float:
    for _ in range(max(number // 10, 5)):
        fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    import openvino as ov

    core = ov.Core()
    for label, model, batch, number in (
        ("tiny MLP b1 64x2", mlp(batch=1, width=64, layers=2), 1, args.number),
        ("MLP b32 1024x4 GELU", mlp(batch=32, width=1024, layers=4), 32, max(args.number // 20, 20)),
    ):
        width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        x = np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)
        ov_model = core.read_model(model.SerializeToString(), b"")
        compiled = core.compile_model(ov_model, "CPU", {**EXACT_PRECISION, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        hint_only = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        hint_only_request = hint_only.create_infer_request()
        exe = hal.compile(model).to("openvino:CPU")
        ref = compiled({"x": x})[0]
        np.testing.assert_allclose(exe.run({"x": x})["y"], ref, rtol=1e-5, atol=1e-6)
        results = {
            "openvino compiled_model(feeds)": timed(lambda: compiled({"x": x}), number, args.repeat),
            "openvino request.infer(share_inputs=True)": timed(lambda: request.infer({"x": x}, share_inputs=True), number, args.repeat),
            "hal exe.run(feeds)": timed(lambda: exe.run({"x": x}), number, args.repeat),
            "openvino request.infer, f32 hint only": timed(
                lambda: hint_only_request.infer({"x": x}, share_inputs=True), number, args.repeat
            ),
        }
        for name, us in results.items():
            print(f"{label:22s} {name:44s} {us:9.1f} us")


if __name__ == "__main__":
    main()
