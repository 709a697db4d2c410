"""iree:cuda checked on a real NVIDIA GPU whose machine cannot hold IREE's compiler.

    # here (any x86-64 machine, no GPU): compile every model for iree:cuda into DIR
    HAL_LOAD_PLUGINS=iree python plugins/hal-iree/benchmarks/gpu_check.py record DIR [--gpu-target sm_90]
    # there (a GPU, iree-base-runtime, no iree-base-compiler): run them through the HAL
    HAL_LOAD_PLUGINS=iree python plugins/hal-iree/benchmarks/gpu_check.py replay DIR --out report.json

Why two halves: the machines we are lent a GPU on take at most 64 MiB of files per call, and
iree-base-compiler's wheel is 84 MB (its one library 335 MB), while the runtime's is 15 MB. IREE
compiles for CUDA without a GPU, so ``record`` runs the HAL's own ``to("iree:cuda")`` here, with
the device declared available, and keeps each vmfb under the hash of the lowered model and the
flags the plugin chose. ``replay`` runs the same ``to("iree:cuda")`` on the GPU, with placement
verification on (the ONNX reference evaluator or ort:cpu), the plugin's real runner and IREE's
CUDA driver; only the compiler call is answered from DIR, by model name and flags (a model
recorded under other flags is a CompileError). The report says whether the lowered model there
is byte for byte the one compiled here (onnx and onnxruntime versions may differ between the
machines); verification and the comparison with ort:cpu judge the answers either way.

Per model, ``replay`` reports: placement verification's verdict, the largest relative error
against ort:cpu on random feeds, the same feeds passed read-only, strided and Fortran-ordered,
8 threads x 25 runs on one Executable with distinct inputs (wrong answers counted), and the
median run time on iree:cuda and on ort:cpu, interleaved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


#: The model being placed (record and replay answer the compiler by model name and flags).
_CURRENT = {"name": ""}


def _key(flags: list[str]) -> str:
    return hashlib.sha256(json.dumps([_CURRENT["name"], list(flags)]).encode()).hexdigest()[:32]


def _lowered_digest(proto: Any) -> str:
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def _models() -> dict[str, tuple[Any, dict[str, np.ndarray]]]:
    from hal.testing import models

    out = {f"{name}-small": value for name, value in models.zoo(small=True).items()}
    # resnet18_like at full size is a 47 MB vmfb: over what a call to the GPU machine carries.
    full = {name: value for name, value in models.zoo(small=False).items() if name not in ("add", "resnet18_like")}
    out.update({f"{name}-full": value for name, value in full.items()})
    return out


def record(directory: Path, gpu_target: str) -> None:
    """Compile every model for iree:cuda through the HAL, on a machine without a GPU."""
    import hal
    from hal_iree import _compile
    from hal_iree.backend import DeviceKind, IreeBackend

    directory.mkdir(parents=True, exist_ok=True)
    real_discover = IreeBackend.discover

    def discover(self: IreeBackend) -> list[Any]:  # iree:cuda as discovery lists it on that GPU
        details = {"driver": "cuda", "gpu_target": gpu_target}
        gpu = self._device("cuda", "cuda", DeviceKind.GPU, "NVIDIA", True, None, details)  # noqa: SLF001
        return [gpu if d.id == "iree:cuda" else d for d in real_discover(self)]

    class NotRun:
        def run(self, feeds: Any, names: Any) -> Any:
            raise AssertionError("record mode never runs a model")

    real_build = _compile.build_vmfb

    def build(
        model: Any, flags: list[str], device_id: str, workdir: str | None = None, parameters: Any = None
    ) -> bytes:
        data = real_build(model, flags, device_id, workdir, parameters)
        (directory / f"{_key(flags)}.vmfb").write_bytes(data)
        (directory / f"{_key(flags)}.lowered").write_text(_lowered_digest(model))
        return data

    IreeBackend.discover = discover  # type: ignore[method-assign]
    IreeBackend._load = lambda self, data, model, device, parameters=None: NotRun()  # type: ignore[method-assign]  # noqa: ARG005, SLF001
    _compile.build_vmfb = build
    (directory / "compiler.txt").write_text(_compile.compiler_version())
    for name, (model, _feeds) in _models().items():
        _CURRENT["name"] = name
        start = time.perf_counter()
        try:
            hal.compile(model).to("iree:cuda", strict=True, verify=False)
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        except hal.errors.HalError as exc:
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)


def _median_ms(fn: Any, runs: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rel(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, want in expected.items():
        got = np.asarray(actual[name], dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        scale = max(float(np.max(np.abs(want))), 1e-30)
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
    return worst


def _user_arrays(feeds: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    def read_only(a: np.ndarray) -> np.ndarray:
        b = np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)
        return b

    def strided(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, 2, axis=-1)[..., ::2]

    return {
        "read-only": {k: read_only(v) for k, v in feeds.items()},
        "strided": {k: strided(v) for k, v in feeds.items()},
        "fortran": {k: np.asfortranarray(v) for k, v in feeds.items()},
    }


def _direct_invoker(directory: Path, feeds: dict[str, np.ndarray]) -> Any:
    """IREE's own Python API on the same vmfb: the floor for the HAL's run on this GPU."""
    import iree.runtime as rt
    from hal_iree._compile import ENTRY

    key = _key(["--iree-hal-target-device=cuda", "--iree-cuda-target=sm_89"])
    instance = rt.VmInstance()
    device = rt.get_driver("cuda").create_default_device()
    module = rt.VmModule.copy_buffer(instance, (directory / f"{key}.vmfb").read_bytes())
    context = rt.VmContext(instance, modules=[rt.create_hal_module(instance, device), module])
    invoker = rt.FunctionInvoker(context, device, module.lookup_function(ENTRY))
    args = list(feeds.values())

    def run() -> Any:
        result = invoker(*args)
        return [r.to_host() for r in (result if isinstance(result, tuple) else (result,))]

    return run


def replay(directory: Path, out: Path | None, runs: int) -> dict[str, Any]:
    """Run every recorded model on iree:cuda through the HAL, answering compiles from ``directory``."""
    import hal
    from hal.errors import CompileError
    from hal_iree import _compile

    def build(
        model: Any, flags: list[str], device_id: str, workdir: str | None = None, parameters: Any = None
    ) -> bytes:
        path = directory / f"{_key(flags)}.vmfb"
        if not path.is_file():
            msg = f"no vmfb recorded for {_CURRENT['name']} with flags {flags} ({path.name})"
            raise CompileError(msg)
        same = (directory / f"{_key(flags)}.lowered").read_text() == _lowered_digest(model)
        report["models"][_CURRENT["name"]]["same_lowering_as_recorded"] = same
        return path.read_bytes()

    recorded = (directory / "compiler.txt").read_text()
    _compile.build_vmfb = build
    _compile.compiler_version = lambda: recorded
    report: dict[str, Any] = {
        "devices": [d.to_dict() if hasattr(d, "to_dict") else str(d) for d in hal.devices()],
        "compiler": recorded,
        "models": {},
    }
    for name, (model, feeds) in _models().items():
        _CURRENT["name"] = name
        entry: dict[str, Any] = {}
        report["models"][name] = entry
        compiled = hal.compile(model)
        try:
            start = time.perf_counter()
            exe = compiled.to("iree:cuda", strict=True)
            entry["to_s"] = round(time.perf_counter() - start, 3)
        except hal.errors.HalError as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(name, entry, flush=True)
            continue
        verdict = exe.verification
        entry["verification"] = None if verdict is None else verdict.summary()
        cpu = compiled.to("ort:cpu", strict=True, verify=False)
        want = cpu.run(feeds)
        entry["rel_vs_ort_cpu"] = _rel(exe.run(feeds), want)
        entry["layouts"] = {kind: _rel(exe.run(arrays), want) for kind, arrays in _user_arrays(feeds).items()}
        wrong = errors = 0
        lock = threading.Lock()
        rng = np.random.default_rng(1)
        jobs = []
        for _ in range(8):
            local = {k: (v + rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v for k, v in feeds.items()}
            jobs.append((local, cpu.run(local)))

        def worker(local: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
            nonlocal wrong, errors
            for _ in range(25):
                try:
                    bad = _rel(exe.run(local), expected) > 1e-3
                except hal.errors.HalError:
                    with lock:
                        errors += 1
                    continue
                if bad:
                    with lock:
                        wrong += 1

        threads = [threading.Thread(target=worker, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        entry["threads"] = {"runs": 200, "wrong": wrong, "errors": errors}
        entry["run_ms"] = {
            "iree:cuda": round(_median_ms(lambda: exe.run(feeds), runs), 4),
            "ort:cpu": round(_median_ms(lambda: cpu.run(feeds), runs), 4),
        }
        try:
            direct = _direct_invoker(directory, feeds)
            entry["run_ms"]["iree direct (FunctionInvoker)"] = round(_median_ms(direct, runs), 4)
        except Exception as exc:  # noqa: BLE001 - the comparison is optional; the HAL's figures stand
            entry["direct_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(name, json.dumps(entry), flush=True)
    if out is not None:
        out.write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["record", "replay"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--gpu-target", default="sm_90", help="record: the GPU's target (H100/H200: sm_90)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HAL_CACHE_DIR", tempfile.mkdtemp(prefix="hal-gpu-check-"))
    if args.mode == "record":
        record(args.directory, args.gpu_target)
    else:
        replay(args.directory, args.out, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
