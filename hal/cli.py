"""The ``hal`` command: devices, plugins, inspect, run, quantize, bench.

Errors print one line and exit non-zero (1 for a mistake the caller can fix, 3 for a bug);
``--debug`` shows the traceback instead. Output cut short by a closed pipe (``hal explain | head``)
ends quietly with 141, as a command killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hal.errors import HalError

EXIT_ERROR = 1
EXIT_INTERNAL = 3
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


_SHORT = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "float8_e4m3fn": "e4m3",
    "float8_e4m3fnuz": "e4m3fnuz",
    "float8_e5m2": "e5m2",
    "float8_e5m2fnuz": "e5m2fnuz",
    "float8_e8m0": "e8m0",
    "float4_e2m1": "fp4",
}


def _key_capabilities(device: Any) -> str:
    from hal.capabilities import Support

    caps = device.capabilities
    parts = []
    for level, label in ((Support.NATIVE, "native"), (Support.EMULATED, "emulated")):
        names = [_SHORT[f.value] for f, s in caps.formats.items() if s is level and f.value in _SHORT]
        if names:
            parts.append(f"{label} {','.join(names)}")
    fp8 = [_SHORT[f.value] for f, s in caps.formats.items() if f.is_fp8 and s.value == "storage"]
    if fp8:
        parts.append(f"storage {','.join(fp8)}")
    if caps.memory.capacity_bytes:
        parts.append(f"mem {_human_bytes(caps.memory.capacity_bytes)}")
    if caps.interconnect.kind.value != "none":
        bw = f" {caps.interconnect.bandwidth_gbps:g} GB/s" if caps.interconnect.bandwidth_gbps else ""
        parts.append(f"{caps.interconnect.kind.value}{bw}")
    return "; ".join(parts)


def _health_cell(device: Any) -> str:
    """``hal devices``' HEALTH: the last doctor result in a few words."""
    health = device.capabilities.stability.health
    if not health.probes:
        return "not checked"
    rate = f"{health.failures}/{health.probes} failed"
    jitter = "" if health.latency_jitter is None else f", jitter {health.latency_jitter:.2f}"
    return f"{'QUARANTINED' if health.quarantined else 'healthy'} ({rate}{jitter})"


# -- commands ----------------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace) -> int:
    from hal._plugins import registry

    reg = registry()
    devices = reg.devices()
    problems = reg.problems()
    if args.json:
        print(json.dumps({"devices": [d.to_dict() for d in devices], "problems": [p.to_dict() for p in problems]}, indent=2))
        return 0
    rows = [
        [
            d.id,
            d.vendor,
            d.kind.value,
            d.backend,
            "available" if d.available else f"unavailable: {d.reason}",
            _health_cell(d),
            _key_capabilities(d),
        ]
        for d in devices
    ]
    if rows:
        _print_table(rows, ["ID", "VENDOR", "KIND", "BACKEND", "STATUS", "HEALTH", "CAPABILITIES"])
        for d in devices:
            if d.capabilities.stability.health.quarantined:
                from hal.health import quarantine_message

                print(f"quarantined: {quarantine_message(d)}")
    else:
        print("no devices (see `hal plugins`)")
    for p in problems:
        print(f"problem: backend {p.backend} (plugin {p.plugin}): {p.error}")
    for info in reg.plugins():
        if info.status == "error":
            print(f"problem: plugin {info.name}: {info.error}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from hal._plugins import registry

    plugins = registry().plugins()
    if args.json:
        print(json.dumps([p.to_dict() for p in plugins], indent=2))
        return 0
    rows = [
        [
            p.name,
            p.distribution,
            p.version or "-",
            ",".join(p.hooks) or "-",
            ",".join(p.backends) or "-",
            ("isolated, " if p.isolated else "") + (p.status if p.status != "error" else f"error: {p.error}"),
        ]
        for p in plugins
    ]
    _print_table(rows, ["NAME", "DISTRIBUTION", "VERSION", "HOOKS", "BACKENDS", "STATUS"])
    return 0


def _shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _value_type(info: Any) -> str:
    """``float32 [1, ?]`` for a tensor, ``sequence of float32 [?, 3]`` and the like otherwise."""
    return f"{info.format.value} {_shape(info.shape)}" if info.kind == "tensor" else info.describe()


def cmd_inspect(args: argparse.Namespace) -> int:
    import hal

    from hal.compiled import assess

    model = hal.load(args.model)
    req = model.requirements
    verdicts = [assess(model, d) for d in hal.devices()]
    if args.json:
        out = {
            "name": model.name,
            "digest": model.digest,
            "inputs": [i.to_dict() for i in model.inputs],
            "outputs": [o.to_dict() for o in model.outputs],
            **req.to_dict(),
            "devices": [v.to_dict() for v in verdicts],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"model        {model.name}  (sha256 {model.digest[:16]})")
    print(f"ir version   {req.ir_version}")
    print("opsets       " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in req.opsets))
    print("inputs")
    for i in model.inputs:
        print(f"  {i.name}: {_value_type(i)}")
    print("outputs")
    for o in model.outputs:
        print(f"  {o.name}: {_value_type(o)}")
    print("formats      " + ", ".join(f.value for f in req.formats))
    if req.dynamic_dims:
        print("dynamic      " + ", ".join(f"{t}[{a}]={s}" for t, a, s in req.dynamic_dims))
    print(f"parameters   {_human_bytes(req.parameter_bytes)} ({req.parameter_bytes} bytes)")
    print(f"peak memory  ~{_human_bytes(req.estimated_memory_bytes)} (estimate)")
    print("operators")
    for domain, op, count in sorted(req.operators, key=lambda r: (-r[2], r[1])):
        name = op if not domain else f"{domain}.{op}"
        print(f"  {count:6d}  {name}")
    print("devices")
    for v in verdicts:
        if v.status == "cannot":
            print(f"  {v.device}: cannot: {v.reason}")
        elif v.status == "lowered":
            print(f"  {v.device}: runs after lowering: " + "; ".join(s.detail for s in v.steps))
        else:
            print(f"  {v.device}: runs as is")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import hal

    compiled = hal.compile(args.model)
    compiled.save(args.output)
    print(f"compiled {compiled.model.name} ({compiled.digest[:16]}) -> {args.output}")
    for step in compiled.steps:
        print(f"  {step.kind}: {step.detail}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import hal

    compiled = hal.compile(args.model)
    if args.policy is not None and args.device != "auto":
        msg = f"--policy ranks devices for --device auto, not {args.device}"
        raise HalError(msg)
    if args.rtol is not None and args.precision != "relaxed":
        msg = "--rtol is the tolerance of --precision relaxed; pass both"
        raise HalError(msg)
    if args.device == "auto":
        return _explain_auto(compiled, args)
    fallback = None if args.no_fallback else "auto"
    exe = compiled.to(args.device, fallback=fallback, reduced_precision=args.reduced_precision,
                      precision=args.precision, rtol=args.rtol)
    if args.json:
        print(json.dumps({
            "requested": args.device,
            "device": exe.device.id,
            "placement": [p.to_dict() for p in exe.placement],
            "lowering": [s.to_dict() for s in exe.lowering],
            "optimizations": [s.to_dict() for s in compiled.steps],
        }, indent=2))
        return 0
    print(f"model      {compiled.model.name} ({compiled.digest[:16]})")
    print(f"requested  {args.device}")
    print(f"runs on    {exe.device.id} ({exe.device.vendor} {exe.device.name})")
    print("placement")
    for p in exe.placement:
        shown = ", ".join(p.nodes[:8]) + (f", ... ({len(p.nodes)} nodes)" if len(p.nodes) > 8 else "")
        print(f"  {p.device}: {shown}")
    print("lowering" + ("" if exe.lowering else "   none: the device runs the model as compiled"))
    for step in exe.lowering:
        print(f"  {step.kind}: {step.detail}")
    if compiled.steps:
        print("optimizations (hardware-independent, at compile)")
        for step in compiled.steps:
            print(f"  {step.kind}: {step.detail}")
    return 0


def _explain_auto(compiled: Any, args: argparse.Namespace) -> int:
    from hal.selection import explain_auto

    exe, error, candidates = explain_auto(
        compiled, args.policy, reduced_precision=args.reduced_precision, precision=args.precision, rtol=args.rtol,
    )
    if args.json:
        print(json.dumps({
            "requested": "auto",
            "policy": args.policy or "default",
            "device": None if exe is None else exe.device.id,
            "error": None if error is None else str(error),
            "candidates": [c.to_dict() for c in candidates],
            "placement": [] if exe is None else [p.to_dict() for p in exe.placement],
            "lowering": [] if exe is None else [s.to_dict() for s in exe.lowering],
        }, indent=2))
        return 0 if exe is not None else EXIT_ERROR
    print(f"model      {compiled.model.name} ({compiled.digest[:16]})")
    print(f"requested  auto, policy {args.policy or 'default'}")
    print(f"runs on    {exe.device.id} ({exe.device.vendor} {exe.device.name})" if exe is not None else f"runs on    nothing: {error}")
    rows = []
    for c in candidates:
        steps = "; ".join(s.kind.value for s in c.verdict.steps) or "-"
        rows.append([
            "-" if c.place is None else str(c.place),
            c.device,
            c.verdict.status,
            f"{_ms(c.p50_s)} ms" if c.p50_s is not None else "-",
            f"{_ms(c.estimate_s)} ms (est.)" if c.estimate_s is not None else "-",
            steps,
            c.why,
        ])
    print("candidates")
    _print_table(rows, ["#", "DEVICE", "VERDICT", "MEASURED P50", "ESTIMATE", "LOWERING", "WHY"])
    if exe is not None:
        print("lowering" + ("" if exe.lowering else "   none: the device runs the model as compiled"))
        for step in exe.lowering:
            print(f"  {step.kind}: {step.detail}")
    return 0 if exe is not None else EXIT_ERROR


def cmd_doctor(args: argparse.Namespace) -> int:
    from hal.doctor import doctor

    if args.burn_in < 1:
        msg = f"--burn-in must be at least 1, got {args.burn_in}"
        raise HalError(msg)
    live = sys.stderr.isatty() and not args.json

    def progress(device: str, canary: str, done: int, total: int) -> None:
        print(f"\r{device}: {done}/{total} canaries ({canary})".ljust(60), end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    reports = doctor(args.device, burn_in=args.burn_in, timeout=args.timeout, progress=progress if live else None)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        rows = []
        for r in reports:
            h = r.health
            rows.append([
                r.device,
                r.status.upper() if r.status == "quarantined" else r.status,
                str(h.probes),
                str(h.failures),
                "-" if h.error_rate is None else f"{h.error_rate:.1%}",
                {True: "yes", False: "no", None: "-"}[h.deterministic],
                "-" if h.latency_jitter is None else f"{h.latency_jitter:.2f}",
                ", ".join(f"{c.model}:{c.agreement}" for c in r.canaries if c.status == "ran") or "-",
            ])
        _print_table(rows, ["DEVICE", "STATUS", "RUNS", "FAILED", "ERROR RATE", "SAME BITS", "JITTER P90/P50", "AGREEMENT"])
        for r in reports:
            for reason in r.reasons:
                print(f"{r.device}: {reason}")
        if any(r.status == "quarantined" for r in reports):
            print("quarantined devices are refused by to() until `hal doctor --device D` passes")
    return EXIT_ERROR if any(r.status == "quarantined" for r in reports) else 0


def cmd_cache(args: argparse.Namespace) -> int:
    from hal import cache

    if args.action == "clear":
        freed = cache.clear()
        print(f"cleared {_human_bytes(freed)} from {cache.info()['root']}")
        return 0
    data = cache.info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"cache root  {data['root']}")
    if not data["sections"]:
        print("  empty")
    for name, section in data["sections"].items():
        print(f"  {name:24s} {section['files']:6d} files  {_human_bytes(section['bytes'])}")
    return 0


def _parse_inputs(pairs: Sequence[str]) -> dict[str, Path]:
    feeds = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            msg = f"--input {pair!r} must be NAME=FILE.npy"
            raise HalError(msg)
        if name in feeds:
            msg = f"--input {name} is given twice"
            raise HalError(msg)
        feeds[name] = Path(path)
    return feeds


def _load_npy(name: str, path: Path, expected: Any) -> Any:
    """The array in a .npy file, its header checked against the file's size before anything is
    allocated (a header may claim any shape)."""
    import numpy as np

    from hal.errors import InputError

    where = f"input {name}: {path}"
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the checks
    except FileNotFoundError:
        msg = f"input {name}: file {path} does not exist"
        raise InputError(msg) from None
    except OSError as exc:
        msg = f"{where} cannot be read: {exc.strerror or exc}"
        raise InputError(msg) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(6)
        if magic != b"\x93NUMPY":
            what = "a .npz archive (several arrays)" if magic[:2] == b"PK" else "not a .npy file"
            msg = f"{where} is {what}; save one array per input with np.save(FILE.npy, array) and pass NAME=FILE.npy"
            raise InputError(msg)
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                msg = f"{where} is .npy format version {version[0]}.{version[1]}; save it with np.save (format 1.0 or 2.0)"
                raise InputError(msg)
        except (ValueError, EOFError) as exc:
            msg = f"{where} is not a readable .npy file ({exc}); save it again with np.save"
            raise InputError(msg) from None
        if dtype.hasobject:
            msg = f"{where} holds Python objects, which are never unpickled; save a numeric array"
            raise InputError(msg)
        need = math.prod(shape) * dtype.itemsize
        have = size - f.tell()
        if need > have:
            msg = (
                f"{where}: its header says shape {list(shape)} of {dtype} ({need} bytes), but the file holds "
                f"{have} bytes of data; it is truncated or damaged: save it again with np.save"
            )
            raise InputError(msg)
        f.seek(0)
        try:
            array = np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            msg = f"{where} is not a readable .npy file ({exc}); save it again with np.save"
            raise InputError(msg) from None
    # np.save writes ml_dtypes arrays (bfloat16, FP8, int4) as raw void bytes: reinterpret them.
    if expected is not None and array.dtype.kind == "V" and array.dtype.itemsize == expected.itemsize:
        array = array.view(expected)
    return array


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name).lstrip(".") or "output"


def _output_files(names: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """A distinct file for every output, even when names differ only in characters a file name
    cannot hold (``a/b`` and ``a_b``) or in case (on file systems that ignore it)."""
    files: dict[str, Path] = {}
    used: set[str] = set()
    for name in names:
        base = stem = _safe_filename(name)
        n = 1
        while stem.lower() in used:
            n += 1
            stem = f"{base}_{n}"
        used.add(stem.lower())
        files[name] = out_dir / f"{stem}.npy"
    return files


def _output_dir(value: str) -> Path:
    from hal.errors import OutputPathError

    out_dir = Path(value)
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"--output-dir {out_dir} is a file, not a directory; name a directory (a missing one is created)"
        raise OutputPathError(msg)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"--output-dir {out_dir} cannot be created: {exc.strerror or exc}"
        raise OutputPathError(msg) from None
    return out_dir


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    import hal

    from hal.errors import OutputPathError

    inputs = _parse_inputs(args.input)
    out_dir = _output_dir(args.output_dir) if args.output_dir else None
    compiled = hal.compile(args.model)
    sequences = [i for i in compiled.inputs if i.kind.is_sequence]
    if sequences:
        from hal.errors import InputError

        shown = ", ".join(f"{i.name!r} ({i.describe()})" for i in sequences)
        msg = f"hal run feeds one .npy array per input, and {shown} takes a list of arrays: run the model from Python"
        raise InputError(msg)
    exe = compiled.to(args.device)
    expected = {i.name: i.dtype for i in exe.inputs}
    feeds = {name: _load_npy(name, path, expected.get(name)) for name, path in inputs.items()}
    outputs = exe.run(feeds)
    files = _output_files(list(outputs), out_dir) if out_dir is not None else {}
    print(f"ran {compiled.model.name} on {exe.device.id}")
    for name, array in outputs.items():
        if array is None:  # an absent optional: nothing to write
            print(f"  {name}: absent (None)")
            continue
        if isinstance(array, list):  # a sequence: one .npz of arr_0, arr_1, ... in order
            line = f"  {name}: sequence of {len(array)}: " + ", ".join(f"{a.dtype} {list(a.shape)}" for a in array)
            target = files[name].with_suffix(".npz") if out_dir is not None else None
        else:
            line = f"  {name}: {array.dtype} {list(array.shape)}"
            target = files[name] if out_dir is not None else None
        if target is not None:
            try:
                if isinstance(array, list):
                    np.savez(target, *array, allow_pickle=False)
                else:
                    np.save(target, array, allow_pickle=False)
            except OSError as exc:
                msg = f"cannot write output {name!r} to {target}: {exc.strerror or exc}"
                raise OutputPathError(msg) from None
            line += f" -> {target}"
        elif not isinstance(array, list) and array.size <= 16:
            line += f" {array.tolist()}"
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import hal

    compiled = hal.compile(args.model)
    expected = {i.name: i.dtype for i in compiled.inputs}
    example = {name: _load_npy(name, path, expected.get(name)) for name, path in _parse_inputs(args.input).items()}
    reports = compiled.verify(args.devices or None, example=example or None, rtol=args.rtol, atol=args.atol,
                              reduced_precision=args.reduced_precision)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        rows = []
        for r in reports:
            if not r.checks:
                rows.append([r.device, r.status, r.reference or "-", "-", "-", "-", r.detail or ""])
            for c in r.checks:
                rows.append([r.device, "pass" if c.passed else "FAIL", r.reference or "-", c.name,
                             f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", c.reason or f"rtol={c.tolerance.rtol:g} atol={c.tolerance.atol:g}"])
        _print_table(rows, ["device", "result", "reference", "output", "max abs", "max rel", "tolerance / why"])
    return 0 if all(r.status in ("passed", "skipped") for r in reports) and reports else EXIT_ERROR


def cmd_quantize(args: argparse.Namespace) -> int:
    import hal
    import hal.quantize

    if args.requantize:
        model = hal.quantize.requantize(args.model, scale=args.requantize, rounding=args.rounding, keep_e8m0=args.keep_e8m0)
    else:
        model = hal.quantize.fp8(args.model, format=args.fp8, scale=args.scale, block=args.block, rounding=args.rounding,
                                 skip=args.skip, keep_e8m0=args.keep_e8m0)
    target = hal.quantize.save(model, args.output)
    record = hal.quantize.summary(model) or {}
    what = "requantized" if args.requantize else "quantized"
    print(f"{what} {len(record.get('tensors', {}))} weight(s) of {model.name} -> {target}")
    if args.report:
        reference = args.model
        for line in hal.quantize.accuracy(reference, model, seed=args.seed).lines():
            print(f"  {line}")
    else:
        for entry in record.get("skipped", ()):
            print(f"  skipped {entry['name']}: {entry['reason']}")
    return 0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}x"


def _bench_progress(stack: Any, by_seconds: bool) -> Any:
    """A rich progress bar on stderr, one line per device, updated by hal.bench's callback."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = stack.enter_context(Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}"), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ))
    tasks: dict[str, Any] = {}

    def progress(device: str, stage: str, done: float, total: float) -> None:
        task = tasks.get(device)
        if task is None:
            task = tasks[device] = bar.add_task(device, total=None, done="")
        if stage == "runs":
            shown = f"{done:.1f}/{total:g} s" if by_seconds else f"{done:.0f}/{total:.0f} runs"
            bar.update(task, description=f"{device}: timing", completed=done, total=total, done=shown)
        elif stage == "done":
            bar.update(task, description=f"{device}: done", completed=1, total=1, done="")
        else:
            bar.update(task, description=f"{device}: {stage}")

    return progress


def _print_bench(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from hal.bench import WARMUP_RUNS

    budget = f"{report.runs} runs" if report.runs is not None else f"{report.seconds:g} s of runs"
    table = Table(
        title=f"hal bench {report.model}: batch {report.batch}, {budget} after {WARMUP_RUNS} warm-up, baseline {report.baseline}",
        caption=(
            "measured: wall time on this machine, one caller; estimated: a roofline from the device's declared figures, "
            f"never a measurement; – none; peak mem: {report.memory_method or 'not available here'}"
        ),
    )
    for header in ("device", "verified", "cold to() s", "warm to() s", "p50 ms", "p90 ms", "p99 ms", "samples/s",
                   "peak mem", "speed (measured)"):
        table.add_column(header, justify="left" if header in ("device", "verified") else "right")
    table.add_column("latency (estimated)", justify="right", style="italic")
    table.add_column("speed (estimated)", justify="right", style="italic")
    for r in report.rows:
        name = f"{r.device} (baseline)" if r.device == report.baseline else r.device
        if r.error is not None:
            table.add_row(name, "cannot", *["–"] * 10)
            continue
        lat = r.latency
        table.add_row(
            name, r.verification or "-", _seconds(r.cold_to), _seconds(r.warm_to), _ms(lat.p50), _ms(lat.p90),
            _ms(lat.p99), f"{r.throughput:.4g}" if r.throughput else "-", _human_bytes(r.peak_memory), _times(r.speed),
            "–" if r.estimate is None else f"{_ms(r.estimate.seconds)} ms", _times(r.estimated_speed),
        )
    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print(table)
    for line in report.lines():
        console.print(line, highlight=False, markup=False)


def cmd_bench(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from hal import bench

    if args.plot:
        bench.check_plot(args.plot)  # before the runs, not after them
    with ExitStack() as stack:
        live = sys.stderr.isatty() and not args.json
        report = bench.bench(
            args.model, args.devices or None, baseline=args.baseline, runs=args.runs, seconds=args.seconds,
            batch=args.batch, progress=_bench_progress(stack, args.seconds is not None) if live else None,
        )
    if args.plot:
        bench.plot(report, args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_bench(report)
        if args.plot:
            print(f"chart: {args.plot}")
    return 0 if any(r.measured for r in report.rows) else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    from hal import __version__

    parser = argparse.ArgumentParser(prog="hal", description="Compile an ONNX model once, run it on any chip.")
    parser.add_argument("--version", action="version", version=f"onnx-hal {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("devices", help="list devices, available or not (with the reason)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("plugins", help="list plugins: version, hooks, loaded or the error")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("inspect", help="show a model's inputs, outputs, opsets, formats and operators")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compile", help="compile a model once into a portable file")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="where to write the compiled model")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("explain", help="show where a model's nodes run on a device and what was changed")
    p.add_argument("model")
    p.add_argument("--device", default="auto", help="device id or auto (default): auto shows every candidate and why")
    p.add_argument("--policy", help="with auto: fastest, stable, native-fp8, or a plugin's (default: the default order)")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of moving the model to another device")
    p.add_argument("--reduced-precision", action="store_true", help="allow narrower compute types than declared")
    p.add_argument("--precision", default="exact", choices=["exact", "relaxed"],
                   help="relaxed: reduced-precision variants where their outputs are within --rtol of the reference")
    p.add_argument("--rtol", type=float, help="the tolerance of --precision relaxed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("doctor", help="run canary models on each device: errors, hangs, NaNs, agreement, determinism, jitter; quarantine")
    p.add_argument("--device", action="append", metavar="D", help="device id; repeat (default: every available device)")
    p.add_argument("--burn-in", type=int, default=10, metavar="N", help="runs of each canary per device (default 10)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds a run may take before it counts as a hang (default HAL_DOCTOR_TIMEOUT_S or 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("cache", help="show or clear the compile cache")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("run", help="run a model on a device with inputs from .npy files")
    p.add_argument("model")
    p.add_argument("--device", required=True, help="device id, e.g. ort:cpu (see `hal devices`)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument("--output-dir", help="write each output to DIR/NAME.npy")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", help="check each device's outputs against the reference (exit 1 if any differs)")
    p.add_argument("model")
    p.add_argument("--devices", nargs="+", metavar="D", help="device ids (default: every available device)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="real inputs instead of seeded ones")
    p.add_argument("--rtol", type=float, help="relative tolerance for every output (default: per element type)")
    p.add_argument("--atol", type=float, help="absolute tolerance for every output (default: per element type)")
    p.add_argument("--reduced-precision", action="store_true", help="allow narrower compute types than declared")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("conformance", help="run onnx's node test cases: passed / wrong / errors per device")
    p.add_argument("--device", action="append", metavar="D", help="device id or auto; repeat (default: all available and auto)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="run every N-th case by name (default 1: all)")
    p.add_argument(
        "--verify", choices=("seeded", "case", "each-shape", "off"), default="seeded",
        help="how to() verifies: seeded inputs (default), each case's own inputs (example=), each new shape too, or not",
    )
    p.add_argument("--json", action="store_true", help="one object per device: device, total, passed, wrong, errors, reasons")
    p.set_defaults(func=cmd_conformance)

    p = sub.add_parser("quantize", help="quantize a model's MatMul/Gemm/Conv weights to FP8 with block scales")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="where to write the quantized model (.data beside it past 1 GiB)")
    p.add_argument("--fp8", default="e4m3fn", choices=["e4m3fn", "e5m2"], help="element format (default e4m3fn)")
    p.add_argument("--scale", default="float32", choices=["float32", "ue8m0"], help="scale format (default float32)")
    p.add_argument("--block", default="128x128", help="ROWSxCOLS (output channels x reduction), e.g. 128x128, 1x32, or channel")
    p.add_argument("--rounding", default="up", choices=["up", "nearest", "down"], help="UE8M0 rounding, as ONNX Cast-24 (default up)")
    p.add_argument("--skip", action="append", default=[], metavar="NAME", help="node or weight name or glob to leave float32; repeat")
    p.add_argument("--keep-e8m0", action="store_true", help="store UE8M0 scales as FLOAT8E8M0 tensors (opset 24)")
    p.add_argument("--requantize", choices=["ue8m0"], help="move an FP8 model's float32 block scales to UE8M0, requantizing its values")
    p.add_argument("--report", action="store_true", help="print per-tensor SQNR, end-to-end error on ort:cpu and bytes saved")
    p.add_argument("--seed", type=int, default=0, help="seed of the report's inputs (default 0)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="every device side by side: cold/warm to(), latency, throughput, memory, estimate")
    p.add_argument("model")
    p.add_argument("--devices", nargs="+", metavar="D", help="device ids (default: every available device)")
    p.add_argument("--baseline", metavar="D", help="the device every figure is relative to (default: the first)")
    p.add_argument("--runs", type=int, metavar="N", help="timed runs per device after warm-up (default 100)")
    p.add_argument("--seconds", type=float, metavar="S", help="time runs for S seconds per device instead of --runs")
    p.add_argument("--batch", type=int, metavar="B", help="the first input dimension, where it is symbolic")
    p.add_argument("--json", action="store_true", help="the report as JSON only (no table, no progress bar)")
    p.add_argument("--plot", metavar="FILE.png", help="a bar chart of measured and estimated speed (needs onnx-hal[plot])")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="serve a model over HTTP (Open Inference Protocol v2) on Ray Serve, across a fleet's devices")
    p.add_argument("model")
    p.add_argument("--devices", nargs="+", default=["auto"], metavar="ID",
                   help="device ids (on every node that lists them) or fleet ids ray:NODE:ID (default: auto)")
    p.add_argument("--ray", metavar="ADDRESS", help="the Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--name", help="the model's name in URLs (default: the graph's name)")
    p.add_argument("--replicas", type=int, default=1, help="actors per device (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plugin", help="write a new vendor plugin package")
    plugin = p.add_subparsers(dest="plugin_command", required=True, metavar="ACTION")
    p = plugin.add_parser("new", help="scaffold hal-NAME: entry point, a backend with TODOs, tests running the contract kit")
    p.add_argument("name", help="backend name: device ids NAME:0, module hal_NAME")
    p.add_argument("--dir", default=".", help="where to create the hal-NAME folder (default: here)")
    p.set_defaults(func=cmd_plugin_new)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import ray
    except ImportError:
        msg = "hal serve needs Ray Serve: pip install 'onnx-hal[ray]'"
        raise HalError(msg) from None
    import time

    import hal
    from hal.ray import serve as hal_serve

    compiled = hal.compile(args.model)  # a bad model fails here, before any cluster starts
    devices = "auto" if args.devices == ["auto"] else args.devices
    ray.init(address=args.ray, log_to_driver=False)
    url = hal_serve.run(compiled, name=args.name, devices=devices, replicas=args.replicas, port=args.port, host=args.host)
    name = args.name or compiled.model.name
    print(f"serving {name!r} at {url}/v2/models/{name} (ready at {url}/v2/health/ready once verified); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def cmd_plugin_new(args: argparse.Namespace) -> int:
    from hal._scaffold import new_plugin

    root, written = new_plugin(args.name, args.dir)
    print(f"wrote {root}:")
    for path in written:
        print(f"  {path.relative_to(root)}")
    print(f"next: cd {root} && pytest   (then write discover() and prepare() in hal_{args.name}/__init__.py)")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from hal.testing import conformance

    if args.every < 1:
        msg = f"--every must be at least 1, got {args.every}"
        raise HalError(msg)
    live = sys.stderr.isatty() and not args.json

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} cases", end="" if done < total else "\n", file=sys.stderr, flush=True)

    summaries = conformance.survey(args.device, every=args.every, verify=args.verify, progress=progress if live else None)
    if args.json:
        print(json.dumps([s.to_dict() for s in summaries], indent=2))
        return 0
    sample = "every case" if args.every == 1 else f"every {args.every}th case by name"
    print(f"onnx node test cases, {sample}: {summaries[0].total if summaries else 0}")
    _print_table([[s.device, str(s.total), str(s.passed), str(s.wrong), str(s.draws), str(s.errors)] for s in summaries],
                 ["DEVICE", "TOTAL", "PASSED", "WRONG", "DRAWS", "ERRORS"])
    for s in summaries:
        print(f"\n{s.device}: most common reasons")
        for text, count in s.reasons:
            print(f"  {count:5d}  {text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG)
        return int(args.func(args))
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader left (``| head``): what is left to print goes nowhere, quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except HalError as exc:
        print(f"hal: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, ours or a plugin's: still one line, --debug for more
        print(f"hal: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
