"""How honest the roofline estimate is: measured latency on the CPU devices we really have against
``hal.estimate`` from a CPU profile measured once on this machine.

    HAL_LOAD_PLUGINS=openvino python benchmarks/estimate_honesty.py --runs 50

Target (issue 11): the estimate within 2x of the measured p50 (ratio measured/estimated between
0.5 and 2) on the three benchmark models, on ort:cpu and openvino:CPU.

The CPU profile, measured first, through onnxruntime on all usable cores:

- peak float32 throughput: square MatMuls of 256 to 2048 (the best of several runs and sizes, as
  a datasheet's peak is a best case);
- memory bandwidth: Add over two 16M-element float32 arrays (192 MiB moved per run; past any
  cache), bytes moved over the best time;
- launch overhead: a chain of 200 Relu nodes on one element, time per node.

The roofline then estimates each model as lowered for each device (:mod:`hal.estimate`), and each
device runs it ``--runs`` times after warm-up (medians). Ratios are printed and, with ``--json``,
written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
from _machine import machine_info
from onnx import TensorProto, helper

MODELS = ("mlp", "resnet18_like", "transformer_encoder")


def _session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # measure the kernels as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _best(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _model(nodes: list[Any], inputs: list[tuple[str, list[int]]], output: tuple[str, list[int]]) -> Any:
    graph = helper.make_graph(
        nodes, "probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def cpu_profile(repeats: int = 10) -> dict[str, float]:
    """Peak float32 TFLOPS, memory bandwidth in GB/s and launch overhead in microseconds, measured."""
    peak = 0.0
    for n in (256, 512, 1024, 2048):
        mm = _session(_model([helper.make_node("MatMul", ["a", "b"], ["c"])], [("a", [n, n]), ("b", [n, n])], ("c", [n, n])))
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        peak = max(peak, 2 * n**3 / _best(lambda: mm.run(None, {"a": a, "b": a}), repeats) / 1e12)  # noqa: B023

    m = 16 * 2**20
    add = _session(_model([helper.make_node("Add", ["x", "y"], ["z"])], [("x", [m]), ("y", [m])], ("z", [m])))
    x = np.ones(m, np.float32)
    bandwidth = 3 * 4 * m / _best(lambda: add.run(None, {"x": x, "y": x}), repeats) / 1e9

    chain = 200
    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(chain)]
    relus = _session(_model(nodes, [("v0", [1])], (f"v{chain}", [1])))
    one = np.ones(1, np.float32)
    empty = _session(_model([helper.make_node("Relu", ["v0"], ["v1"])], [("v0", [1])], ("v1", [1])))
    per_node = (_best(lambda: relus.run(None, {"v0": one}), repeats * 10)
                - _best(lambda: empty.run(None, {"v0": one}), repeats * 10)) / (chain - 1)
    return {"peak_tflops_float32": peak, "bandwidth_gbps": bandwidth, "launch_overhead_us": per_node * 1e6}


def measure(exe: Any, feeds: dict[str, Any], runs: int) -> float:
    for _ in range(3):
        exe.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        exe.run(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--devices", default="ort:cpu,openvino:CPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import attrs

    import hal
    from hal.capabilities import Memory
    from hal.estimate import estimate
    from hal.testing import models

    profile = cpu_profile()
    rows = []
    available = {d.id: d for d in hal.devices() if d.available}
    for name in MODELS:
        model = getattr(models, name)()
        feeds = models.random_feeds(model)
        compiled = hal.compile(model)
        for device_id in args.devices.split(","):
            if device_id not in available:
                continue
            exe = compiled.to(device_id, strict=True)
            caps = attrs.evolve(
                exe.device.capabilities,
                peak_tflops={"float32": profile["peak_tflops_float32"]},
                memory=Memory(bandwidth_gbps=profile["bandwidth_gbps"]),
                launch_overhead_us=profile["launch_overhead_us"],
            )
            lowered = exe._model  # the model as lowered for this device: what it really runs
            est = estimate(lowered, caps, {k: v.shape for k, v in feeds.items()})
            measured = measure(exe, feeds, args.runs)
            rows.append({
                "model": name, "device": device_id, "measured_p50_ms": measured * 1e3,
                "estimated_ms": est.seconds * 1e3, "measured_over_estimated": measured / est.seconds,
                "bound_by": est.bound_by(),
            })
    result = {"machine": machine_info(), "profile": profile, "runs": args.runs, "rows": rows}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        return 0
    p = profile
    print(f"CPU profile: {p['peak_tflops_float32'] * 1e3:.0f} GFLOPS float32, {p['bandwidth_gbps']:.1f} GB/s, "
          f"{p['launch_overhead_us']:.2f} us per node")
    print(f"{'model':22} {'device':14} {'measured p50':>13} {'estimated':>10} {'measured/est':>13}  bound")
    for r in rows:
        bounds = ", ".join(f"{k} {v}" for k, v in sorted(r["bound_by"].items()))
        print(f"{r['model']:22} {r['device']:14} {r['measured_p50_ms']:10.3f} ms {r['estimated_ms']:7.3f} ms "
              f"{r['measured_over_estimated']:12.2f}x  {bounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
