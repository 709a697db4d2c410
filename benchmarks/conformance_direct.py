"""ONNX node conformance of the runtimes called directly, without the HAL, and what the HAL loses.

    python benchmarks/conformance_direct.py                                 # onnxruntime + OpenVINO
    python benchmarks/conformance_direct.py --hal-json conf.json --json direct.json
    python benchmarks/conformance_direct.py --iree --iree-every 4 --hal-json conf.json

Runs onnx's node test cases (``onnx.backend.test.case.node.collect_testcases()``, 1884 with
onnx 1.23, from :func:`hal.testing.conformance.collect_cases`) on each runtime the way a user
of that runtime alone would, and compares the outputs exactly as ``benchmarks/conformance.py``
does through the HAL (:func:`hal.testing.conformance.compare_outputs`, each case's
``rtol``/``atol``, inputs fed read-only as read from the cases' ``.pb`` files with ``as_read``):

- **onnxruntime**: ``InferenceSession(model bytes, providers=["CPUExecutionProvider"])`` with
  default options, ``run(None, feeds)`` by input name (an absent optional input is left out);
- **OpenVINO**: ``Core().read_model(model bytes, b"")`` and ``compile_model(model, "CPU",
  {"INFERENCE_PRECISION_HINT": "f32"})``, inferred by input name (those the compiled model kept;
  bfloat16 and float8 arrays as Tensors of their bits), outputs matched to the
  graph's outputs by tensor name (by position where a name is missing);
- **IREE** (``--iree``): the steps of ``iree-import-onnx`` (opset raised to 17 with onnx's
  version converter where lower, shapes inferred, IREE's in-process ONNX importer), then
  ``iree-compile`` in a subprocess with the flags hal-iree uses for ``iree:local-task`` (llvm-cpu,
  the host CPU; hal-iree's ``compile_mlir``, whose error is the compiler's first diagnostic line), and the vmfb run on the ``local-task`` driver with buffer views built as hal-iree's
  runner builds them (bool, bfloat16 and float8 passed as same-width integers with IREE's own
  element type). IREE compiles a case in about 0.7 s: ``--iree-every N`` runs every N-th case.

Each runtime runs in its own worker process (one at a time per runtime; the runtimes run side by
side), so that a runtime that kills its process (OpenVINO's CPU plugin corrupts its heap on casts
to 4-bit types, which run in a process of their own) costs one case: the case is tried once more
in a fresh worker, and its outcome is ``crash`` if that dies too. Outcomes per case and runtime:
``pass``, ``fail`` (ran, an output differs), ``error`` (an exception while loading or running,
with its first line) or ``crash``.

The report: counts per runtime, the union (cases passing on at least one runtime, directly), and,
with ``--hal-json PATH`` (what ``benchmarks/conformance.py --json`` writes), the cases the HAL
loses: (a) passing directly on some runtime but on no HAL target at all, (b) passing directly on a
runtime but not through the HAL on that runtime's device (``ort`` -> ``ort:cpu``, ``openvino`` ->
``openvino:CPU``, ``iree`` -> ``iree:local-task``), each with the HAL's message, and grouped by
the HAL's reason (:func:`hal.testing.conformance.reason`). The reverse (the HAL passes, the
runtime alone does not) is counted too. ``--json OUT`` writes all of it with every case's outcome.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from _machine import machine_info, versions

#: The runtimes this script calls, and the HAL device each one is behind.
RUNTIMES = ("ort", "openvino", "iree")
HAL_DEVICE = {"ort": "ort:cpu", "openvino": "openvino:CPU", "iree": "iree:local-task"}
#: OpenVINO 2026.4's CPU plugin corrupts its heap on casts to these (see hal-openvino): such a
#: case runs in a worker of its own, so the damage cannot show in later cases.
_OPENVINO_ISOLATE = ("int4", "uint4", "float4", "int2", "uint2")

# -- what every runner shares ---------------------------------------------------------------------


#: Lines of OpenVINO's exceptions that only say where in its sources the error passed through.
_BOILERPLATE = re.compile(
    r"^(Exception from src/|Check '.*' failed at |FrontEnd API failed|Model wasn't fully converted|Summary:|"
    r"Failed operations detailed log|While validating|To facilitate|\[ ?GENERAL_ERROR ?\]|$)"
)


def _first_line(exc: BaseException) -> str:
    """The exception's type and its first line that says something (up to three, joined, where
    the first is OpenVINO's "Exception from src/..."), at most 500 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    if lines and _BOILERPLATE.match(lines[0]):
        meaningful = [line for line in lines if not _BOILERPLATE.match(line)]
        text = " / ".join(meaningful[:3]) or lines[0]
    else:
        text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:500]


def _quiet() -> None:
    warnings.simplefilter("ignore")
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # fatal only: refused cases log an ERROR each
    except ImportError:
        pass


def _io(case: Any) -> tuple[list[str], list[str], list[dict[str, Any]], list[list[Any]]]:
    """Input names (initializers excluded), output names, feeds and expected outputs per data set."""
    from hal.testing.conformance import _normalize, as_read

    initializers = {t.name for t in case.model.graph.initializer}
    input_names = [v.name for v in case.model.graph.input if v.name not in initializers]
    output_names = [v.name for v in case.model.graph.output]
    feeds_list = [{n: as_read(v) for n, v in zip(input_names, inputs)} for inputs, _ in case.data_sets]
    expected_list = [[_normalize(v) for v in outputs] for _, outputs in case.data_sets]
    return input_names, output_names, feeds_list, expected_list


def _check(case: Any, load: Callable[[], Any], infer: Callable[[Any, dict[str, Any]], list[Any]]) -> tuple[str, str]:
    """``load()`` once, then ``infer(loaded, feeds)`` per data set compared with the expected outputs."""
    from hal.testing.conformance import compare_outputs

    _, _, feeds_list, expected_list = _io(case)
    try:
        loaded = load()
    except Exception as exc:  # noqa: BLE001 - a runtime's refusal is an outcome
        return "error", f"load: {_first_line(exc)}"
    for feeds, expected in zip(feeds_list, expected_list):
        try:
            actual = infer(loaded, feeds)
        except Exception as exc:  # noqa: BLE001 - as above
            return "error", f"run: {_first_line(exc)}"
        try:
            compare_outputs(expected, actual, rtol=case.rtol, atol=case.atol)
        except Exception as exc:  # noqa: BLE001 - the comparison's TypeErrors are mismatches too
            return "fail", _first_line(exc)
    return "pass", ""


# -- onnxruntime ----------------------------------------------------------------------------------


def run_ort(case: Any) -> tuple[str, str]:
    import onnxruntime

    def load() -> Any:
        return onnxruntime.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])

    def infer(session: Any, feeds: dict[str, Any]) -> list[Any]:
        return session.run(None, {n: v for n, v in feeds.items() if v is not None})

    return _check(case, load, infer)


# -- OpenVINO -------------------------------------------------------------------------------------

_OV_CORE: Any = None


#: ml_dtypes types numpy hands OpenVINO's Python API as opaque void arrays: passed as their bits
#: (same-width unsigned integers) in a Tensor of the port's element type, read back the same way.
#: 4-bit types are left as they are (OpenVINO packs two to a byte, ml_dtypes one).
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _ov_tensor(value: Any, port: Any) -> Any:
    import numpy as np
    import openvino

    if isinstance(value, np.ndarray) and value.dtype.name in _ML_DTYPES:
        bits = np.ascontiguousarray(value.view(np.uint16 if value.dtype.itemsize == 2 else np.uint8))
        return openvino.Tensor(bits, shape=list(value.shape), type=port.get_element_type())
    return value


def run_openvino(case: Any) -> tuple[str, str]:
    global _OV_CORE  # noqa: PLW0603 - one Core per worker process
    import numpy as np
    import onnx
    import openvino

    if _OV_CORE is None:
        _OV_CORE = openvino.Core()
    core = _OV_CORE
    _, output_names, _, _ = _io(case)
    out_types = {
        v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        for v in case.model.graph.output if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
    }

    def load() -> Any:
        model = core.read_model(case.model.SerializeToString(), b"")
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def infer(compiled: Any, feeds: dict[str, Any]) -> list[Any]:
        request = compiled.create_infer_request()
        ports = list(compiled.inputs)
        named = [n for n in feeds if any(n in p.get_names() for p in ports)]
        # By name; the frontend drops inputs the graph does not use (CastLike's "like" once
        # expanded), so only those the compiled model has. By position where no name matches.
        if named:
            port_of = {n: next(p for p in ports if n in p.get_names()) for n in named}
            inputs: Any = {n: _ov_tensor(feeds[n], port_of[n]) for n in named}
        else:
            inputs = [_ov_tensor(v, p) for v, p in zip(feeds.values(), ports)]
        request.infer(inputs)
        outputs = list(compiled.outputs)
        actual = []
        for index, name in enumerate(output_names):
            port = next((p for p in outputs if name in p.get_names()), None)
            if port is None:
                port = outputs[index]
            data = np.array(request.get_tensor(port).data, copy=True)
            wanted = out_types.get(name)
            if wanted is not None and wanted.name in _ML_DTYPES and data.dtype.itemsize == wanted.itemsize:
                data = data.view(wanted)  # bf16 and float8 come back as their bits (float16, uint8)
            actual.append(data)
        return actual

    return _check(case, load, infer)


# -- IREE -----------------------------------------------------------------------------------------

#: ``iree-compile`` flags of hal-iree for ``iree:local-task``.
IREE_FLAGS = (
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    "--iree-llvmcpu-target-cpu=host",
)
#: numpy dtype name -> (IREE HalElementType name, dtype the bytes travel as or None): hal-iree's table.
_IREE_TYPES = {
    "float32": ("FLOAT_32", None), "float64": ("FLOAT_64", None), "float16": ("FLOAT_16", None),
    "bfloat16": ("BFLOAT_16", "uint16"), "float8_e4m3fn": ("FLOAT_8_E4M3_FN", "uint8"),
    "float8_e4m3fnuz": ("FLOAT_8_E4M3_FNUZ", "uint8"), "float8_e5m2": ("FLOAT_8_E5M2", "uint8"),
    "float8_e5m2fnuz": ("FLOAT_8_E5M2_FNUZ", "uint8"), "float8_e8m0fnu": ("FLOAT_8_E8M0_FNU", "uint8"),
    "int8": ("SINT_8", None), "uint8": ("UINT_8", None), "int16": ("SINT_16", None), "uint16": ("UINT_16", None),
    "int32": ("SINT_32", None), "uint32": ("UINT_32", None), "int64": ("SINT_64", None),
    "uint64": ("UINT_64", None), "bool": ("BOOL_8", "uint8"),
    "complex64": ("COMPLEX_64", None), "complex128": ("COMPLEX_128", None),
}
_IREE_RUNTIME: Any = None


def _iree_type(dtype: Any) -> tuple[Any, Any]:
    import iree.runtime as rt
    import numpy as np

    try:
        name, raw = _IREE_TYPES[np.dtype(dtype).name]
    except KeyError:
        msg = f"IREE's runtime takes no tensors of type {np.dtype(dtype)}"
        raise TypeError(msg) from None
    return getattr(rt.HalElementType, name), (np.dtype(raw) if raw else None)


def run_iree(case: Any) -> tuple[str, str]:
    global _IREE_RUNTIME  # noqa: PLW0603 - one instance and device per worker process
    import io
    import tempfile

    import iree.runtime as rt
    import numpy as np
    import onnx
    from iree.compiler import ir
    from iree.compiler.extras import onnx_importer
    from hal_iree._compile import compile_mlir  # iree-compile in a subprocess, its first error line

    if _IREE_RUNTIME is None:
        instance = rt.VmInstance()
        device = rt.get_driver("local-task").create_default_device()
        _IREE_RUNTIME = (instance, device, rt.create_hal_module(instance, device))
    instance, device, hal_module = _IREE_RUNTIME
    input_names, output_names, _, _ = _io(case)

    def load() -> Any:
        model = onnx.ModelProto()
        model.CopyFrom(case.model)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and opset < 17:  # iree-import-onnx --opset-version 17
            model = onnx.version_converter.convert_version(model, 17)
        model.graph.name = "main"
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        info = onnx_importer.ModelInfo(model)
        module = info.create_module(context=ir.Context()).operation
        onnx_importer.NodeImporter.define_function(info.main_graph, module).import_all()
        module.verify()
        buffer = io.BytesIO()
        module.write_bytecode(buffer)
        with tempfile.TemporaryDirectory(prefix="conformance-direct-") as tmp:
            output = os.path.join(tmp, "module.vmfb")
            compile_mlir(buffer.getvalue(), IREE_FLAGS, output)
            with open(output, "rb") as fh:
                vmfb = fh.read()
        vm_module = rt.VmModule.copy_buffer(instance, vmfb)
        function = vm_module.lookup_function("main")
        if function is None:
            msg = f"no function 'main' in {vm_module.function_names}"
            raise RuntimeError(msg)
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.output}
        out_dtypes = [onnx.helper.tensor_dtype_to_np_dtype(types[n]) for n in output_names]
        return vm_module, function, out_dtypes

    def infer(loaded: Any, feeds: dict[str, Any]) -> list[Any]:
        vm_module, function, out_dtypes = loaded
        context = rt.VmContext(instance, modules=[hal_module, vm_module])
        args = rt.VmVariantList(len(input_names))
        for name in input_names:
            array = feeds[name]
            if not isinstance(array, np.ndarray):
                msg = f"input {name!r} is a {type(array).__name__}, not a tensor"
                raise TypeError(msg)
            element_type, raw = _iree_type(array.dtype)
            if raw is not None:
                array = array.view(raw)
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)  # not always: it makes a 0-d array 1-d
            args.push_ref(
                device.allocator.allocate_buffer_copy(
                    memory_type=rt.MemoryType.DEVICE_LOCAL, allowed_usage=rt.BufferUsage.DEFAULT,
                    device=device, buffer=array, element_type=element_type,
                )
            )
        rets = rt.VmVariantList(len(output_names))
        context.invoke(function, args, rets)
        actual = []
        for index, dtype in enumerate(out_dtypes):
            _, raw = _iree_type(dtype)
            view = rets.get_as_object(index, rt.HalBufferView)
            host = np.array(view.map().asarray(view.shape, raw or np.dtype(dtype)), copy=True)
            actual.append(host if raw is None else host.view(dtype))
        return actual

    return _check(case, load, infer)


RUNNERS: dict[str, Callable[[Any], tuple[str, str]]] = {"ort": run_ort, "openvino": run_openvino, "iree": run_iree}


def _work(runtime: str, case: Any) -> tuple[str, str, float]:
    """One case on one runtime, in a worker process: (outcome, message, seconds)."""
    start = time.perf_counter()
    outcome, message = RUNNERS[runtime](case)
    return outcome, message, time.perf_counter() - start


# -- workers --------------------------------------------------------------------------------------


class Worker:
    """One runtime's cases, in order, in a worker process that is replaced when it dies."""

    def __init__(self, runtime: str, cases: Sequence[Any]) -> None:
        self.runtime = runtime
        self.cases = list(cases)
        self.results: dict[str, dict[str, Any]] = {}
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()
        self._pending: list[tuple[Any, concurrent.futures.Future]] = []
        self._isolated = [c for c in self.cases if self._isolate(c)]
        self._submit([c for c in self.cases if not self._isolate(c)])

    def _isolate(self, case: Any) -> bool:
        return self.runtime == "openvino" and any(t in case.name.lower() for t in _OPENVINO_ISOLATE)

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=self._context, initializer=_quiet)

    def _submit(self, cases: Sequence[Any]) -> None:
        self._pending.extend((c, self._pool.submit(_work, self.runtime, c)) for c in cases)

    def _alone(self, case: Any) -> tuple[str, str, float]:
        """``case`` in a fresh worker of its own; ``crash`` if that dies as well."""
        start = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=self._context, initializer=_quiet
        ) as pool:
            try:
                return pool.submit(_work, self.runtime, case).result()
            except concurrent.futures.process.BrokenProcessPool:
                return "crash", "the worker process died running this case", time.perf_counter() - start

    def finish(self, progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, Any]]:
        total = len(self.cases)
        while self._pending:
            case, future = self._pending.pop(0)
            try:
                outcome, message, seconds = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                # The process died on this case or one before it finished: rerun this one alone,
                # then go on with the rest in a fresh worker.
                rest = [c for c, _ in self._pending]
                self._pending.clear()
                self._pool.shutdown(wait=True, cancel_futures=True)
                outcome, message, seconds = self._alone(case)
                self._pool = self._new_pool()
                self._submit(rest)
            self._record(case, outcome, message, seconds)
            if progress is not None:
                progress(self.runtime, len(self.results), total)
        for case in self._isolated:
            self._record(case, *self._alone(case))
            if progress is not None:
                progress(self.runtime, len(self.results), total)
        self._pool.shutdown(wait=True)
        return self.results

    def _record(self, case: Any, outcome: str, message: str, seconds: float) -> None:
        self.results[case.name] = {"outcome": outcome, "message": message, "seconds": round(seconds, 4)}


# -- the comparison with the HAL ------------------------------------------------------------------


def _hal_results(path: str) -> dict[str, dict[str, dict[str, Any]]]:
    with open(path) as f:
        data = json.load(f)
    return {target: {r["case"]: r for r in rows} for target, rows in data["results"].items()}


def _reason(entry: dict[str, Any]) -> str:
    from hal.testing.conformance import CaseResult, reason

    return reason(
        CaseResult(entry["case"], entry.get("target", ""), entry["outcome"], 0.0, entry.get("device"),
                   entry.get("message", ""))
    )


def _compare(direct: dict[str, dict[str, dict[str, Any]]], hal: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    def passed(results: dict[str, dict[str, Any]]) -> set[str]:
        return {n for n, r in results.items() if r["outcome"] == "pass"}

    direct_pass = {rt: passed(res) for rt, res in direct.items()}
    direct_union = set().union(*direct_pass.values())
    hal_pass = {t: passed(res) for t, res in hal.items()}
    hal_any = set().union(*hal_pass.values()) if hal_pass else set()

    def hal_view(case: str) -> dict[str, dict[str, str]]:
        return {t: {"outcome": res[case]["outcome"], "message": res[case].get("message", ""),
                    "device": res[case].get("device")} for t, res in hal.items() if case in res}

    lost_everywhere = []
    for case in sorted(direct_union - hal_any):
        if not any(case in res for res in hal.values()):
            continue  # the HAL run did not have it (a sample)
        lost_everywhere.append({"case": case, "direct": sorted(rt for rt, p in direct_pass.items() if case in p),
                                "hal": hal_view(case)})
    per_runtime: dict[str, list[dict[str, Any]]] = {}
    gained: dict[str, list[str]] = {}
    for rt, cases in direct_pass.items():
        device = HAL_DEVICE[rt]
        if device not in hal:
            continue
        rows = []
        for case in sorted(cases):
            entry = hal[device].get(case)
            if entry is not None and entry["outcome"] != "pass":
                rows.append({"case": case, "outcome": entry["outcome"], "message": entry.get("message", ""),
                             "reason": _reason(entry)})
        per_runtime[rt] = rows
        ran = set(direct[rt])
        gained[rt] = sorted((hal_pass[device] & ran) - cases)
    return {
        "direct_union": len(direct_union),
        "hal_union": len(hal_any),
        "hal_union_over_direct_cases": len(hal_any & set().union(*(set(r) for r in direct.values()))),
        "lost_everywhere": lost_everywhere,
        "lost_on_device": per_runtime,
        "hal_passes_direct_does_not": gained,
    }


# -- report ---------------------------------------------------------------------------------------


def _short(text: str, n: int = 200) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def _report(direct: dict[str, dict[str, dict[str, Any]]], comparison: dict[str, Any] | None, total: int) -> list[str]:
    lines = ["| runtime | cases | pass | fail | error | crash | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for rt, res in direct.items():
        c = Counter(r["outcome"] for r in res.values())
        seconds = sum(r["seconds"] for r in res.values())
        lines.append(f"| {rt} | {len(res)} | {c['pass']} | {c['fail']} | {c['error']} | {c['crash']} | {seconds:.0f} |")
    union = set().union(*({n for n, r in res.items() if r["outcome"] == "pass"} for res in direct.values()))
    lines.append(f"\nPasses directly on at least one runtime: {len(union)} of {total} cases")
    if comparison is None:
        return lines
    lines.append(f"Passes through the HAL on at least one target: {comparison['hal_union']}")
    lost = comparison["lost_everywhere"]
    lines.append(f"\n(a) {len(lost)} cases pass directly but on no HAL target:")
    for row in lost:
        lines.append(f"  {row['case']}  [direct: {', '.join(row['direct'])}]")
        for target, hal in row["hal"].items():
            lines.append(f"      {target}: {hal['outcome']}: {_short(hal['message'])}")
    for rt, rows in comparison["lost_on_device"].items():
        lines.append(f"\n({rt}) {len(rows)} cases pass on {rt} directly but not through the HAL on {HAL_DEVICE[rt]}:")
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            groups[row["reason"]].append(row)
        for why, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  [{len(members)}] {_short(why)}")
            for row in members:
                lines.append(f"      {row['case']}: {row['outcome']}: {_short(row['message'])}")
    for rt, cases in comparison["hal_passes_direct_does_not"].items():
        shown = ", ".join(cases[:10]) + (" ..." if len(cases) > 10 else "")
        lines.append(f"\nThe HAL passes {len(cases)} on {HAL_DEVICE[rt]} that {rt} alone does not: {shown}")
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runtimes", default="ort,openvino", help="comma list of ort, openvino, iree (default ort,openvino)")
    p.add_argument("--iree", action="store_true", help="also IREE (the same as adding iree to --runtimes)")
    p.add_argument("--iree-every", type=int, default=1, metavar="N", help="IREE runs every N-th of the cases (default 1)")
    p.add_argument("--sample", type=int, default=1, metavar="N", help="run every N-th case by sorted name (default 1: all)")
    p.add_argument("--offset", type=int, default=0, help="which case of each N to start from (default 0)")
    p.add_argument("--hal-json", metavar="PATH", help="a JSON of benchmarks/conformance.py --json to compare with")
    p.add_argument("--json", metavar="PATH", help="write counts, the comparison and every case's outcome as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _quiet()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()] + (["iree"] if args.iree else [])
    runtimes = list(dict.fromkeys(runtimes))
    unknown = [r for r in runtimes if r not in RUNNERS]
    if unknown:
        raise SystemExit(f"unknown runtimes {unknown}; choose from {', '.join(RUNTIMES)}")
    from hal.testing import conformance

    start = time.perf_counter()
    cases = conformance.collect_cases(every=args.sample, offset=args.offset)
    print(f"{len(cases)} cases on {', '.join(runtimes)}", file=sys.stderr, flush=True)
    workers = [
        Worker(rt, conformance.sample(cases, every=args.iree_every) if rt == "iree" else cases) for rt in runtimes
    ]

    def progress(runtime: str, done: int, total: int) -> None:
        if not args.quiet and (done % 200 == 0 or done == total):
            print(f"  {runtime}: {done}/{total}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    direct = {w.runtime: w.finish(progress) for w in workers}
    wall = time.perf_counter() - start
    comparison = _compare(direct, _hal_results(args.hal_json)) if args.hal_json else None
    print(f"\n{len(cases)} cases (every {args.sample}. from {args.offset}; IREE every {args.iree_every}.), {wall:.0f} s")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + "\n")
    print("\n".join(_report(direct, comparison, len(cases))))
    if args.json:
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        data = {
            "machine": {**machine_info(), "load_average_end": load},
            "settings": {"sample": args.sample, "offset": args.offset, "runtimes": runtimes,
                         "iree_every": args.iree_every, "hal_json": args.hal_json},
            "wall_s": round(wall, 1),
            "counts": {rt: dict(Counter(r["outcome"] for r in res.values())) for rt, res in direct.items()},
            "union": len(set().union(*({n for n, r in res.items() if r["outcome"] == "pass"} for res in direct.values()))),
            "comparison": comparison,
            "results": direct,
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
