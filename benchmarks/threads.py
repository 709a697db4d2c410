"""One Executable called from many threads: how a runner shares its runtime requests, per device.

    HAL_LOAD_PLUGINS=openvino,iree python benchmarks/threads.py [--threads 8] [--calls 200] [--rounds 5] [--json out.json]

For each device and model, ways to make one executable safe from many threads, interleaved in
``--rounds`` rounds (each starting with another variant) so machine noise hits them alike,
all single-thread rounds before the multi-thread ones:

- ``shipped``: ``exe.run`` as shipped. OpenVINO: a pool of at most OPTIMAL_NUMBER_OF_INFER_REQUESTS
  infer requests; IREE: a VM context per concurrent caller; onnxruntime: the session (thread-safe).
- ``lock``: one request / context behind a ``threading.Lock`` (``runner.run_on``; for onnxruntime, a
  lock around ``runner.run``).
- ``per-caller`` (OpenVINO only): an infer request per concurrent caller, however many.

Single-thread latency is the median over rounds of the per-call mean (us); throughput is calls per
second with ``--threads`` threads of ``--calls`` calls each, every call on its own input and every
answer checked against the single-thread answer for that input. Models: a tiny MLP (batch 1,
2 x Gemm 64: overhead-bound) and the issue's MLP (batch 32, 4 x Gemm 1024 + GELU: compute-bound).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "plugins", "hal-openvino", "tests"))

import hal  # noqa: E402
from _machine import machine_info  # noqa: E402
from ov_models import mlp  # noqa: E402

Run = Callable[[dict[str, np.ndarray]], np.ndarray]
INPUTS = 16  # distinct inputs per thread


class LockedRunner:
    """The alternative to a pool: one runtime request (or context) behind a lock."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.lock = runner, threading.Lock()
        if hasattr(runner, "new_context"):  # IREE
            self.held = runner.new_context()
        elif hasattr(runner, "compiled"):  # OpenVINO
            self.held = runner.compiled.create_infer_request()
        else:  # onnxruntime: the session itself
            self.held = None

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        with self.lock:
            if self.held is None:
                return self.runner.run(feeds, output_names)
            return self.runner.run_on(self.held, feeds, output_names)


class PerCallerRunner:
    """An OpenVINO infer request per concurrent caller, made on demand and never limited."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.idle = runner, deque()

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        try:
            request = self.idle.pop()
        except IndexError:
            request = self.runner.compiled.create_infer_request()
        try:
            return self.runner.run_on(request, feeds, output_names)
        finally:
            self.idle.append(request)


def wrapped(exe: hal.Executable, runner: Any) -> hal.Executable:
    """The same executable (same feed checks) on another runner."""
    return hal.Executable(runner, exe.device, exe.inputs, exe.outputs)


def caller(exe: hal.Executable) -> Run:
    return lambda feeds: exe.run(feeds)["y"]


def latency_us(run: Run, feeds: dict[str, np.ndarray], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run(feeds)
    return (time.perf_counter() - start) / calls * 1e6


def throughput(run: Run, inputs: list[list[dict]], wants: list[list[np.ndarray]], calls: int) -> tuple[float, int]:
    """Calls per second over all threads, and how many answers were wrong."""
    wrong = [0] * len(inputs)
    barrier = threading.Barrier(len(inputs) + 1)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(calls):
            k = i % INPUTS
            if not np.array_equal(run(inputs[t][k]), wants[t][k]):
                wrong[t] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(inputs))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return len(inputs) * calls / (time.perf_counter() - start), sum(wrong)


def bench(device: str, label: str, model: Any, batch: int, args: argparse.Namespace, scale: int) -> dict[str, Any]:
    exe = hal.compile(model).to(device, strict=True)
    width = exe.inputs[0].shape[1]
    rng = np.random.default_rng(0)
    inputs = [[{"x": rng.standard_normal((batch, width)).astype(np.float32)} for _ in range(INPUTS)] for _ in range(args.threads)]
    wants = [[exe.run(f)["y"] for f in per_thread] for per_thread in inputs]
    variants = {"shipped": caller(exe), "lock": caller(wrapped(exe, LockedRunner(exe.runner)))}
    if hasattr(exe.runner, "compiled"):  # OpenVINO
        variants["per-caller"] = caller(wrapped(exe, PerCallerRunner(exe.runner)))
    single_calls, calls = max(args.calls * 10 // scale, 20), max(args.calls // scale, 10)
    lat: dict[str, list[float]] = {v: [] for v in variants}
    thr: dict[str, list[float]] = {v: [] for v in variants}
    wrong = dict.fromkeys(variants, 0)
    names = list(variants)

    def rotated(round_: int) -> list[str]:
        # Each round starts with another variant, so no variant always follows the same one.
        return names[round_ % len(names):] + names[: round_ % len(names)]

    # Single-thread rounds first: right after an 8-thread phase a single caller measured 15-20%
    # slower whichever variant it was (wakeups, caches), which is not the variant's cost.
    for run in variants.values():
        latency_us(run, inputs[0][0], max(single_calls // 10, 5))
    for round_ in range(args.rounds):
        for name in rotated(round_):
            lat[name].append(latency_us(variants[name], inputs[0][0], single_calls))
    for run in variants.values():  # warm up (and let the pools grow)
        throughput(run, inputs, wants, 5)
    for round_ in range(args.rounds):
        for name in rotated(round_):
            rate, bad = throughput(variants[name], inputs, wants, calls)
            thr[name].append(rate)
            wrong[name] += bad
    row = {"device": device, "model": label}
    for name in variants:
        row[f"{name}_us"] = round(statistics.median(lat[name]), 1)
        row[f"{name}_calls_per_s"] = round(statistics.median(thr[name]), 1)
        row[f"{name}_wrong"] = wrong[name]
    for name in variants:
        row[f"{name}_throughput_vs_lock"] = round(row[f"{name}_calls_per_s"] / row["lock_calls_per_s"], 3)
    row["shipped_latency_vs_lock"] = round(row["shipped_us"] / row["lock_us"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="calls per thread per round (tiny model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", nargs="*", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    devices = args.devices or [d.id for d in hal.devices() if d.available and d.id in ("ort:cpu", "openvino:CPU", "iree:local-task")]
    rows = []
    for device in devices:
        for label, model, batch, scale in (
            ("tiny MLP b1 64x2", mlp(batch=1, width=64, layers=2), 1, 1),
            ("MLP b32 1024x4 GELU", mlp(batch=32, width=1024, layers=4), 32, 20),
        ):
            row = bench(device, label, model, batch, args, scale)
            rows.append(row)
            one = "  ".join(f"{v} {row[v + '_us']:.1f}" for v in ("shipped", "lock", "per-caller") if v + "_us" in row)
            many = "  ".join(
                f"{v} {row[v + '_calls_per_s']:.1f} (x{row[v + '_throughput_vs_lock']:.2f}, {row[v + '_wrong']} wrong)"
                for v in ("shipped", "lock", "per-caller") if v + "_us" in row
            )
            print(f"{device:16s} {label:20s} 1 thread us: {one} | {args.threads} threads calls/s: {many}", flush=True)
    result = {"machine": machine_info(), "threads": args.threads, "rounds": args.rounds, "rows": rows}
    print(json.dumps(result["machine"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
