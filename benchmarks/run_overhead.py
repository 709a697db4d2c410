"""What Executable.run adds to onnxruntime's own call, on a one-Add model.

    python benchmarks/run_overhead.py [--calls 20000] [--rounds 15]

Rounds interleave the three callers so machine noise hits them alike; the table gives medians
over rounds of the per-call mean. Target (issue 2): at most 1 us added per call over
InferenceSession.run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import hal


def one_add():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    model = one_add()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    raw = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    exe = hal.compile(model).to("ort:cpu", intra_op_num_threads=1)
    feeds = {"x": np.ones(4, np.float32), "y": np.ones(4, np.float32)}
    np.testing.assert_array_equal(exe.run(feeds)["z"], raw.run(None, feeds)[0])

    # What the HAL calls underneath: the C++ binding, without InferenceSession.run's Python checks.
    inner, run_options = raw._sess.run, ort.RunOptions()
    callers = {
        "onnxruntime InferenceSession.run": lambda: raw.run(None, feeds),
        "onnxruntime binding (InferenceSession._sess.run)": lambda: inner(["z"], feeds, run_options),
        "hal Executable.run": lambda: exe.run(feeds),
        "hal Executable.run(output_names=['z'])": lambda: exe.run(feeds, ["z"]),
    }
    samples: dict[str, list[float]] = {name: [] for name in callers}
    for fn in callers.values():
        per_call_us(fn, 2000)  # warm-up
    for _ in range(args.rounds):
        for name, fn in callers.items():
            samples[name].append(per_call_us(fn, args.calls))

    base = statistics.median(samples["onnxruntime InferenceSession.run"])
    print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, "
          f"{args.rounds} interleaved rounds x {args.calls} calls")
    print("| caller | median us/call | added vs ORT run (us) |")
    print("|---|---|---|")
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {med - base:+.2f} |")


if __name__ == "__main__":
    main()
