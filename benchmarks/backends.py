"""Every available device side by side, in one run, on the three generated benchmark models.

    python benchmarks/backends.py                      # every available device, all three models
    python benchmarks/backends.py --devices ort:cpu,openvino:CPU --models mlp --runs 100 --json out.json
    HAL_LOAD_PLUGINS=openvino .venv-openvino/bin/python benchmarks/backends.py

Models (``hal.testing.models``, benchmark sizes): ``mlp`` (4 Linear 1024x1024 + GELU, batch 32),
``resnet18_like`` (1x3x224x224), ``transformer_encoder`` (4 layers, d_model 256, 4 heads, seq 128,
batch 8). What is measured, per (device, model):

- **compile s** — wall time of ``hal.compile(model).to(device, strict=True)`` in a fresh process
  with an empty ``HAL_CACHE_DIR`` (cold: no OpenVINO model cache, no IREE vmfb). The JSON also has
  ``compile_warm_s``, the same call again in that process (on-disk caches warm).
- **p50 / p90 ms** — ``Executable.run(feeds)`` latency after warm-up. All devices of one model
  run in one process, in rounds (each round: every device in turn, ``runs/rounds`` calls each),
  so that load from other users of the machine falls on every device alike.
- **direct p50 ms** and **HAL/direct** — the original model loaded and run by the runtime's own
  public API with its default options, as a user without the HAL would, timed in the same loop
  alternating call by call with the HAL call: an ``onnxruntime.InferenceSession`` (same
  providers) and its ``run``; an OpenVINO ``Core().compile_model`` (f32 precision hint, as the
  HAL runs it) and ``InferRequest.infer``; for other backends (IREE) the plugin's runner,
  ``executable.runner.run(feeds, names)``. A ratio above 1 is what going through the HAL costs
  (its per-call checks, and any difference in how it prepared the model). The JSON also has
  ``runner_p50_ms`` and ``hal_over_runner`` for every device: the HAL's own session or compiled
  model called through the plugin's runner, i.e. the core's per-call overhead alone.
- **peak MB** — peak resident memory (``ru_maxrss``) of the fresh process that compiled the
  model for the device and ran it (warm-up plus a few runs), minus the peak of a baseline process
  that only imports hal, builds the model and its feeds and runs ``hal.compile(model)`` (no
  device): the memory the device's runtime costs for that model (runtime import included).

Runs with no flags in about a minute per device on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from _machine import machine_info

MODELS = ("mlp", "resnet18_like", "transformer_encoder")


# -- work done in child processes --------------------------------------------------------------


def _build(name: str) -> tuple[Any, dict[str, np.ndarray]]:
    from hal.testing import models

    model = getattr(models, name)()  # the builders' defaults are the benchmark sizes
    return model, models.random_feeds(model, seed=0)


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _child_memory(model_name: str, device: str | None, runs: int) -> dict[str, Any]:
    """Compile (cold, then warm) and run a few times; report compile times and this process's peak."""
    import hal

    model, feeds = _build(model_name)
    compiled = hal.compile(model)
    out: dict[str, Any] = {}
    if device is not None:
        start = time.perf_counter()
        exe = compiled.to(device, strict=True)
        out["compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        hal.compile(model).to(device, strict=True)
        out["compile_warm_s"] = time.perf_counter() - start
        for _ in range(runs):
            exe.run(feeds)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _native_call(exe: Any, model: Any, feeds: dict[str, np.ndarray], workdir: str) -> tuple[str, Callable[[], object]]:
    """The model loaded and run by the runtime's own public API, as a user without the HAL would
    (original model, the runtime's default options), for backends whose runtime we know; the
    plugin's runner otherwise."""
    runner = exe.runner
    names = [o.name for o in exe.outputs]
    session = getattr(runner, "session", None)
    if session is not None and hasattr(session, "get_providers"):  # an onnxruntime backend
        import onnxruntime as ort

        own = ort.InferenceSession(model.SerializeToString(), providers=session.get_providers())
        return "InferenceSession.run", lambda: own.run(names, feeds)
    compiled = getattr(runner, "compiled", None)
    if compiled is not None and hasattr(compiled, "create_infer_request"):  # OpenVINO
        import openvino

        path = os.path.join(workdir, "model.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        # f32 as the HAL runs it by default (OpenVINO's own default is bf16 on AMX CPUs).
        core = openvino.Core()
        ov_device = exe.device.id.split(":", 1)[1]
        own = core.compile_model(core.read_model(path), ov_device, {"INFERENCE_PRECISION_HINT": "f32"})
        request = own.create_infer_request()
        return "InferRequest.infer", lambda: request.infer(feeds)
    return "runner.run", lambda: runner.run(feeds, names)


def _child_latency(model_name: str, devices: Sequence[str], runs: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Time HAL, plugin-runner and native calls for every device, interleaved in rounds."""
    import hal

    model, feeds = _build(model_name)
    compiled = hal.compile(model)
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    native_api: dict[str, str] = {}
    failed: dict[str, dict[str, str]] = {}
    for device in devices:
        try:
            exe = compiled.to(device, strict=True)
        except Exception as exc:  # noqa: BLE001 -- one device that cannot compile must not hide the others
            failed[device] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        names = [o.name for o in exe.outputs]
        api, native = _native_call(exe, model, feeds, tempfile.mkdtemp(prefix="hal-bench-direct-"))
        native_api[device] = api
        calls[device] = {
            "hal": lambda exe=exe: exe.run(feeds),
            "runner": lambda exe=exe, names=names: exe.runner.run(feeds, names),
            "native": native,
        }
        for call in calls[device].values():
            for _ in range(warmup):
                call()
    devices = [d for d in devices if d in calls]
    samples: dict[str, dict[str, list[float]]] = {d: {k: [] for k in calls[d]} for d in devices}
    per_round = max(1, -(-runs // rounds))
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()  # a collection inside one timed call would be charged to whichever path ran then
    try:
        for _ in range(rounds):
            for device in devices:
                time.sleep(0.05)  # let the previous runtime's spinning worker threads go idle
                for _ in range(per_round):
                    for kind, call in calls[device].items():
                        start = clock()
                        call()
                        samples[device][kind].append((clock() - start) / 1e6)
    finally:
        gc.enable()
    return failed | {
        device: {
            "native_api": native_api[device],
            **{
                kind: {"p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90)), "n": len(v)}
                for kind, v in samples[device].items()
            },
        }
        for device in devices
    }


def _child_main(args: argparse.Namespace) -> None:
    devices = [d for d in (args.devices or "").split(",") if d]
    if args.child == "memory":
        result = _child_memory(args.models, devices[0] if devices else None, args.runs)
    else:
        result = _child_latency(args.models, devices, args.runs, args.warmup, args.rounds)
    print(json.dumps(result))


# -- the parent: orchestration and report ------------------------------------------------------


def _run_child(args: list[str], cache_dir: str, timeout: float) -> dict[str, Any]:
    """Run this script as a child (fresh process, its own cache dir); its last stdout line is JSON."""
    env = dict(os.environ, HAL_CACHE_DIR=cache_dir)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])





def _devices(requested: str | None) -> list[str]:
    import hal

    available = [d.id for d in hal.devices() if d.available]
    if not requested:
        return available
    chosen = [d.strip() for d in requested.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in available]
    if unknown:
        raise SystemExit(f"not available here: {', '.join(unknown)}; available: {', '.join(available)}")
    return chosen


def _measure(devices: list[str], models: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    common = ["--runs", str(args.runs), "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    for model in models:
        with tempfile.TemporaryDirectory(prefix="hal-bench-") as tmp:
            print(f"[{model}] baseline process", file=sys.stderr, flush=True)
            base = _run_child(["--child", "memory", "--models", model, "--runs", "0"], f"{tmp}/base", args.timeout)
            memory = {}
            for device in devices:
                print(f"[{model}] {device}: cold compile and peak memory", file=sys.stderr, flush=True)
                memory[device] = _run_child(
                    ["--child", "memory", "--models", model, "--devices", device, "--runs", str(args.warmup)],
                    f"{tmp}/{device.replace(':', '_')}",
                    args.timeout,
                )
            print(f"[{model}] latency, {len(devices)} device(s) interleaved", file=sys.stderr, flush=True)
            latency = _run_child(
                ["--child", "latency", "--models", model, "--devices", ",".join(devices), *common],
                f"{tmp}/latency",
                args.timeout,
            )
        for device in devices:
            row: dict[str, Any] = {"device": device, "model": model, **memory[device]}
            if "peak_rss_mb" in row and "peak_rss_mb" in base:
                row["baseline_rss_mb"] = base["peak_rss_mb"]
                row["peak_mb"] = row["peak_rss_mb"] - base["peak_rss_mb"]
            timings = latency.get(device, latency)
            if "error" in timings:
                row.setdefault("error", timings["error"])
            else:
                row.update(
                    p50_ms=timings["hal"]["p50_ms"],
                    p90_ms=timings["hal"]["p90_ms"],
                    direct_api=timings["native_api"],
                    direct_p50_ms=timings["native"]["p50_ms"],
                    runner_p50_ms=timings["runner"]["p50_ms"],
                    hal_over_direct=timings["hal"]["p50_ms"] / timings["native"]["p50_ms"],
                    hal_over_runner=timings["hal"]["p50_ms"] / timings["runner"]["p50_ms"],
                    runs=timings["hal"]["n"],
                )
            rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "—"


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| device | model | compile s | p50 ms | p90 ms | peak MB | direct p50 ms (API) | HAL/direct |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        direct = f"{_fmt(r.get('direct_p50_ms'), '.2f')} ({r.get('direct_api', '—')})"
        lines.append(
            f"| {r['device']} | {r['model']} | {_fmt(r.get('compile_s'), '.2f')} | {_fmt(r.get('p50_ms'), '.2f')} "
            f"| {_fmt(r.get('p90_ms'), '.2f')} | {_fmt(r.get('peak_mb'), '.0f')} | {direct} "
            f"| {_fmt(r.get('hal_over_direct'), '.3f')} |"
        )
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['device']} / {r['model']}: {r['error']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", help="comma list of device ids (default: every available device)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {', '.join(MODELS)}")
    p.add_argument("--runs", type=int, default=50, help="timed calls per device and model (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="interleaving rounds the runs are split into (default 5)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to each child process")
    p.add_argument("--json", metavar="PATH", help="also write machine, settings and every row as JSON")
    p.add_argument("--child", choices=("memory", "latency"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        _child_main(args)
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    devices = _devices(args.devices)
    machine = machine_info()
    rows = _measure(devices, models, args)
    print(
        f"\nMachine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"load average at start {machine['load_average']}; Python {machine['python']}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print(f"Settings: {args.runs} runs after {args.warmup} warm-up calls, {args.rounds} interleaved rounds\n")
    print(_table(rows))
    if args.json:
        settings = {"runs": args.runs, "warmup": args.warmup, "rounds": args.rounds}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "settings": settings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
