"""The compile cache, cold against warm: ``compiled.to(device)`` in fresh processes, per device.

    python benchmarks/compile_cache.py                    # every available device, all three models
    python benchmarks/compile_cache.py --devices openvino:CPU,iree:local-task --models mlp --json out.json
    HAL_LOAD_PLUGINS=openvino,iree .venv-all/bin/python benchmarks/compile_cache.py --cold 5 --warm 5

Target (issue 4): a warm ``to()`` takes at most 10% of a cold one on IREE and OpenVINO.

For each (device, model) every measurement is a fresh process that imports hal, builds the model
(``hal.testing.models``, benchmark sizes), runs ``hal.compile(model)`` and device discovery
(``hal.devices()``, timed apart: the compile cache does not save it), then times
``compiled.to(device, strict=True)``:

- **cold**: ``HAL_CACHE_DIR`` is a new empty directory (no lowered model, no onnxruntime optimized
  model, no OpenVINO blob, no IREE vmfb);
- **warm**: ``HAL_CACHE_DIR`` is one directory filled by an untimed first process.

Cold and warm processes alternate, so load from other users of the machine falls on both alike;
medians are reported. Children keep Python bytecode in a private ``PYTHONPYCACHEPREFIX`` (filled
by the untimed process), as an installed package has its ``.pyc`` files, so that compiling the
HAL's and the plugins' sources is not what gets timed.

After ``to()`` the child times the first ``run()`` and a second one (a runtime may defer work to
the first call), and a second ``to()`` in the same process (``in-process s``: what a cache hit
costs once the process is warm, close to the runtime's own floor for loading its artifact). It
checks whether the cache was hit rather than assuming it: the core's ``lower_for`` must not have
run, no file under ``HAL_CACHE_DIR`` may have been written or changed, the backend's counters must
show a hit where it has them (``cache_hits`` up, ``compile_count`` unchanged) and OpenVINO's
compiled model must say ``LOADED_FROM_CACHE``. **warm hits** counts the warm processes where all of
that held, **cold hits** the cold ones (it should be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _machine import child_env, load_average, machine_info

MODELS = ("mlp", "resnet18_like", "transformer_encoder")
#: Backends the issue's target applies to: warm at most this fraction of cold.
TARGET = {"openvino": 0.10, "iree": 0.10}
_COUNTERS = ("compile_count", "cache_hits")


# -- one measurement, in a child process ------------------------------------------------------


def _files(root: Path) -> dict[str, tuple[int, int]]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def _loaded_from_cache(runner: Any) -> bool | None:
    """OpenVINO's own word on whether its compiled model came from its cache (None elsewhere)."""
    compiled = getattr(runner, "compiled", None)
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE")) if compiled is not None else None
    except Exception:  # noqa: BLE001 - a runtime without the property has no say
        return None


def _child(device_id: str, model_name: str) -> dict[str, Any]:
    clock = time.perf_counter
    start = clock()
    import hal
    import hal.compiler
    from hal._plugins import registry  # the backend instance, for its cache counters
    from hal.testing import models

    model = getattr(models, model_name)()  # the builders' defaults are the benchmark sizes
    feeds = models.random_feeds(model, seed=0)
    compiled = hal.compile(model)
    setup_s = clock() - start

    start = clock()
    device = next(d for d in hal.devices() if d.id == device_id)
    discovery_s = clock() - start
    backend = registry().backend(device.backend)

    lowerings: list[int] = []
    lower_for = hal.compiler.lower_for

    def counting_lower_for(*args: Any, **kwargs: Any) -> Any:
        lowerings.append(1)
        return lower_for(*args, **kwargs)

    hal.compiler.lower_for = counting_lower_for  # CompiledModel.to imports it at call time
    root = Path(os.environ["HAL_CACHE_DIR"])
    before_files = _files(root)
    before = {name: getattr(backend, name) for name in _COUNTERS if isinstance(getattr(backend, name, None), int)}

    start = clock()
    exe = compiled.to(device_id, strict=True)
    to_s = clock() - start

    after_files = _files(root)
    written = sorted(k for k, v in after_files.items() if before_files.get(k) != v)
    counters = {name: getattr(backend, name) - value for name, value in before.items()}
    loaded = _loaded_from_cache(exe.runner)
    start = clock()
    exe.run(feeds)
    first_run_s = clock() - start
    start = clock()
    exe.run(feeds)
    second_run_s = clock() - start
    start = clock()
    compiled.to(device_id, strict=True)
    in_process_s = clock() - start

    hit = (
        not lowerings
        and not written
        and counters.get("compile_count", 0) == 0
        and counters.get("cache_hits", 1) > 0
        and loaded is not False
    )
    sections: dict[str, int] = {}
    for name in after_files:
        parts = Path(name).parts
        section = "/".join(parts[:2]) if parts[0] == "backends" else parts[0]
        sections[section] = sections.get(section, 0) + 1
    return {
        "setup_s": setup_s,
        "discovery_s": discovery_s,
        "to_s": to_s,
        "first_run_s": first_run_s,
        "second_run_s": second_run_s,
        "in_process_s": in_process_s,
        "hit": hit,
        "evidence": {
            "lowerings": len(lowerings),
            "files_written": written,
            "backend_counters": counters,
            "loaded_from_cache": loaded,
            "cache_files": sections,
        },
    }


# -- the parent: orchestration and report ------------------------------------------------------


def _run_child(device: str, model: str, cache_dir: Path, pycache: str, timeout: float) -> dict[str, Any]:
    env = child_env(HAL_CACHE_DIR=str(cache_dir), PYTHONPYCACHEPREFIX=pycache)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--devices", device, "--models", model]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _schedule(cold: int, warm: int) -> list[str]:
    """An untimed process fills the warm cache; then cold and warm processes alternate."""
    order = ["prime"]
    for i in range(max(cold, warm)):
        if i < cold:
            order.append("cold")
        if i < warm:
            order.append("warm")
    return order


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def _measure(device: str, model: str, pycache: str, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"prime": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="hal-bench-cache-") as tmp:
        shared = Path(tmp) / "warm"
        for i, kind in enumerate(_schedule(args.cold, args.warm)):
            cache_dir = Path(tmp) / f"cold-{i}" if kind == "cold" else shared
            print(f"[{device} {model}] {kind} {len(runs[kind]) + 1}", file=sys.stderr, flush=True)
            runs[kind].append(_run_child(device, model, cache_dir, pycache, args.timeout))
            if kind == "cold":
                shutil.rmtree(cache_dir, ignore_errors=True)  # a cold cache of resnet18_like is ~100 MB
    errors = [r["error"] for kind in runs for r in runs[kind] if "error" in r]
    row: dict[str, Any] = {"device": device, "model": model}
    for kind in ("cold", "warm"):
        ok = [r for r in runs[kind] if "error" not in r]
        for key in ("to_s", "first_run_s", "second_run_s", "in_process_s"):
            row[f"{kind}_{key}"] = _median(ok, key)
        row[f"{kind}_with_first_run_s"] = statistics.median([r["to_s"] + r["first_run_s"] for r in ok]) if ok else None
        row[f"{kind}_hits"] = sum(1 for r in ok if r["hit"])
        row[f"{kind}_n"] = len(ok)
    row["discovery_s"] = _median([r for kind in runs for r in runs[kind] if "error" not in r], "discovery_s")
    if row["cold_to_s"] and row["warm_to_s"] is not None:
        row["warm_over_cold"] = row["warm_to_s"] / row["cold_to_s"]
        row["warm_over_cold_with_first_run"] = row["warm_with_first_run_s"] / row["cold_with_first_run_s"]
    target = TARGET.get(device.split(":", 1)[0])
    if target is not None and "warm_over_cold" in row:
        row["target"] = target
        row["meets_target"] = row["warm_over_cold"] <= target and row["warm_hits"] == row["warm_n"] > 0
    if errors:
        row["error"] = errors[0]
    row["runs"] = runs
    return row








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


def _fmt(value: Any, spec: str, scale: float = 1) -> str:
    return format(value * scale, spec) if isinstance(value, (int, float)) else "—"


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| device | model | cold s | warm s | warm/cold | in-process s | 1st run ms cold / warm "
        "| warm/cold with 1st run | warm hits | cold hits |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = _fmt(r.get("warm_over_cold"), ".1%")
        if "meets_target" in r:
            ratio += " ✓" if r["meets_target"] else f" ✗ (≤{r['target']:.0%})"
        first = f"{_fmt(r.get('cold_first_run_s'), '.0f', 1000)} / {_fmt(r.get('warm_first_run_s'), '.0f', 1000)}"
        lines.append(
            f"| {r['device']} | {r['model']} | {_fmt(r.get('cold_to_s'), '.3f')} | {_fmt(r.get('warm_to_s'), '.3f')} "
            f"| {ratio} | {_fmt(r.get('warm_in_process_s'), '.3f')} | {first} "
            f"| {_fmt(r.get('warm_over_cold_with_first_run'), '.1%')} "
            f"| {r.get('warm_hits', 0)}/{r.get('warm_n', 0)} | {r.get('cold_hits', 0)}/{r.get('cold_n', 0)} |"
        )
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['device']} / {r['model']}: {r['error']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", help="comma list of device ids (default: every available device)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {', '.join(MODELS)}")
    p.add_argument("--cold", type=int, default=5, help="cold processes per device and model, each a new cache (default 5)")
    p.add_argument("--warm", type=int, default=5, help="warm processes per device and model (default 5)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed to each child process")
    p.add_argument("--json", metavar="PATH", help="also write machine, settings and every run as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.devices, args.models)))
        return
    if args.cold < 1 or args.warm < 1:
        raise SystemExit("--cold and --warm must be at least 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    devices = _devices(args.devices)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="hal-bench-pycache-") as pycache:
        rows = [_measure(device, model, pycache, args) for model in models for device in devices]
    machine["load_average_end"] = load_average()
    discovery = [r["discovery_s"] for r in rows if r.get("discovery_s")]
    print(
        f"\nMachine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"load average {machine['load_average']} at start, {machine['load_average_end']} at end; "
        f"Python {machine['python']}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print(
        f"Settings: {args.cold} cold and {args.warm} warm processes per row, medians; "
        f"HAL_LOAD_PLUGINS={machine['hal_load_plugins']!r}; device discovery (not in to()) median "
        f"{_fmt(statistics.median(discovery) if discovery else None, '.2f')} s\n"
    )
    print(_table(rows))
    if args.json:
        settings = {"cold": args.cold, "warm": args.warm, "argv": sys.argv}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "settings": settings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
