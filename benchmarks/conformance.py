"""ONNX node conformance of every available device, and of the HAL's own choice, side by side.

    python benchmarks/conformance.py                                   # every case, every device + auto
    python benchmarks/conformance.py --sample 10 --devices ort:cpu,openvino:CPU --json out.json
    HAL_LOAD_PLUGINS=openvino,iree .venv/bin/python benchmarks/conformance.py

Runs onnx's node test cases (``onnx.backend.test.case.node.collect_testcases()``, 1884 with
onnx 1.23) through ``hal.compile(case.model).to(target)`` with :mod:`hal.testing.conformance`:
each device alone (``strict=True``: no fallback) and ``auto`` (the HAL's ranking with its default
fallback), inputs fed read-only as read from the cases' ``.pb`` files, outputs compared as onnx's
backend test runner compares them. ``hal conformance`` prints the same counts per device with the
most common reasons (CONFORMANCE.md); this script adds the union, auto's misses and timings.
Per target:

- **passed / failed / errors / crashed** — see ``hal.testing.conformance``: an error is the HAL
  or the device refusing the case before running it (a device whose runner passes no sequences
  or optionals refuses models with such inputs or outputs; maps nowhere), a crash a failure
  after the device accepted it;
- **seconds** — time in ``to()`` and ``run()`` for that target, summed over the cases (the
  shared ``hal.compile`` is not counted).

Under the table: how many cases pass on at least one device (the union, an upper bound for any
policy that picks one device per model), and the cases a device passes that ``auto`` does not.
``--sample N`` runs every N-th case by sorted name. The compile cache is a fresh temporary
directory, removed at the end, unless ``--cache-dir`` names one. IREE compiles each case in
0.3-3 s: the whole set takes it about 20 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from _machine import machine_info, versions


def _devices(spec: str | None) -> list[str]:
    import hal

    available = [d.id for d in hal.devices() if d.available]
    if spec is None:
        return available
    wanted = [d.strip() for d in spec.split(",") if d.strip()]
    unknown = [d for d in wanted if d not in available and d != "auto"]
    if unknown:
        raise SystemExit(f"devices {unknown} are not available here; available: {', '.join(available)}")
    return [d for d in wanted if d != "auto"]


def _quiet_runtimes() -> None:
    # Cases that a runtime refuses make onnxruntime log a red ERROR line each, and the HAL logs a
    # WARNING for every fallback auto takes: hundreds of lines that would bury the table. The
    # outcomes and their messages are in the result (and the JSON) anyway.
    logging.getLogger("hal").setLevel(logging.ERROR)
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(4)


def _table(result: Any) -> str:
    lines = ["| device | passed | failed | a draw | errors | crashed | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for target in result.targets:
        c = result.counts(target)
        lines.append(
            f"| {target} | {c['pass']} | {c['fail']} | {c['draw']} | {c['error']} | {c['crash']} | {result.seconds(target):.1f} |"
        )
    return "\n".join(lines)


def _summary(result: Any) -> tuple[list[str], dict[str, Any]]:
    devices = [t for t in result.targets if t != "auto"]
    union = frozenset().union(*(result.passed(d) for d in devices)) if devices else frozenset()
    lines = [f"Passes on at least one device: {len(union)} of {len(result.cases)} cases"]
    missed: dict[str, list[str]] = {}
    if "auto" in result.targets:
        auto = result.passed("auto")
        lines.append(
            f"auto passes {len(auto)}; best single device passes {max((len(result.passed(d)) for d in devices), default=0)}"
        )
        for d in devices:
            missed[d] = sorted(result.passed(d) - auto)
            if missed[d]:
                shown = ", ".join(missed[d][:8]) + (" ..." if len(missed[d]) > 8 else "")
                lines.append(f"{d} passes {len(missed[d])} that auto does not: {shown}")
    for target in result.targets:
        slow = result.slowest(target, 3)
        if slow:
            lines.append(f"slowest on {target}: " + ", ".join(f"{r.case} {r.seconds:.2f} s" for r in slow))
    return lines, {"union": len(union), "auto_missed": missed}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", help="comma list of device ids (default: every available device); auto is always run")
    p.add_argument(
        "--sample", type=int, default=1, metavar="N", help="run every N-th case by sorted name (default 1: all)"
    )
    p.add_argument("--offset", type=int, default=0, help="which case of each N to start from (default 0)")
    p.add_argument("--no-auto", action="store_true", help="run the devices alone, not to('auto')")
    p.add_argument(
        "--verify", choices=("seeded", "case", "each-shape", "off"), default="seeded",
        help="how to() verifies: seeded inputs (the default users get), the case's own inputs as example=,\n"
        "each-shape (also each new input shape at its first run; under auto a wrong shape moves on),\n"
        "or off (the HAL's plumbing against the runtime, without verification's refusals)",
    )
    p.add_argument(
        "--reduced-precision", action="store_true",
        help="to(..., reduced_precision=True): devices may compute in a narrower format (float64 in float32,\n"
        "float32 in bfloat16), verified with the reduced tolerances; a user's consent, not the default",
    )
    p.add_argument("--no-verify", action="store_const", dest="verify", const="off", help="the same as --verify off")
    p.add_argument("--cache-dir", help="HAL_CACHE_DIR to use (default: a fresh temporary directory, removed after)")
    p.add_argument("--json", metavar="PATH", help="also write counts, settings and every case's outcome as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _quiet_runtimes()
    from hal.testing import conformance

    with contextlib.ExitStack() as stack:
        # Before anything touches the HAL: device discovery keeps runtime probes in the cache too.
        if args.cache_dir:
            os.environ["HAL_CACHE_DIR"] = args.cache_dir
        else:
            stack.enter_context(conformance.isolated_cache())
        _run(args, conformance)


def _run(args: argparse.Namespace, conformance: Any) -> None:
    targets = _devices(args.devices) + ([] if args.no_auto else ["auto"])
    if not targets:
        raise SystemExit("nothing to run: no available device and --no-auto")
    start = time.perf_counter()
    cases = conformance.collect_cases(every=args.sample, offset=args.offset)
    collected = time.perf_counter() - start
    if not cases:
        raise SystemExit("onnx defines no node test cases here; is the onnx package complete?")

    def progress(index: int, case: Any, _results: Any) -> None:
        if not args.quiet and (index + 1) % 100 == 0:
            print(f"  {index + 1}/{len(cases)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(f"{len(cases)} cases on {', '.join(targets)}", file=sys.stderr, flush=True)
    result = conformance.run(cases, targets, progress=progress, verify=args.verify, reduced_precision=args.reduced_precision)
    wall = time.perf_counter() - start
    lines, summary = _summary(result)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"\n{len(cases)} cases (every {args.sample}. by name from {args.offset}); collected in {collected:.1f} s, {wall:.0f} s in all"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + "\n")
    print(_table(result) + "\n")
    print("\n".join(lines))
    if args.json:
        data = {
            "machine": {**machine_info(), "load_average_end": load},
            "settings": {"sample": args.sample, "offset": args.offset, "targets": targets, "verify": args.verify,
                         "reduced_precision": args.reduced_precision},
            "wall_s": round(wall, 1),
            **summary,
            **result.to_dict(),
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
