"""What verification at placement costs: ``compiled.to(device)`` with and without ``verify``, in
fresh processes, cold (empty cache) and warm (cache filled by an untimed process).

    python benchmarks/verify_cost.py                       # every available device, all three models
    HAL_LOAD_PLUGINS=openvino,iree python benchmarks/verify_cost.py --devices ort:cpu,openvino:CPU --runs 5

Target (issue 8): a cold ``to()`` with verification at most 1.3x one without, on the three
benchmark models; a warm ``to()`` unchanged (the verdict is cached with the lowered model).

Each measurement is a fresh process that imports hal, builds the model (``hal.testing.models``,
benchmark sizes), compiles it and discovers devices (untimed), then times
``compiled.to(device, strict=True, verify=V)``. Processes with and without verification
alternate, so load from other users of the machine falls on both alike; medians are reported, and
the ratio of the medians. The child also reports which reference was used (``onnx-reference``,
``ort:cpu``) or why the model was left unverified.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import child_env, load_average, machine_info

MODELS = ("mlp", "resnet18_like", "transformer_encoder")
TARGET = 1.3


def _child(device_id: str, model_name: str, verify: bool) -> dict[str, Any]:
    import hal
    from hal.testing import models

    compiled = hal.compile(getattr(models, model_name)())
    hal.devices()
    start = time.perf_counter()
    exe = compiled.to(device_id, strict=True, verify=verify)
    seconds = time.perf_counter() - start
    report = exe.verification
    return {
        "seconds": seconds,
        "status": None if report is None else report.status,
        "reference": None if report is None else (report.reference or report.detail),
    }


def _measure(device_id: str, model_name: str, verify: bool, cache: Path) -> dict[str, Any]:
    env = child_env(HAL_CACHE_DIR=str(cache), PYTHONPYCACHEPREFIX=str(cache.parent / "pycache"))
    code = (
        "import json, sys; sys.path.insert(0, %r); import verify_cost; "
        "print(json.dumps(verify_cost._child(%r, %r, %r)))"
    ) % (str(Path(__file__).parent), device_id, model_name, verify)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", help="comma-separated device ids (default: every available one)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=3, help="cold and warm processes per variant")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import hal

    devices = args.devices.split(",") if args.devices else [d.id for d in hal.devices() if d.available]
    rows = []
    print(json.dumps(machine_info()), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="hal-verify-bench-") as tmp:
        root = Path(tmp)
        for device_id in devices:
            for model_name in args.models.split(","):
                times: dict[tuple[str, bool], list[float]] = {}
                note = None
                warm = {v: root / f"warm-{device_id.replace(':', '_')}-{model_name}-{v}" for v in (False, True)}
                for v in (False, True):  # untimed: fills the warm caches and the bytecode cache
                    _measure(device_id, model_name, v, warm[v])
                for i in range(args.runs):
                    for v in (False, True):
                        cold = _measure(device_id, model_name, v, root / f"cold-{i}-{v}-{time.monotonic_ns()}")
                        times.setdefault(("cold", v), []).append(cold["seconds"])
                        if v:
                            note = f"{cold['status']}: {cold['reference']}"
                        times.setdefault(("warm", v), []).append(_measure(device_id, model_name, v, warm[v])["seconds"])
                med = {k: statistics.median(vs) for k, vs in times.items()}
                row = {
                    "device": device_id,
                    "model": model_name,
                    "cold_s": med[("cold", False)],
                    "cold_verified_s": med[("cold", True)],
                    "cold_ratio": med[("cold", True)] / med[("cold", False)],
                    "warm_s": med[("warm", False)],
                    "warm_verified_s": med[("warm", True)],
                    "warm_ratio": med[("warm", True)] / med[("warm", False)],
                    "verdict": note,
                }
                rows.append(row)
                print(
                    f"{device_id:16s} {model_name:20s} cold {row['cold_s']*1e3:7.0f} -> {row['cold_verified_s']*1e3:7.0f} ms "
                    f"(x{row['cold_ratio']:.2f})  warm {row['warm_s']*1e3:6.1f} -> {row['warm_verified_s']*1e3:6.1f} ms "
                    f"(x{row['warm_ratio']:.2f})  {note}",
                    flush=True,
                )
    print(f"load average after: {load_average()}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
