"""The backend contract: what every device must do, whoever wrote its plugin.

Collected by the ``hal.testing`` pytest plugin (``pytest -p hal.testing --hal-device ID``), never
by name: the module is not called ``test_*``. Every test runs once per ``--hal-device`` (the
``hal_device`` fixture); those marked ``hal_device_params`` once per thing that device declares
(each format at a level, each precision case). ``hal.testing``'s docstring lists what is checked.

Every model is placed with ``strict=True`` and without the core's verification step, so each
answer checked here is the device's own: a device the core would refuse at placement must still
fail this kit, with the kit's message.
"""

from __future__ import annotations

import functools
import gc
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hal
from hal.capabilities import NumberFormat, Support, ValueKind
from hal.errors import (
    HalError,
    InputError,
    RunError,
    UnavailableDeviceError,
    UnknownDeviceError,
)
from hal.testing import conformance, models, probes
from hal.testing.build import make_model, optional_info, sequence_info
from hal.testing.kit import NODE_FLOOR_DETAIL, record_node_cases
from hal.verification import tolerance_for

F = NumberFormat

#: The float32 tolerance of the precision contract: the one placement verification holds float32
#: outputs to (:data:`hal.verification.TOLERANCES`), normwise per output:
#: ``max|got - want| <= atol + rtol * max|want|`` (rtol 1e-4, atol 1e-6). Runtimes differ from the
#: reference evaluator by about 5e-7 of the largest output on these models (summation order, fused
#: multiply-add, polynomial Erf/Exp); a model computed in bfloat16 differs by about 4e-3, and int8
#: activations for compressed weights (OpenVINO's dynamic quantization, onnxruntime's MatMulNBits
#: at its default accuracy level) by 6e-3 to 9e-3: both fail.
FLOAT32 = tolerance_for(NumberFormat.FLOAT32)

#: Formats the feed, alias and thread checks compute in, best first; the first the device
#: computes (native or emulated) is used.
IO_FORMATS = (F.FLOAT32, F.FLOAT16, F.BFLOAT16, F.FLOAT64, F.INT32, F.INT64)

_PRECISION_MODELS = {"conv": "resnet18_like", "matmul": "mlp", "attention": "transformer_encoder"}
_PRECISION_DEQUANT = ((F.INT8, F.FLOAT32, 32), (F.FLOAT8_E4M3FN, F.FLOAT32, 32))


def device_params(kind: str, device: hal.Device) -> list[tuple[Any, str]]:
    """``(value, id)`` pairs for a test marked ``hal_device_params(kind)`` on ``device``."""
    caps = device.capabilities
    if kind == "compute-formats":
        return [(f, f.value) for f in probes.formats_at(caps, (Support.NATIVE, Support.EMULATED))]
    if kind == "storage-formats":
        return [(f, f.value) for f in probes.formats_at(caps, (Support.STORAGE,))]
    if kind == "none-formats":
        return [(f, f.value) for f in probes.formats_at(caps, (Support.NONE,))]
    if kind == "io-kinds":
        return [(k, k.value) for k in ValueKind if k in caps.io_kinds]
    if kind == "precision":
        params: dict[str, Any] = {name: name for name in _PRECISION_MODELS}
        declared = [(s.element, s.scale, max(s.block)) for s in caps.scaled]
        for element, scale, block in (*_PRECISION_DEQUANT, *declared):
            params[f"{element.value}-{scale.value}-block{block}"] = (element, scale, block)
        return [(value, label) for label, value in params.items()]
    msg = f"unknown hal_device_params kind {kind!r}"
    raise ValueError(msg)


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _kit_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Compile into a private cache: the kit's few hundred small models are nobody's to keep."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAL_CACHE_DIR", str(tmp_path_factory.mktemp("hal-kit-cache")))
        yield


@pytest.fixture
def device(hal_device: hal.Device) -> hal.Device:
    """The device under test, for tests that run models on it: skipped (with the device's own
    reason) when it is unavailable here."""
    return _available(hal_device)


def _available(device: hal.Device) -> hal.Device:
    if not device.available:
        pytest.skip(f"{device.id} is unavailable here: {device.reason}")
    return device


def _place(model: onnx.ModelProto, device: hal.Device, **options: Any) -> hal.Executable:
    """``model`` on ``device`` alone: strict (no fallback) and unverified: placement verification
    would refuse a wrong device before the kit saw its answer, and the kit checks answers itself."""
    exe = hal.compile(model).to(device.id, strict=True, fallback=None, verify=False, **options)
    ran_on = {p.device for p in exe.placement} | {exe.device.id}
    assert ran_on == {device.id}, f"asked for {device.id} with strict=True, placed on {sorted(ran_on)}"
    return exe


def _show(array: Any) -> str:
    array = np.asarray(array)
    flat = np.array2string(array.reshape(-1)[:8], threshold=8)
    return f"{array.dtype}{list(array.shape)} {flat}{' ...' if array.size > 8 else ''}"


def _differences(got: Mapping[str, Any], want: Mapping[str, np.ndarray], what: str) -> list[str]:
    """What differs between two ``{output: array}`` maps (exactly), one line per output."""
    lines = []
    if set(got) != set(want):
        return [f"{what}: outputs {sorted(got)}, expected {sorted(want)}"]
    for name, expected in want.items():
        if not probes.same_values(got[name], expected):
            lines.append(f"{what}: output {name!r} is {_show(got[name])}, expected {_show(expected)}")
    return lines


def _io_setup(device: hal.Device) -> tuple[NumberFormat, int]:
    caps = device.capabilities
    for fmt in IO_FORMATS:
        if caps.support(fmt).at_least(Support.EMULATED):
            opset = probes.opset_for(caps, probes.first_opset("Sub", fmt), probes.first_opset("Transpose", fmt))
            if opset is not None:
                return fmt, opset
    pytest.skip(f"{device.id} computes none of {', '.join(f.value for f in IO_FORMATS)} in an opset it reads")


@pytest.fixture(scope="module")
def io() -> Any:
    """``io(device, shape=(5, 7))``: :func:`probes.io_model` placed on ``device`` and the format it
    computes in; placed once per device and shape in a session."""
    placed: dict[tuple[str, tuple[int | str, int]], tuple[hal.Executable, NumberFormat]] = {}

    def get(device: hal.Device, shape: tuple[int | str, int] = (5, 7)) -> tuple[hal.Executable, NumberFormat]:
        if (device.id, shape) not in placed:
            fmt, opset = _io_setup(device)
            placed[device.id, shape] = _place(probes.io_model(fmt, shape, opset), device), fmt
        return placed[device.id, shape]

    return get


# -- discovery -------------------------------------------------------------------------------------


class TestDiscovery:
    def test_every_field_is_filled(self, hal_device: hal.Device) -> None:
        d = hal_device
        problems = []
        if d.id.partition(":")[0] != d.backend:
            problems.append(f"backend is {d.backend!r} but the id starts with {d.id.partition(':')[0]!r}")
        for name in ("vendor", "name"):
            value = getattr(d, name)
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{name} is empty ({value!r})")
        if not isinstance(d.kind, hal.DeviceKind):
            problems.append(f"kind is {d.kind!r}, not a hal.DeviceKind")
        if not isinstance(d.available, bool):
            problems.append(f"available is {d.available!r}, not a bool")
        if not d.available and not (isinstance(d.reason, str) and d.reason.strip()):
            problems.append(f"unavailable without saying why (reason {d.reason!r})")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.details):
            problems.append(f"details are not all strings: {d.details!r}")
        caps = d.capabilities
        if not isinstance(caps, hal.Capabilities):
            problems.append(f"capabilities is {type(caps).__name__}, not hal.Capabilities")
        else:
            problems.extend(_capability_problems(caps, computes=d.available))
        assert not problems, f"{d.id}: " + "; ".join(problems)

    def test_record_round_trips_through_json(self, hal_device: hal.Device) -> None:
        data = json.loads(json.dumps(hal_device.to_dict()))
        assert hal.Device.from_dict(data) == hal_device, f"{hal_device.id}: to_dict/from_dict does not give the record back"

    def test_discovery_is_repeatable(self, hal_device: hal.Device) -> None:
        again = {d.id: d for d in hal.devices(refresh=True)}
        assert hal_device.id in again, f"{hal_device.id} is gone after hal.devices(refresh=True)"
        fresh = again[hal_device.id]
        assert (fresh.available, fresh.capabilities) == (hal_device.available, hal_device.capabilities), (
            f"{hal_device.id} reports differently when discovered again"
        )

    def test_unavailable_devices_say_why(self, hal_device: hal.Device) -> None:
        silent = [
            d.id for d in hal.devices() if d.backend == hal_device.backend and not d.available and not (d.reason or "").strip()
        ]
        assert not silent, f"unavailable devices of backend {hal_device.backend} without a reason: {silent}"


def _capability_problems(caps: hal.Capabilities, *, computes: bool = True) -> list[str]:
    """What is inconsistent in ``caps``. An unavailable device may declare nothing (``computes``
    False): the one a backend lists when it can see no device knows nothing to declare."""
    problems = []
    if computes and not caps.formats.at_least(Support.EMULATED):
        problems.append("no format is native or emulated: the device computes nothing")
    for fmt in sorted(caps.movable, key=lambda f: f.onnx_type):
        if caps.support(fmt) is Support.NONE:
            problems.append(f"{fmt.value} is movable but its support is none")
    for scaled in caps.scaled:
        for fmt in (scaled.element, scaled.scale):
            if caps.support(fmt) is Support.NONE:
                problems.append(f"block-scaled {scaled.element.value} x {scaled.scale.value} declared, but {fmt.value} is none")
    if caps.opsets.max < 7:
        problems.append(f"opset range {caps.opsets.min}..{caps.opsets.max} ends before opset 7")
    memory = caps.memory
    if memory.capacity_bytes is not None and memory.capacity_bytes <= 0:
        problems.append(f"memory capacity {memory.capacity_bytes} bytes")
    problems.extend(f"peak throughput for {fmt.value} is {peak}" for fmt, peak in caps.peak_tflops if not peak > 0)
    return problems


# -- errors ----------------------------------------------------------------------------------------


class TestErrors:
    def test_devices_that_cannot_be_used_are_refused(self, hal_device: hal.Device) -> None:
        compiled = hal.compile(models.add((4,)))
        with pytest.raises(UnknownDeviceError):
            compiled.to(f"{hal_device.backend}:no-such-device-0", strict=True)
        if not hal_device.available:
            with pytest.raises(UnavailableDeviceError):
                compiled.to(hal_device.id, strict=True)

    def test_bad_feeds_are_input_errors(self, device: hal.Device, io: Any) -> None:
        exe, fmt = io(device)
        rng = np.random.default_rng(0)
        a, b = probes.values(fmt, (5, 7), rng), probes.values(fmt, (5, 7), rng)
        other = F.INT32 if fmt is not F.INT32 else F.FLOAT32
        bad = {
            "a feed missing": {"a": a},
            "an unknown feed name": {"a": a, "b": b, "c": a},
            "a wrong element type": {"a": a.astype(other.dtype), "b": b},
            "a wrong rank": {"a": a.reshape(-1), "b": b},
            "a wrong static dimension": {"a": probes.values(fmt, (5, 6), rng), "b": b},
            "text for numbers": {"a": "text", "b": b},
        }
        slipped = []
        for what, feeds in bad.items():
            try:
                exe.run(feeds)
            except InputError:
                continue
            except Exception as exc:  # noqa: BLE001 - reported below
                slipped.append(f"{what}: {type(exc).__name__}: {exc}")
            else:
                slipped.append(f"{what}: accepted")
        try:
            exe.run({"a": a, "b": b}, output_names=["no-such-output"])
            slipped.append("an unknown output name: accepted")
        except InputError:
            pass
        assert not slipped, f"{device.id}: bad feeds that are not an InputError: " + "; ".join(slipped)

    def test_caller_mistakes_are_hal_errors(self, device: hal.Device, io: Any) -> None:
        exe, fmt = io(device)
        a = probes.values(fmt, (5, 7), np.random.default_rng(0))
        calls = {
            "run(None)": lambda: exe.run(None),  # type: ignore[arg-type]
            "run([a, b])": lambda: exe.run([a, a]),  # type: ignore[arg-type]
            "run(feeds, output_names=123)": lambda: exe.run({"a": a, "b": a}, output_names=123),  # type: ignore[arg-type]
        }
        slipped = []
        for what, call in calls.items():
            try:
                call()
            except HalError:
                continue
            except Exception as exc:  # noqa: BLE001 - reported below
                slipped.append(f"{what}: {type(exc).__name__}: {exc}")
            else:
                slipped.append(f"{what}: accepted")
        assert not slipped, f"{device.id}: caller mistakes that are not a HalError: " + "; ".join(slipped)

    def test_model_the_device_cannot_compile_is_refused(self, device: hal.Device) -> None:
        graph = helper.make_graph(
            [helper.make_node("NoSuchOperator", ["x"], ["y"], domain=probes.UNKNOWN_DOMAIN)],
            "unknown-op",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        )
        opsets = [helper.make_opsetid("", device.capabilities.opsets.max), helper.make_opsetid(probes.UNKNOWN_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets[:1]))
        with pytest.raises(HalError):
            _place(model, device)

    def test_dynamic_shapes_broadcast_or_fail_at_run_time(self, device: hal.Device) -> None:
        """Sizes only known at run time: 1 and 4 elements broadcast (numpy's answer, or a RunError
        from a runtime that cannot broadcast dimensions left dynamic: a refusal, not a wrong
        answer), 3 and 4 do not and the run must raise a RunError, not answer."""
        if not device.capabilities.dynamic_shapes:
            pytest.skip(f"{device.id} declares no dynamic shapes: shapes are checked before the device runs")
        fmt, opset = _io_setup(device)
        model = probes.make(
            [helper.make_node("Sub", ["a", "b"], ["y"])],
            [("a", fmt, ("n",)), ("b", fmt, ("m",))],
            [("y", fmt, ("k",))],
            opset=opset,
        )
        exe = _place(model, device)
        rng = np.random.default_rng(0)
        a, b = probes.values(fmt, (1,), rng), probes.values(fmt, (4,), rng)
        try:
            wrong = _differences(exe.run({"a": a, "b": b}), {"y": a - b}, "a[1] - b[4]")
        except RunError:
            wrong = []  # refused, and said so (hal-iree: IREE does not broadcast dynamic dims)
        try:
            answer = exe.run({"a": probes.values(fmt, (3,), rng), "b": b})
        except RunError:
            pass
        else:
            wrong.append(f"a[3] - b[4] (sizes that do not broadcast) answered {_show(answer['y'])} instead of raising a RunError")
        assert not wrong, f"{device.id}: " + "; ".join(wrong)


# -- feeds as users have them ----------------------------------------------------------------------


class TestFeeds:
    @pytest.mark.parametrize("kind", probes.FEED_KINDS)
    def test_feeds_as_users_have_them(self, device: hal.Device, io: Any, kind: str, tmp_path: Path) -> None:
        rng = np.random.default_rng(probes.FEED_KINDS.index(kind))
        if kind == "zero-size":
            exe, fmt = io(device, ("n", 7) if device.capabilities.dynamic_shapes else (0, 7))
            a, b = probes.values(fmt, (0, 7), rng), probes.values(fmt, (0, 7), rng)
            feeds = {"a": a, "b": b}
        else:
            exe, fmt = io(device)
            feeds = probes.user_feeds(kind, probes.values(fmt, (5, 7), rng), probes.values(fmt, (5, 7), rng), tmp_path)
        before = {k: np.array(v) for k, v in feeds.items()}
        want = probes.io_expected(feeds["a"], feeds["b"])
        wrong = []
        for attempt in range(3):  # a copy freed too early can still hold the right bytes once
            wrong += _differences(exe.run(feeds), want, f"run {attempt + 1}")
        wrong += [f"the run changed feed {k!r}" for k in feeds if not probes.same_values(np.array(feeds[k]), before[k])]
        assert not wrong, f"{device.id} with {kind} feeds: " + "; ".join(wrong)

    @pytest.mark.parametrize("op", ["Identity", "Dropout"])
    def test_an_input_passed_through_comes_back(self, device: hal.Device, op: str) -> None:
        # A graph output that is a graph input unchanged: runtimes alias or rename such tensors
        # (OpenVINO's reader named the parameter after Dropout's output, and its input was never
        # set: the answer was uninitialized memory).
        fmt, _ = _io_setup(device)
        opset = probes.opset_for(device.capabilities, probes.first_opset("Sub", fmt), probes.first_opset(op, fmt))
        if opset is None:
            pytest.skip(f"no opset {device.id} reads defines {op} and Sub for {fmt.value}")
        model = make_model(
            [helper.make_node(op, ["x"], ["y"]), helper.make_node("Sub", ["y", "b"], ["z"])],
            [("x", fmt.onnx_type, [5, 7]), ("b", fmt.onnx_type, [5, 7])],
            [("y", fmt.onnx_type, [5, 7]), ("z", fmt.onnx_type, [5, 7])],
            opset=opset,
        )
        exe = _place(model, device)
        rng = np.random.default_rng(3)
        x, b = probes.values(fmt, (5, 7), rng), probes.values(fmt, (5, 7), rng)
        x.flags.writeable = False  # as users have them: copied by some backends, which must outlive the run
        for attempt in range(3):
            got = exe.run({"x": x, "b": b})
            wrong = _differences({"y": got["y"]}, {"y": x}, f"run {attempt + 1}")
            assert not wrong, f"{device.id}, {op} passing input 'x' through: " + "; ".join(wrong)

    def test_outputs_do_not_alias_between_runs(self, device: hal.Device, io: Any) -> None:
        exe, fmt = io(device)
        rng = np.random.default_rng(1)
        first = exe.run({"a": probes.values(fmt, (5, 7), rng), "b": probes.values(fmt, (5, 7), rng)})
        kept = {k: v.copy() for k, v in first.items()}
        second = exe.run({"a": probes.values(fmt, (5, 7), rng), "b": probes.values(fmt, (5, 7), rng)})
        problems = [f"the second run changed output {k!r} of the first" for k in kept if not probes.same_values(first[k], kept[k])]
        problems += [
            f"output {k!r} of the first run shares memory with output {j!r} of the second"
            for k in first
            for j in second
            if np.shares_memory(first[k], second[j])
        ]
        assert not problems, f"{device.id}: " + "; ".join(problems)

    def test_writing_to_a_result_does_not_change_the_next(self, device: hal.Device, io: Any) -> None:
        exe, fmt = io(device)
        rng = np.random.default_rng(2)
        feeds = {"a": probes.values(fmt, (5, 7), rng), "b": probes.values(fmt, (5, 7), rng)}
        want = probes.io_expected(feeds["a"], feeds["b"])
        for array in exe.run(feeds).values():
            if array.flags.writeable:
                array[...] = probes.values(fmt, array.shape, rng)
        wrong = _differences(exe.run(feeds), want, "after writing to the first result")
        assert not wrong, f"{device.id}: " + "; ".join(wrong)

    def test_outputs_do_not_alias_the_feeds(self, device: hal.Device, io: Any) -> None:
        exe, fmt = io(device)
        rng = np.random.default_rng(3)
        feeds = {"a": probes.values(fmt, (5, 7), rng), "b": probes.values(fmt, (5, 7), rng)}
        want = probes.io_expected(feeds["a"], feeds["b"])
        got = exe.run(feeds)
        shared = [f"output {o!r} shares memory with feed {i!r}" for o in got for i in feeds if np.shares_memory(got[o], feeds[i])]
        for array in feeds.values():
            array[...] = probes.values(fmt, array.shape, rng)
        wrong = _differences(got, want, "after the caller reused its input arrays")
        assert not (shared or wrong), f"{device.id}: " + "; ".join(shared + wrong)

    def test_arrays_deleted_right_after_run(self, device: hal.Device, io: Any) -> None:
        exe, fmt = io(device)
        rng = np.random.default_rng(4)
        a, b = probes.values(fmt, (5, 7), rng), probes.values(fmt, (5, 7), rng)
        want = probes.io_expected(a, b)
        # The feeds exist only for the call: temporaries, one a read-only strided view of its own
        # buffer, so that a backend keeping a pointer to them reads freed memory afterwards.
        got = exe.run({"a": np.array(a, copy=True), "b": np.frombuffer(b.tobytes(), b.dtype).reshape(b.shape)[:, ::-1][:, ::-1]})
        del a, b
        gc.collect()
        churn = [np.full((5, 7), 99, dtype=np.int32) for _ in range(256)]  # reuse the freed memory
        wrong = _differences(got, want, "after the feeds were deleted")
        del churn
        assert not wrong, f"{device.id}: " + "; ".join(wrong)


# -- threads ---------------------------------------------------------------------------------------


THREADS = 8
RUNS_PER_THREAD = 200


class TestThreads:
    def test_one_executable_from_eight_threads(self, device: hal.Device, io: Any) -> None:
        exe, fmt = io(device)
        barrier = threading.Barrier(THREADS)
        errors: list[str] = []
        wrong: list[str] = []

        def work(thread: int) -> None:
            rng = np.random.default_rng(1000 + thread)
            barrier.wait()
            for run in range(RUNS_PER_THREAD):
                a, b = probes.values(fmt, (5, 7), rng), probes.values(fmt, (5, 7), rng)
                try:
                    got = exe.run({"a": a, "b": b})
                except Exception as exc:  # noqa: BLE001 - every error is a failure, reported below
                    errors.append(f"thread {thread} run {run}: {type(exc).__name__}: {exc}")
                    continue
                wrong.extend(_differences(got, probes.io_expected(a, b), f"thread {thread} run {run}")[:1])

        threads = [threading.Thread(target=work, args=(t,), name=f"hal-kit-{t}", daemon=True) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        hung = [t.name for t in threads if t.is_alive()]
        total = THREADS * RUNS_PER_THREAD
        assert not (hung or errors or wrong), (
            f"{device.id}, {THREADS} threads x {RUNS_PER_THREAD} runs on one Executable: {len(errors)} errors and "
            f"{len(wrong)} wrong answers of {total}{f', threads still running: {hung}' if hung else ''}; first: "
            + "; ".join((errors + wrong)[:3])
        )


# -- declared capabilities hold --------------------------------------------------------------------


def _run_probes(device: hal.Device, found: list[probes.Probe], *, refusal_ok: bool) -> list[str]:
    """Run each probe on ``device``: the problems (refusals where not allowed, wrong answers).
    Exceptions that are not a HalError propagate: a crash fails the test as it is."""
    problems = []
    for probe in found:
        try:
            got = _place(probe.model, device).run(probes.probe_feeds(probe))
        except HalError as exc:
            if probe.required and not refusal_ok:
                problems.append(f"{probe.name}: refused: {type(exc).__name__}: {exc}")
            continue
        problems += _differences(got, probe.expected, probe.name)
    return problems


class TestDeclaredCapabilities:
    @pytest.mark.hal_device_params("compute-formats")
    def test_native_and_emulated_formats_compute(self, hal_device: hal.Device, hal_param: NumberFormat) -> None:
        device, fmt = _available(hal_device), hal_param
        found = probes.compute_probes(fmt, device.capabilities)
        if not found:
            pytest.skip(f"no opset {device.id} reads ({device.capabilities.opsets}) holds {fmt.value}")
        problems = _run_probes(device, found, refusal_ok=False)
        level = device.capabilities.support(fmt).value
        assert not problems, f"{device.id} declares {fmt.value} {level}, but: " + "; ".join(problems)

    @pytest.mark.hal_device_params("storage-formats")
    def test_storage_formats_move_exactly(self, hal_device: hal.Device, hal_param: NumberFormat) -> None:
        device, fmt = _available(hal_device), hal_param
        found = probes.storage_probes(fmt, device.capabilities)
        if not found:
            pytest.skip(f"no opset {device.id} reads ({device.capabilities.opsets}) holds {fmt.value}")
        problems = _run_probes(device, found, refusal_ok=False)
        assert not problems, f"{device.id} declares {fmt.value} storage, but: " + "; ".join(problems)

    @pytest.mark.hal_device_params("none-formats")
    def test_none_formats_are_refused_or_lowered(self, hal_device: hal.Device, hal_param: NumberFormat) -> None:
        device, fmt = _available(hal_device), hal_param
        found = probes.none_probes(fmt, device.capabilities)
        if not found:
            pytest.skip(f"the installed onnx has no model that holds {fmt.value}")
        problems = _run_probes(device, found, refusal_ok=True)
        assert not problems, f"{device.id} declares {fmt.value} none, and ran a model holding it wrong: " + "; ".join(problems)


    @pytest.mark.hal_device_params("io-kinds")
    def test_declared_io_kinds_pass_in_and_out(self, hal_device: hal.Device, hal_param: ValueKind) -> None:
        """Identity on a graph input and output of each declared kind, fed as users have arrays
        (read-only, strided, Fortran order) and empty or absent: the same values come back, as a
        list for a sequence and None for an absent optional."""
        device, kind = _available(hal_device), hal_param
        fmt, _ = _io_setup(device)
        opset = probes.opset_for(device.capabilities, 16)  # Identity takes sequences and optionals from 16
        if opset is None:
            pytest.skip(f"{device.id} reads no opset from 16 (Identity on optionals); it declares {device.capabilities.opsets}")

        def value(name: str) -> Any:
            if kind is ValueKind.SEQUENCE:
                return sequence_info(name, fmt.onnx_type, ["n", 3])
            return optional_info(name, fmt.onnx_type, ["n", 3], sequence=kind.is_sequence)

        model = make_model([helper.make_node("Identity", ["x"], ["y"])], [value("x")], [value("y")], opset=opset,
                           ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
        exe = _place(model, device)
        base = np.arange(24).astype(fmt.dtype).reshape(8, 3)
        frozen = base[:2].copy()
        frozen.flags.writeable = False
        arrays = [frozen, base[::2], np.asfortranarray(base[:4])]
        fed: list[Any] = [arrays, []] if kind.is_sequence else [frozen, base[::2]]
        if kind.is_optional:
            fed.append(None)
        problems = []
        for x in fed:
            got = exe.run({"x": x})["y"]
            if x is None or not kind.is_sequence:
                same = got is None if x is None else got is not None and probes.same_values(got, x)
            else:
                same = type(got) is list and len(got) == len(x) and all(probes.same_values(g, w) for g, w in zip(got, x))
            if not same:
                problems.append(f"fed {_shown(x)}, got {_shown(got)}")
        assert not problems, f"{device.id} declares {kind.value} inputs and outputs, but: " + "; ".join(problems)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return "None" if value is None else _show(value)


# -- the precision contract ------------------------------------------------------------------------


def _normwise(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, the tolerance for ``want``) in float64."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want64))) if want64.size else 0.0
    return float(np.max(np.abs(got64 - want64))) if want64.size else 0.0, FLOAT32.atol + FLOAT32.rtol * scale


@functools.cache
def _zoo_case(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    from onnx.reference import ReferenceEvaluator

    model, feeds = models.zoo(small=True)[name]
    names = [o.name for o in model.graph.output]
    return model, feeds, dict(zip(names, ReferenceEvaluator(model).run(names, feeds)))


class TestPrecision:
    @pytest.mark.hal_device_params("precision")
    def test_float32_models_match_the_reference(self, hal_device: hal.Device, hal_param: Any) -> None:
        device = _available(hal_device)
        caps = device.capabilities
        if not caps.support(F.FLOAT32).at_least(Support.EMULATED):
            pytest.skip(f"{device.id} does not compute float32")
        if isinstance(hal_param, str):
            model, feeds, want = _zoo_case(_PRECISION_MODELS[hal_param])
            reference = "the ONNX reference evaluator"
        else:
            element, scale, block = hal_param
            unstored = [f.value for f in (element, scale) if caps.support(f) is Support.NONE]
            if unstored:
                pytest.skip(f"{device.id} declares {', '.join(unstored)} none: no such weights can be placed on it")
            built = probes.block_dequantized_matmul(element, scale, block)
            if built is None:
                pytest.skip(f"the installed onnx has no DequantizeLinear for {element.value} with {scale.value} scales")
            model, feeds, want = built
            reference = "numpy in float64"
        try:
            exe = _place(model, device)
        except HalError as exc:
            # Block-scaled weights the device does not declare may be refused; a wrong answer never.
            if isinstance(hal_param, str) or any((s.element, s.scale, max(s.block)) == hal_param for s in caps.scaled):
                raise
            pytest.skip(f"{device.id} declares no {hal_param[0].value} x {hal_param[1].value} blocks and refuses them: {exc}")
        got = exe.run(feeds)
        problems = []
        for name, expected in want.items():
            if got[name].dtype != expected.dtype or got[name].shape != expected.shape:
                problems.append(f"output {name!r} is {_show(got[name])}, expected {_show(expected)}")
                continue
            error, tolerance = _normwise(got[name], expected)
            if not error <= tolerance:
                problems.append(
                    f"output {name!r} is {error:.3g} off (max |got - want|), beyond the float32 tolerance {tolerance:.3g} "
                    f"({FLOAT32.atol:g} + {FLOAT32.rtol:g} x max|want|)"
                )
        assert not problems, f"{device.id} at the default precision vs {reference}: " + "; ".join(problems)


# -- external weights ------------------------------------------------------------------------------


def _external_weights_model() -> onnx.ModelProto:
    """Weights a runtime's graph optimizer reads, not only its kernels: a Transpose of a weight
    (constant-folded), GELU's scalar constants (fusions match their values), a Reshape's shape (shape
    inference needs it) and a bias; all saved external by the test (``size_threshold=0``)."""
    rng = np.random.default_rng(7)
    init = [
        onnx.numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w_t"),
        onnx.numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bias"),
        onnx.numpy_helper.from_array(np.array([1.4142135], np.float32), "sqrt2"),
        onnx.numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        onnx.numpy_helper.from_array(np.array([0.5], np.float32), "half"),
        onnx.numpy_helper.from_array(np.array([2, 4, 4], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["y"]),
    ]
    return make_model(nodes, [("x", TensorProto.FLOAT, [2, 32])], [("y", TensorProto.FLOAT, [2, 4, 4])], initializers=init)


class TestExternalWeights:
    def test_weights_in_a_data_file_answer_as_inside(self, hal_device: hal.Device, tmp_path: Path) -> None:
        from onnx.reference import ReferenceEvaluator

        device = _available(hal_device)
        if not device.capabilities.support(F.FLOAT32).at_least(Support.EMULATED):
            pytest.skip(f"{device.id} does not compute float32")
        model = _external_weights_model()
        feeds = {"x": np.random.default_rng(8).standard_normal((2, 32)).astype(np.float32)}
        want = ReferenceEvaluator(model).run(["y"], feeds)[0]
        path = tmp_path / "external.onnx"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="external.onnx.data", size_threshold=0)
        for attempt in ("cold", "warm"):  # the second placement may come from the device's caches
            compiled = hal.compile(path)
            assert compiled.model.weights is not None, "the weights were not left external"
            got = compiled.to(device.id, strict=True, fallback=None, verify=False).run(feeds)["y"]
            assert got.shape == want.shape, f"{device.id} ({attempt}): output 'y' is {_show(got)}, expected {_show(want)}"
            error, tolerance = _normwise(got, want)
            assert error <= tolerance, (
                f"{device.id} ({attempt}) with the weights in a data file: output 'y' is {error:.3g} off, "
                f"beyond {tolerance:.3g}; got {_show(got)}, expected {_show(want)}"
            )


# -- ONNX node test cases --------------------------------------------------------------------------


@functools.cache
def _node_cases(every: int) -> tuple[Any, ...]:
    return tuple(conformance.collect_cases(every=every))


class TestOnnxNodeCases:
    def test_node_cases_fed_read_only(self, device: hal.Device, request: pytest.FixtureRequest) -> None:
        every = request.config.getoption("hal_node_every")
        cases = _node_cases(every)
        with conformance.quiet_runtimes():
            result = conformance.run(cases, [device.id], verify=False)
        summary = conformance.summarize(result, every=every)[0]
        record_node_cases(request.config, summary)
        request.node.user_properties.append(("onnx_node_cases", json.dumps(summary.to_dict())))
        foreign = [f"{r.case}: {r.message}" for r in result.results[device.id].values() if not r.hal_error]
        assert not foreign, f"{device.id}: {len(foreign)} cases raised something that is not a HalError: " + "; ".join(foreign[:5])
        floor = dict(device.details).get(NODE_FLOOR_DETAIL)
        if floor is not None:
            rate = summary.passed / summary.total if summary.total else 0.0
            assert rate >= float(floor), (
                f"{device.id} passes {summary.passed} of {summary.total} ONNX node cases ({rate:.1%}), below the floor "
                f"{float(floor):.1%} it declares ({NODE_FLOOR_DETAIL}); most common reasons: {summary.reasons[:3]}"
            )
