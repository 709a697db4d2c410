"""What ``hal bench`` adds to a device's p50 against calling ``Executable.run`` in a loop.

    python benchmarks/bench_overhead.py                                  # ort:cpu, the three models
    HAL_LOAD_PLUGINS=openvino,iree python benchmarks/bench_overhead.py --repeats 5 --json out.json
    python benchmarks/bench_overhead.py --devices ort:cpu --models mlp --repeats 3

Target (issue 11): hal bench's p50 is at most 1.05x the plain loop's, on every device.

In one process, for each (device, model) from ``hal.testing.models`` at the benchmark sizes
(MLP 4 x 1024 batch 32, ResNet-18-like 1x3x224x224, transformer encoder 4 layers), repeated
``--repeats`` times with the two in alternating order (so load from other users of the machine
falls on both alike):

- **plain**: an executable placed once (``compiled.to(device, strict=True)``) runs
  :data:`hal.bench.WARMUP_RUNS` untimed runs, then ``runs`` timed ones, each timed by its own pair
  of ``perf_counter`` calls: what a user's own loop measures;
- **bench**: ``hal.bench.bench(compiled, [device], runs=runs, progress=...)`` end to end (cold
  and warm ``to()``, the peak-memory reading, chunked timing with a progress callback as the CLI
  gives one), its p50.

Reported: the median over repeats of each p50, their ratio, and the median of the per-repeat
ratios. Feeds are the same seeded arrays for both (``hal.testing.models.random_feeds``, seed 0).

The two executables are different sessions, and on a shared 2-core machine the noise between
repeats can exceed 5%. ``--loop-only`` isolates what the bench's timing adds: on one executable,
the bench's own timing loop (``hal.bench._time_runs``: warm-up, chunks, one ``perf_counter`` and
append per run, a progress callback between chunks) against the plain loop, alternating, with
``--repeats`` pairs; no placement, so many repeats are cheap.

``--per-call`` measures the loop's own cost without the models' noise: on the one-Add model
(float32[4], about 10 µs a run), ``--repeats`` alternating rounds of 20000 runs, mean µs per run of
a bare ``for _ in range(n): exe.run(feeds)`` timed as a whole against the bench's timing loop
(``Latency.elapsed / runs``); best and median round. The difference is what the bench adds to
every run, to set against each device's p50 above.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from _machine import load_average, machine_info

MODELS = ("mlp", "resnet18_like", "transformer_encoder")
#: Timed runs per measurement, by model: about 1-2 s of runs on ort:cpu on a 2-core machine.
RUNS = {"mlp": 300, "resnet18_like": 40, "transformer_encoder": 20}
#: Devices measured when present (HAL_LOAD_PLUGINS=openvino,iree loads the other two).
DEVICES = ("ort:cpu", "openvino:CPU", "iree:local-task")
TARGET = 1.05


def plain_p50(exe: Any, feeds: dict[str, Any], runs: int) -> float:
    from hal.bench import WARMUP_RUNS

    run = exe.run
    for _ in range(WARMUP_RUNS):
        run(feeds)
    clock = time.perf_counter
    times = []
    append = times.append
    for _ in range(runs):
        start = clock()
        run(feeds)
        append(clock() - start)
    return statistics.median(times)


def bench_p50(compiled: Any, device: str, runs: int) -> float:
    from hal.bench import bench

    calls = []
    report = bench(compiled, [device], runs=runs, progress=lambda *event: calls.append(event))
    row = report.rows[0]
    if row.latency is None:
        msg = f"{device}: {row.error}"
        raise RuntimeError(msg)
    return row.latency.p50


def loop_p50(exe: Any, feeds: dict[str, Any], runs: int) -> float:
    from hal.bench import _time_runs

    calls = []
    return _time_runs(exe, feeds, runs, None, lambda done, total: calls.append(done)).p50


def measure(device: str, name: str, repeats: int, runs: int, loop_only: bool = False) -> dict[str, Any]:
    import hal
    from hal.testing import models

    model = getattr(models, name)()
    feeds = models.random_feeds(model, seed=0)
    compiled = hal.compile(model)
    exe = compiled.to(device, strict=True)
    plain, benched = [], []
    for i in range(repeats):
        order = ("plain", "bench") if i % 2 == 0 else ("bench", "plain")
        for which in order:
            if which == "plain":
                plain.append(plain_p50(exe, feeds, runs))
            elif loop_only:
                benched.append(loop_p50(exe, feeds, runs))
            else:
                benched.append(bench_p50(compiled, device, runs))
        print(f"  {device} {name} repeat {i + 1}/{repeats}: plain {plain[-1] * 1e3:.3f} ms, bench {benched[-1] * 1e3:.3f} ms"
              f" (load {load_average()})", file=sys.stderr, flush=True)
    ratios = [b / p for b, p in zip(benched, plain)]
    return {
        "device": device,
        "model": name,
        "what": "bench timing loop on the same executable" if loop_only else "hal.bench.bench end to end",
        "runs": runs,
        "repeats": repeats,
        "plain_p50_ms": [p * 1e3 for p in plain],
        "bench_p50_ms": [b * 1e3 for b in benched],
        "plain_median_ms": statistics.median(plain) * 1e3,
        "bench_median_ms": statistics.median(benched) * 1e3,
        "ratio_of_medians": statistics.median(benched) / statistics.median(plain),
        "median_ratio": statistics.median(ratios),
    }


def per_call(device: str, repeats: int, runs: int = 20000) -> dict[str, Any]:
    import hal
    from hal.bench import _time_runs
    from hal.testing import models

    model = models.add()
    feeds = models.random_feeds(model, seed=0)
    exe = hal.compile(model).to(device, strict=True)
    bare, loop = [], []
    run = exe.run
    for i in range(repeats):
        for which in (("bare", "loop") if i % 2 == 0 else ("loop", "bare")):
            if which == "bare":
                for _ in range(1000):
                    run(feeds)
                start = time.perf_counter()
                for _ in range(runs):
                    run(feeds)
                bare.append((time.perf_counter() - start) / runs)
            else:
                latency = _time_runs(exe, feeds, runs, None, lambda done, total: None)
                loop.append(latency.elapsed / latency.runs)
    result = {
        "device": device, "model": "add", "runs": runs, "repeats": repeats,
        "bare_us": [b * 1e6 for b in bare], "loop_us": [b * 1e6 for b in loop],
        "bare_best_us": min(bare) * 1e6, "loop_best_us": min(loop) * 1e6,
        "bare_median_us": statistics.median(bare) * 1e6, "loop_median_us": statistics.median(loop) * 1e6,
    }
    print("| device | bare loop µs/run best / median | bench loop µs/run best / median | added µs best / median |")
    print("|---|---:|---:|---:|")
    print(f"| {device} | {result['bare_best_us']:.2f} / {result['bare_median_us']:.2f} | {result['loop_best_us']:.2f} / "
          f"{result['loop_median_us']:.2f} | {result['loop_best_us'] - result['bare_best_us']:+.2f} / "
          f"{result['loop_median_us'] - result['bare_median_us']:+.2f} |")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", help="device ids (default: those of DEVICES that are available)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--runs-scale", type=float, default=1.0, help="multiply each model's timed runs")
    parser.add_argument("--loop-only", action="store_true", help="the bench's timing loop on the plain loop's executable")
    parser.add_argument("--per-call", action="store_true", help="µs the bench's loop adds per run, on the one-Add model")
    parser.add_argument("--json", help="write the results and the machine to this file")
    args = parser.parse_args(argv)
    if args.per_call:
        results = [per_call(d, args.repeats) for d in (args.devices or ["ort:cpu"])]
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine_info(), "load_average_end": load_average(), "results": results}, f, indent=2)
        return 0

    import hal

    available = {d.id for d in hal.devices() if d.available}
    devices = args.devices or [d for d in DEVICES if d in available]
    machine = machine_info()
    results = []
    for device in devices:
        for name in args.models:
            runs = max(1, round(RUNS[name] * args.runs_scale))
            results.append(measure(device, name, args.repeats, runs, args.loop_only))
    print("| device | model | runs | plain p50 ms | bench p50 ms | bench/plain (medians) | median of ratios |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['device']} | {r['model']} | {r['runs']} | {r['plain_median_ms']:.3f} | {r['bench_median_ms']:.3f} "
              f"| {r['ratio_of_medians']:.3f} | {r['median_ratio']:.3f} |")
    worst = max((r["ratio_of_medians"] for r in results), default=float("nan"))
    print(f"\nworst bench/plain: {worst:.3f} (target <= {TARGET}); load average at the end {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "load_average_end": load_average(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
