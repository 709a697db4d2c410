"""Does ``to("auto", policy="fastest")`` pick the fastest device? Against the best single device
and against today's static ranking (``to("auto")``), on the three benchmark models and the
generated zoo.

    HAL_LOAD_PLUGINS=openvino,iree python benchmarks/selection.py

Per model, in one process with a fresh ``HAL_CACHE_DIR``: ``fastest`` measures and chooses (its
own budget, ``HAL_SELECT_BUDGET_S``); then every candidate is prepared and timed independently
of that choice — round-robin, one run per device per round after a warm-up, for ``--seconds``
per model (at least ``--min-runs`` rounds) — and each device's p50 is its median. Reported per
model: each device's p50, the chosen and the static choice, chosen p50 / best p50 and static p50
/ best p50; at the end the geometric mean of both ratios (target: fastest within 3% of the best).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

from _machine import load_average, machine_info


def _models(small_zoo: bool) -> dict:
    from hal.testing import models

    out = {name: getattr(models, name)() for name in ("mlp", "resnet18_like", "transformer_encoder")}
    if small_zoo:
        out.update({f"zoo/{name}": proto for name, (proto, _) in models.zoo(small=True).items()})
    return out


def _time(exes: dict, feeds: dict, seconds: float, min_runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {d: [] for d in exes}
    for exe in exes.values():
        exe.run(feeds)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs or time.perf_counter() - start < seconds:
        for device, exe in exes.items():
            t0 = time.perf_counter()
            exe.run(feeds)
            times[device].append(time.perf_counter() - t0)
        rounds += 1
    return {d: statistics.median(t) for d, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per model, all devices together")
    parser.add_argument("--min-runs", type=int, default=20)
    parser.add_argument("--no-zoo", action="store_true")
    args = parser.parse_args()
    print(json.dumps(machine_info()), file=sys.stderr)
    root = tempfile.mkdtemp(prefix="hal-selection-bench-")
    chosen_ratios, static_ratios, rows = [], [], []
    for index, (name, proto) in enumerate(_models(not args.no_zoo).items()):
        os.environ["HAL_CACHE_DIR"] = os.path.join(root, str(index))
        import hal
        from hal import selection
        from hal.verification import seeded_feeds

        hal._plugins.reset_registry()
        selection._MEMORY.clear()
        compiled = hal.compile(proto)
        start = time.perf_counter()
        chosen = compiled.to("auto", policy="fastest").device.id
        choose_s = time.perf_counter() - start
        static = compiled.to("auto").device.id
        exes = {}
        for device in hal.devices():
            if device.available:
                try:
                    exes[device.id] = compiled.to(device.id, strict=True)
                except hal.errors.HalError:
                    pass
        p50 = _time(exes, seeded_feeds(compiled.model.inputs), args.seconds, args.min_runs)
        best = min(p50, key=p50.get)
        chosen_ratios.append(p50[chosen] / p50[best])
        static_ratios.append(p50[static] / p50[best])
        row = {"model": name, "p50_ms": {d: round(v * 1e3, 4) for d, v in p50.items()}, "best": best,
               "fastest_chose": chosen, "static_chose": static, "chosen_over_best": round(chosen_ratios[-1], 4),
               "static_over_best": round(static_ratios[-1], 4), "choose_s": round(choose_s, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def geo(values: list[float]) -> float:
        return math.exp(sum(math.log(v) for v in values) / len(values))

    print(json.dumps({"geomean_fastest_over_best": round(geo(chosen_ratios), 4),
                      "geomean_static_over_best": round(geo(static_ratios), 4), "models": len(rows)}))
    print(f"load average after: {load_average()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
