"""A model with about 3 GiB of external weights through the HAL, against the runtimes called directly.

    python benchmarks/large_model.py                     # ort:cpu, and openvino:CPU, iree:local-task where installed
    python benchmarks/large_model.py --devices iree:local-task --runs 3
    python benchmarks/large_model.py --devices "ort:cpu,ort:cpu;graph_optimization=disabled"   # to() options after ";"
    python benchmarks/large_model.py --dir /data/big --runs 3 --json out.json
    python benchmarks/large_model.py --small             # the benchmark models saved with external data,
                                                         # peak memory of load + compile + to()

The model (generated once into ``--dir``, random float32): a 131072 x 4096 embedding looked up
with Gather (2 GiB, of which a run reads 8 rows) and four blocks of MatMul 4096x8192 -> Relu ->
MatMul 8192x4096 (1 GiB), stored as ONNX external data in one file.

Each measurement is a fresh process: the HAL's ``hal.load`` + ``compile`` + ``to(device)`` + one
``run``, against ``onnxruntime.InferenceSession(path)`` + one run (or OpenVINO's ``read_model`` +
``compile_model`` + one inference; iree:local-task has no direct row: IREE's own route for such
a model, ``iree-import-onnx --externalize-params``, first writes the weights to a new ``.irpa``
file), with peak resident memory (``ru_maxrss``) and wall time after
the imports; imports are timed on their own. The HAL runs twice per round: first with an empty
cache directory (the weights' digest is computed), then with the cache the first left (the digest
is remembered). Rounds alternate the variants; medians are reported. ``hal inspect`` on the model
is timed too (a fresh process, wall clock).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import machine_info

VOCAB, WIDTH, HIDDEN, BLOCKS, TOKENS = 131072, 4096, 8192, 4, 8


def build(directory: Path) -> Path:
    """Write the model and its data file (about 3 GiB) unless they are there already."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    path = directory / "decoder.onnx"
    data = directory / "decoder.bin"
    if path.is_file() and data.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors, offset = [], 0
    shapes = [("embedding", (VOCAB, WIDTH))]
    for b in range(BLOCKS):
        shapes += [(f"up{b}", (WIDTH, HIDDEN)), (f"down{b}", (HIDDEN, WIDTH))]
    expected = sum(a * b * 4 for _, (a, b) in shapes)
    regenerate = not (data.is_file() and data.stat().st_size == expected)
    with open(data, "wb" if regenerate else "rb") as f:
        for name, shape in shapes:
            rows_per_chunk = max(1, (64 << 20) // (shape[1] * 4))
            scale = np.float32(1.0 / np.sqrt(shape[0]))
            for start in range(0, shape[0], rows_per_chunk if regenerate else shape[0]):
                if not regenerate:
                    break
                rows = min(rows_per_chunk, shape[0] - start)
                f.write((rng.standard_normal((rows, shape[1]), dtype=np.float32) * scale).tobytes())
            nbytes = shape[0] * shape[1] * 4
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in {"location": data.name, "offset": str(offset), "length": str(nbytes)}.items():
                tensor.external_data.add(key=key, value=value)
            tensors.append(tensor)
            offset += nbytes
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["h0"])]
    for b in range(BLOCKS):
        nodes += [
            helper.make_node("MatMul", [f"h{b}", f"up{b}"], [f"u{b}"]),
            helper.make_node("Relu", [f"u{b}"], [f"r{b}"]),
            helper.make_node("MatMul", [f"r{b}", f"down{b}"], [f"d{b}"]),
            helper.make_node("Add", [f"h{b}", f"d{b}"], [f"h{b + 1}"]),
        ]
    nodes.append(helper.make_node("Identity", [f"h{BLOCKS}"], ["y"]))
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
        initializer=tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(str(_write(path, model)))
    return path


def _write(path: Path, model: Any) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# -- one measurement, in a fresh process -------------------------------------------------------------


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec (Linux
    carries ru_maxrss over from the parent, which would count the benchmark's own memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(mode: str, path: str, device: str) -> dict[str, Any]:
    start = time.perf_counter()
    import numpy as np

    ids = (np.arange(TOKENS, dtype=np.int64) * 997 % VOCAB).reshape(1, TOKENS)
    if mode == "ort":
        import onnxruntime as ort

        imported = time.perf_counter()
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = session.run(None, {"ids": ids})[0]
    elif mode == "openvino":
        import openvino as ov

        imported = time.perf_counter()
        core = ov.Core()
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        y = compiled.create_infer_request().infer({0: ids})[0]
    else:
        import onnx  # noqa: F401 - the fixed cost of importing onnx and the HAL is timed apart
        import onnxruntime  # noqa: F401

        import hal
        import hal.compiled  # noqa: F401

        if device.startswith("openvino"):
            import openvino  # noqa: F401
        if device.startswith("iree"):
            import iree.runtime  # noqa: F401
        imported = time.perf_counter()
        device, _, setting = device.partition(";")  # "ort:cpu;graph_optimization=disabled"
        options = dict([setting.split("=", 1)]) if setting else {}
        exe = hal.compile(hal.load(path)).to(device, strict=True, **options)
        y = exe.run({"ids": ids})["y"]
    done = time.perf_counter()
    return {
        "import_s": imported - start,
        "seconds": done - imported,
        "maxrss_bytes": _peak_rss(),
        "checksum": float(np.asarray(y, np.float64).sum()),
    }


def _measure(mode: str, path: Path, device: str = "", cache: str | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if cache is not None:
        env["HAL_CACHE_DIR"] = cache
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path), device],
        capture_output=True, text=True, env=env, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} {device} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _inspect_seconds(path: Path, cache: str) -> float:
    env = dict(os.environ, HAL_CACHE_DIR=cache)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hal", "inspect", str(path)], capture_output=True, env=env, check=True)
    return time.perf_counter() - start


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def large(args: argparse.Namespace) -> dict[str, Any]:
    path = build(Path(args.dir))
    weights = (Path(args.dir) / "decoder.bin").stat().st_size
    if args.devices:
        devices = args.devices.split(",")
    else:
        devices = ["ort:cpu"] + (["openvino:CPU"] if _has("openvino") else [])
        devices += ["iree:local-task"] if _has("iree.runtime") else []
    rows: dict[str, list[dict[str, Any]]] = {}
    inspect: list[float] = []
    for _ in range(args.runs):
        for device in devices:
            direct = {"ort:cpu": "ort", "openvino:CPU": "openvino"}.get(device)  # not again for "ort:cpu;..."
            if direct is not None:
                rows.setdefault(direct, []).append(_measure(direct, path))
            with tempfile.TemporaryDirectory() as cache:
                rows.setdefault(f"hal {device} first", []).append(_measure("hal", path, device, cache))
                rows.setdefault(f"hal {device} second", []).append(_measure("hal", path, device, cache))
                if device == "ort:cpu":
                    inspect.append(_inspect_seconds(path, cache))
    table = {
        name: {
            "seconds": _median(r, "seconds"),
            "import_s": _median(r, "import_s"),
            "peak_gib": _median(r, "maxrss_bytes") / 2**30,
            "peak_over_weights": _median(r, "maxrss_bytes") / weights,
            "checksums": sorted({round(x["checksum"], 2) for x in r}),
        }
        for name, r in rows.items()
    }
    return {"weights_gib": weights / 2**30, "rows": table, "hal_inspect_s": statistics.median(inspect) if inspect else None}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- the smaller benchmark models ------------------------------------------------------------------


def small(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of load + compile + to('ort:cpu') for each benchmark model saved with external
    data, under this checkout and under ``--before`` (another checkout's root, e.g. a git worktree
    of the commit before the change), side by side."""
    import onnx

    from hal.testing import models

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, _feeds) in models.zoo(small=False).items():
            if name == "add":
                continue
            directory = Path(tmp) / name
            directory.mkdir()
            path = directory / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.bin", size_threshold=1024)
            weights = (directory / "model.bin").stat().st_size
            row: dict[str, Any] = {"weights_mib": weights / 2**20}
            for label, root in (("after", str(Path(__file__).resolve().parents[1])), ("before", args.before)):
                if not root:
                    continue
                peaks = []
                for _ in range(args.runs):
                    with tempfile.TemporaryDirectory() as cache:
                        env = dict(os.environ, HAL_CACHE_DIR=cache, PYTHONPATH=root, HAL_LOAD_PLUGINS="")
                        out = subprocess.run(  # cwd: not this checkout, which '' on sys.path would import
                            [sys.executable, "-c", _SMALL_CHILD, str(path)],
                            capture_output=True, text=True, env=env, check=False, cwd=cache,
                        )
                        if out.returncode != 0:
                            raise SystemExit(f"{name} ({label}) failed:\n{out.stderr[-2000:]}")
                        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
                row[label] = {
                    "peak_mib": statistics.median(p["peak"] for p in peaks) / 2**20,
                    "baseline_mib": statistics.median(p["base"] for p in peaks) / 2**20,
                    "seconds": statistics.median(p["seconds"] for p in peaks),
                    "hal": peaks[0]["hal"],
                }
            results[name] = row
    return results


_SMALL_CHILD = """
import json, sys, time
def hwm():  # VmHWM: peak resident memory of this process (ru_maxrss would include the parent's)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
import hal, onnxruntime, onnx
base = hwm()
t = time.perf_counter()
hal.compile(hal.load(sys.argv[1])).to("ort:cpu", strict=True, verify=False)
print(json.dumps({"peak": hwm(), "base": base,
                  "seconds": time.perf_counter() - t, "hal": hal.__file__}))
"""


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "hal-large-model"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--devices", default="", help="comma list of HAL devices (default: ort:cpu and those installed)")
    parser.add_argument("--small", action="store_true", help="the benchmark models' peak memory instead")
    parser.add_argument("--before", default="", help="with --small: root of a checkout to compare against")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"machine": machine_info(), "small" if args.small else "large": small(args) if args.small else large(args)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
