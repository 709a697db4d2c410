"""Failover under load (issue 13 item 5): threads x requests over three simulated chips with
injected faults, every answer counted and compared with ort:cpu's.

    HAL_LOAD_PLUGINS=sim python benchmarks/failover.py [--threads 8] [--requests 2000] [--json out.json]

Scenarios, each on the same requests (feeds cycle through 64 seeded sets, whose ort:cpu answers
are computed first):

- ``direct``: ``exe.run`` on ort:cpu, no pool: the baseline latency;
- ``pool, no faults``: the same devices as below, no faults: what the pool's machinery costs;
- ``faults``: sim:ascend-910c:0, sim:h100:0, sim:mi300x:0 each with 5% errors, 5% hangs (0.5 s,
  past the attempt's share of the 1 s deadline), 5% NaN answers; the Ascend dies after
  ``requests * threads / 2`` runs; ort:cpu last as the device of last resort;
- ``isolated crash``: the H100 first, run isolated in a worker process, with 1% crashes
  (``os._exit``) on top of the faults; the others as above.

For each: requests answered, failed (FailoverError), lost (neither: must be 0), answered twice
(must be 0), answers different from ort:cpu's (must be 0), p50/p99 latency, per-device counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

HANG_S = 0.5
DEADLINE_S = 1.0
FEED_SETS = 64


def scenario_faults(requests: int, crash: float) -> str:
    rates = "error=0.05,hang=0.05,nan=0.05,hang_s=%g" % HANG_S
    die = max(1, requests // 2)
    entries = [f"ascend-910c:{rates},die_after={die}", f"h100:{rates}" + (f",crash={crash:g}" if crash else ""), f"mi300x:{rates}"]
    return ";".join(entries)


def configure(faults: str) -> None:
    import hal.plugin

    os.environ["HAL_SIM_DEVICES"] = "ascend-910c,h100,mi300x"
    os.environ["HAL_SIM_FAULTS"] = faults
    os.environ.setdefault("HAL_SIM_SEED", "0")
    hal.plugin.reload_plugins()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def drive(run, feeds: list[dict], expected: list[np.ndarray], output: str, threads: int, per_thread: int) -> dict:
    from hal.errors import FailoverError

    delivered: Counter[int] = Counter()
    latencies: list[float] = []
    failed: list[str] = []
    wrong: list[int] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        mine = []
        for i in range(per_thread):
            rid = t * per_thread + i
            k = rid % len(feeds)
            start = time.perf_counter()
            try:
                out = run(feeds[k])[output]
            except FailoverError as exc:
                with lock:
                    failed.append(str(exc))
                continue
            mine.append(time.perf_counter() - start)
            same = np.array_equal(out, expected[k])
            with lock:
                delivered[rid] += 1
                if not same:
                    wrong.append(rid)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    total = threads * per_thread
    return {
        "requests": total,
        "answered": sum(delivered.values()),
        "failed": len(failed),
        "lost": total - len(delivered) - len(failed),
        "answered_twice": sum(1 for n in delivered.values() if n > 1),
        "different_from_reference": len(wrong),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 3),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 3),
        "max_ms": round(max(latencies) * 1e3, 1) if latencies else None,
        "wall_s": round(wall, 1),
        "first_failures": failed[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="per thread")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-isolated", action="store_true")
    parser.add_argument("--only-isolated", action="store_true")
    parser.add_argument("--crash", type=float, default=0.01, help="the isolated H100's crash rate")
    args = parser.parse_args()

    import hal
    from _machine import machine_info
    from hal.pool import BreakerSettings
    from hal.testing.models import mlp

    model = hal.compile(mlp(batch=4, width=64, layers=2))
    total = args.threads * args.requests
    configure(scenario_faults(total, crash=0))
    reference = model.to("ort:cpu")
    name = reference.inputs[0].name
    output = reference.outputs[0].name
    rng = np.random.default_rng(0)
    shape = [d if isinstance(d, int) else 4 for d in reference.inputs[0].shape]
    feeds = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(FEED_SETS)]
    expected = [reference.run(f)[output] for f in feeds]
    breaker = BreakerSettings(failures=3, cool_down_s=0.5)
    devices = ["sim:ascend-910c:0", "sim:h100:0", "sim:mi300x:0", "ort:cpu"]
    results = {}

    def record(label: str, run, pool=None) -> None:
        row = drive(run, feeds, expected, output, args.threads, args.requests)
        if pool is not None:
            row["devices"] = {d: s.to_dict() for d, s in pool.stats().items()}
            runner = pool.executables[0].runner
            if hasattr(runner, "restarts"):
                row["worker"] = {"crashes": runner.crashes, "kills": runner.kills, "restarts": runner.restarts}
        results[label] = row
        print(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'devices'})}", flush=True)
        for device, stats in row.get("devices", {}).items():
            print(f"    {device}: {json.dumps(stats)}", flush=True)

    record("direct (ort:cpu exe.run)", reference.run)

    for label, run, pool in ([] if args.only_isolated else faultless_and_faulty(model, devices, total, breaker)):
        record(label, run, pool)
        pool.close()

    if not args.skip_isolated:
        configure(scenario_faults(total, crash=args.crash))
        order = ["sim:h100:0", "sim:ascend-910c:0", "sim:mi300x:0", "ort:cpu"]
        iso = model.to(order, verify=False, deadline_s=DEADLINE_S, breaker=breaker, isolate=["sim:h100:0"])
        record(f"isolated H100 crashing {args.crash:.0%} (plus the faults)", iso.run, iso)
        iso.close()

    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "threads": args.threads,
                                         "requests_per_thread": args.requests, "results": results}, indent=2))


def faultless_and_faulty(model, devices, total, breaker):
    configure("")
    quiet = model.to(devices, verify=False, deadline_s=DEADLINE_S, breaker=breaker)
    yield "pool, no faults", quiet.run, quiet
    configure(scenario_faults(total, crash=0))
    pool = model.to(devices, verify=False, deadline_s=DEADLINE_S, breaker=breaker)
    yield "faults (5% error, hang, NaN each; the Ascend dies mid-run)", pool.run, pool


if __name__ == "__main__":
    main()
