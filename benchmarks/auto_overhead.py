"""What choosing costs: a warm ``to("auto")`` against a warm ``to(device)`` for the device auto
picks, in fresh processes.

    HAL_LOAD_PLUGINS=openvino,iree python benchmarks/auto_overhead.py --runs 5

Target (issue 9): with three devices, a warm ``to("auto")`` at most 1.2x a warm ``to(device)``:
ranking must lower nothing (each device's lowering comes from the compile cache) and prepare only
the chosen device.

Each measurement is a fresh process whose ``HAL_CACHE_DIR`` was filled by an untimed process
(lowerings, verdicts, backend artifacts for every device); it builds the model, compiles it and
discovers devices (untimed), then times one ``to(...)``. The two variants alternate; medians and
their ratio are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _machine import child_env, load_average, machine_info

MODELS = ("mlp", "resnet18_like", "transformer_encoder")


def _child(target: str, model_name: str, prime: bool, policy: str | None = None) -> dict[str, Any]:
    import time

    import hal
    from hal.testing import models

    compiled = hal.compile(getattr(models, model_name)())
    devices = [d.id for d in hal.devices() if d.available]
    if prime:  # fill every device's lowering, verdict and artifacts
        for device in devices:
            try:
                compiled.to(device, strict=True)
            except hal.errors.HalError:
                pass
        if target == "auto" and policy:
            compiled.to("auto", policy=policy)  # measures once and remembers
    start = time.perf_counter()
    exe = compiled.to(target, policy=policy) if target == "auto" and policy else compiled.to(target)
    return {"seconds": time.perf_counter() - start, "device": exe.device.id, "devices": devices}


def _run(target: str, model_name: str, cache: Path, prime: bool = False, policy: str | None = None) -> dict[str, Any]:
    env = child_env(HAL_CACHE_DIR=str(cache), PYTHONPYCACHEPREFIX=str(cache.parent / "pycache"))
    code = (
        "import json, sys; sys.path.insert(0, %r); import auto_overhead; "
        "print(json.dumps(auto_overhead._child(%r, %r, %r, %r)))"
    ) % (str(Path(__file__).parent), target, model_name, prime, policy)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--policy", help="time to('auto', policy=P) instead (e.g. fastest: remembered, not measured)")
    args = parser.parse_args()
    print(json.dumps(machine_info()), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="hal-auto-bench-") as tmp:
        for model_name in args.models.split(","):
            cache = Path(tmp) / model_name
            primed = _run("auto", model_name, cache, prime=True, policy=args.policy)
            chosen = primed["device"]
            auto, direct = [], []
            for _ in range(args.runs):
                auto.append(_run("auto", model_name, cache, policy=args.policy)["seconds"])
                direct.append(_run(chosen, model_name, cache)["seconds"])
            a, d = statistics.median(auto), statistics.median(direct)
            print(
                f"{model_name:20s} {len(primed['devices'])} devices, auto picks {chosen:16s} "
                f"warm to(auto) {a * 1e3:7.1f} ms  to({chosen}) {d * 1e3:7.1f} ms  ratio {a / d:.2f}",
                flush=True,
            )
    print(f"load average after: {load_average()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
