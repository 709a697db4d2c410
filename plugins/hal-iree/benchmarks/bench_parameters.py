"""Weights as IREE parameters against weights inside the vmfb, on the benchmark models.

    HAL_LOAD_PLUGINS=iree python plugins/hal-iree/benchmarks/bench_parameters.py [--runs 50]

Each model (``hal.testing.models.zoo(small=False)``) is saved with its weights as external data
(64-byte aligned, as ``CompiledModel.save`` writes them) and placed on iree:local-task twice, each
variant in a fresh process with its own cache: ``iree_parameters="none"`` (every weight inside the
vmfb, the plugin's path before parameters) and the default (external weights are parameters).
Per variant: cold ``to()`` (import + iree-compile + load, verify=False), warm ``to()`` (the cached
vmfb, a new process), ``run`` median, vmfb size, and the process's peak memory above its imports
(VmHWM) in the cold process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, statistics, sys, time
import numpy as np
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
import hal, onnx, iree.runtime
from hal.testing import models
base = hwm()
path, name, choice, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
loaded = hal.load(path)
feeds = models.random_feeds(loaded.proto)
t = time.perf_counter()
exe = hal.compile(loaded).to("iree:local-task", strict=True, verify=False, iree_parameters=choice)
to_s = time.perf_counter() - t
times = []
for _ in range(runs + 3):
    t = time.perf_counter()
    out = exe.run(feeds)
    times.append(time.perf_counter() - t)
print(json.dumps({"to_s": to_s, "run_ms": statistics.median(times[3:]) * 1e3, "peak_mib": (hwm() - base) / 2**20,
                  "checksum": float(sum(np.asarray(v, np.float64).sum() for v in out.values()))}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", default="mlp,transformer_encoder,resnet18_like")
    args = parser.parse_args()
    import hal
    from hal.testing import models

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, _ = models.zoo(small=False)[name]
            import onnx

            raw, directory = Path(tmp) / f"{name}-onnx", Path(tmp) / name
            raw.mkdir()
            directory.mkdir()
            onnx.save_model(model, str(raw / "model.onnx"), save_as_external_data=True, location="model.bin",
                            size_threshold=1024)
            hal.compile(hal.load(raw / "model.onnx")).save(directory / "model.onnx")  # 64-byte aligned
            weights = sum(f.stat().st_size for f in directory.iterdir() if f.name != "model.onnx")
            row: dict[str, object] = {"weights_mib": weights / 2**20}
            for choice in ("none", "external"):
                cache = Path(tmp) / f"cache-{name}-{choice}"
                env = dict(os.environ, HAL_CACHE_DIR=str(cache), HAL_LOAD_PLUGINS="iree")
                runs = []
                for _ in range(2):  # cold, then warm
                    out = subprocess.run(
                        [sys.executable, "-c", _CHILD, str(directory / "model.onnx"), name, choice, str(args.runs)],
                        capture_output=True, text=True, env=env, check=False,
                    )
                    if out.returncode != 0:
                        raise SystemExit(f"{name} {choice}:\n{out.stderr[-3000:]}")
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                vmfbs = list((cache / "backends" / "iree").glob("*.vmfb"))
                row[choice] = {
                    "cold_to_s": runs[0]["to_s"], "warm_to_s": runs[1]["to_s"],
                    "run_ms": min(r["run_ms"] for r in runs), "cold_peak_mib": runs[0]["peak_mib"],
                    "warm_peak_mib": runs[1]["peak_mib"],
                    "vmfb_mib": sum(v.stat().st_size for v in vmfbs) / 2**20, "checksum": runs[1]["checksum"],
                }
            results[name] = row
            print(name, json.dumps(row), flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
