"""What isolation costs (issue 13 item 4): per call and at start-up, on the three benchmark models.

    HAL_LOAD_PLUGINS= python benchmarks/isolation_cost.py [--calls 200] [--rounds 5] [--json out.json]

Per model, on ort:cpu: ``to(device)`` against ``to(device, isolate=True)`` (warm compile cache,
verify=False: start-up is the worker's spawn, imports and its own prepare), then single-thread
``run`` p50 of both, interleaved in rounds so machine noise hits them alike; the table gives the
median over rounds of each round's p50, and the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def p50_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import hal
    from _machine import machine_info
    from hal.testing import models
    from hal.verification import seeded_feeds

    rows = []
    for label, proto in (("mlp", models.mlp()), ("resnet18_like", models.resnet18_like()),
                         ("transformer_encoder", models.transformer_encoder())):
        compiled = hal.compile(proto)
        compiled.to("ort:cpu", verify=False)  # warm the compile cache for both
        start = time.perf_counter()
        direct = compiled.to("ort:cpu", verify=False)
        to_direct = time.perf_counter() - start
        start = time.perf_counter()
        isolated = compiled.to("ort:cpu", verify=False, isolate=True)
        to_isolated = time.perf_counter() - start
        feeds = seeded_feeds(compiled.inputs)
        nbytes = sum(v.nbytes for v in feeds.values()) + sum(v.nbytes for v in direct.run(feeds).values())
        for exe in (direct, isolated):
            for _ in range(5):
                exe.run(feeds)  # warm-up
        a, b = [], []
        for _ in range(args.rounds):
            a.append(p50_ms(lambda: direct.run(feeds), args.calls))
            b.append(p50_ms(lambda: isolated.run(feeds), args.calls))
        row = {
            "model": label,
            "bytes_moved_per_call": nbytes,
            "to_ms": round(to_direct * 1e3, 1),
            "to_isolated_ms": round(to_isolated * 1e3, 1),
            "worker_start_ms": round(isolated.runner.start_seconds * 1e3, 1),
            "run_p50_ms": round(statistics.median(a), 3),
            "run_isolated_p50_ms": round(statistics.median(b), 3),
        }
        row["added_ms"] = round(row["run_isolated_p50_ms"] - row["run_p50_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        isolated.runner.close()
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "calls": args.calls, "rounds": args.rounds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
