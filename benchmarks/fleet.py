"""Through a fleet and through `hal serve`, against the same device used directly (issue 14 item 4).

    HAL_LOAD_PLUGINS=sim HAL_SIM_DEVICES=h100 python benchmarks/fleet.py [--requests 500] [--json out.json]

One local Ray node (this process's ``ray.init``, 2 CPUs, advertising ``hal_sim_h100: 2``); one device,
sim:h100:0 (computes on the CPU through onnxruntime). For each model, the same seeded requests:

- ``direct``: ``compiled.to("sim:h100:0").run`` in this process;
- ``fleet``: ``hal.ray.Fleet().to(compiled, devices=["sim:h100:0"]).run``: one Ray actor call each;
- ``serve``: ``hal serve``'s Open Inference Protocol endpoint through ``tritonclient.http``
  (binary tensors): HTTP, the Serve proxy, the ingress replica, then the actor call.

Each from 1 client thread (latency: p50/p99) and from 4 (throughput: requests/s). The Ray hop is
``fleet`` p50 minus ``direct`` p50; the HTTP path adds the rest of ``serve``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _measure(call: Callable[[int], Any], requests: int, threads: int) -> dict[str, float]:
    for i in range(min(20, requests)):  # warm
        call(i)
    latencies: list[float] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        mine = []
        for i in range(t, requests, threads):
            start = time.perf_counter()
            call(i)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"requests_per_s": requests / elapsed, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HAL_LOAD_PLUGINS", "sim")
    os.environ.setdefault("HAL_SIM_DEVICES", "h100")

    import ray
    import tritonclient.http as http
    from ray import serve

    import hal
    import hal.ray
    from hal.ray import serve as hal_serve
    from hal.testing import models

    from _machine import machine_info

    # Two units of the one simulated chip: the fleet's actor and `hal serve`'s each take one.
    ray.init(num_cpus=2, resources={"hal_sim_h100": 2}, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20)
    fleet = hal.ray.Fleet()
    results: dict[str, Any] = {"machine": machine_info(), "requests": args.requests, "models": {}}
    shapes = {"mlp 4x64x2": dict(batch=4, width=64, layers=2), "mlp 32x1024x4": dict(batch=32, width=1024, layers=4)}
    for label, shape in shapes.items():
        proto = models.mlp(**shape)
        compiled = hal.compile(proto)
        rng = np.random.default_rng(0)
        feeds = [{"x": rng.standard_normal((shape["batch"], shape["width"]), dtype=np.float32)} for _ in range(16)]
        direct = compiled.to("sim:h100:0")
        remote = fleet.to(compiled, devices=["sim:h100:0"])
        name = label.replace(" ", "-")
        hal_serve.run(compiled, name=name, devices=["sim:h100:0"], port=args.port)
        local = threading.local()  # tritonclient's HTTP client is gevent's: one per thread

        def client() -> Any:
            if not hasattr(local, "client"):
                local.client = http.InferenceServerClient(f"127.0.0.1:{args.port}", network_timeout=120)
            return local.client

        while not client().is_model_ready(name):
            time.sleep(0.5)
        inputs = []
        for f in feeds:
            given = http.InferInput("x", list(f["x"].shape), "FP32")
            given.set_data_from_numpy(f["x"])
            inputs.append(given)
        paths = {
            "direct": lambda i: direct.run(feeds[i % 16]),
            "fleet": lambda i: remote.run(feeds[i % 16]),
            "serve": lambda i: client().infer(name, [inputs[i % 16]]),
        }
        row: dict[str, Any] = {}
        for path, call in paths.items():
            row[path] = {"1 thread": _measure(call, args.requests, 1), "4 threads": _measure(call, args.requests, 4)}
            print(label, path, json.dumps(row[path]), flush=True)
        row["ray hop p50 ms"] = row["fleet"]["1 thread"]["p50_ms"] - row["direct"]["1 thread"]["p50_ms"]
        row["http + serve p50 ms"] = row["serve"]["1 thread"]["p50_ms"] - row["fleet"]["1 thread"]["p50_ms"]
        results["models"][label] = row
        remote.close()
        serve.delete(f"hal-{name}")
    serve.shutdown()
    ray.shutdown()
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
