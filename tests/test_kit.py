"""The contract kit (``pytest -p hal.testing --hal-device ID``) runs from any directory, does
nothing without ``--hal-device``, and each of its checks fails when what it checks is broken.

The kit runs inside these tests with pytester (in-process), from a fresh directory, on ``kit:cpu``:
the device of an in-process plugin that is onnxruntime's CPU backend under another name with one
fault switched on. With no fault the kit passes there; with each fault, the kit tests that must
catch it fail. Faults that only the core can cause (feeds checked before a runner sees them, NONE
formats refused by lowering) are made by breaking the core once, with monkeypatch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from attrs import evolve

import hal
import hal.compiled  # imported here, so that the kit's in-process runs share these modules (and
import hal.compiler  # the patches below) instead of importing their own copies
import hal.executable
from hal import _plugins
from hal.backends.cpu import CpuBackend
from hal.capabilities import Support
from hal.errors import CompileError
from hal.testing.probes import UNKNOWN_DOMAIN

pytest_plugins = ["pytester"]

DEVICE = "kit:cpu"
# The kit's ONNX node-case check, on a handful of cases: enough to show it runs and counts.
FEW_NODE_CASES = ("--hal-node-every", "400")
# hal.testing is already imported here, so the inner session cannot rewrite its asserts: expected.
QUIET = ("-W", "ignore::pytest.PytestAssertRewriteWarning")


def _each(value: Any, change: Any) -> Any:
    """``change`` applied to an array, to each array of a list (a sequence), not to None."""
    if value is None:
        return None
    return [change(v) for v in value] if isinstance(value, list) else change(value)


class FaultyRunner:
    """An onnxruntime runner with one fault (see :class:`FaultyBackend`)."""

    def __init__(self, runner: Any, faults: frozenset[str]) -> None:
        self.runner = runner
        self.faults = faults
        self.kept: dict[Any, Any] = {}
        self.pending: dict[str, np.ndarray] = {}

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        if "freed-copy" in self.faults:  # what a runner that reads a freed copy answers
            feeds = {
                k: _each(v, lambda a: a if a.flags.writeable and a.flags.c_contiguous else np.zeros_like(a))
                for k, v in feeds.items()
            }
        if "racy" in self.faults:  # one slot for the feeds, shared by every caller
            self.pending = feeds
            time.sleep(0.0005)
            feeds = self.pending
        try:
            outputs = self.runner.run(feeds, output_names)
        except Exception:
            if "silent" in self.faults:  # swallows the runtime's error
                return [np.zeros(1, np.float32) for _ in output_names]
            raise
        if "wrong" in self.faults:
            outputs = [_each(o, lambda a: a + np.ones((), a.dtype) if a.dtype.kind == "f" else a) for o in outputs]
        if "bfloat16" in self.faults:  # computes float32 in bfloat16
            outputs = [o.astype(ml_dtypes.bfloat16).astype(o.dtype) if o.dtype == np.float32 else o for o in outputs]
        if "memoized" in self.faults:  # answers a repeated question with the arrays it gave before
            key = b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())
            outputs = self.kept.setdefault(key, outputs)  # type: ignore[call-overload]
        if "shared-output" in self.faults:  # hands out its own buffers, overwritten by the next run
            for name, out in zip(output_names, outputs):
                if name not in self.kept or self.kept[name].shape != out.shape:
                    self.kept[name] = np.empty_like(out)
                np.copyto(self.kept[name], out)
            outputs = [self.kept[name] for name in output_names]
        return outputs


class FaultyBackend(CpuBackend):
    """``kit:cpu``: onnxruntime's CPU backend, with ``fault`` switched on.

    Faults: ``wrong`` (adds one to float outputs), ``bfloat16`` (rounds float32 outputs to
    bfloat16), ``freed-copy`` (read-only or strided feeds read as zeros), ``shared-output``,
    ``memoized`` (gives the same arrays for the same feeds),
    ``racy`` (not thread-safe), ``silent`` (run-time errors become zeros), ``accepts-anything``
    (declares the kit's made-up operator domain, and prepare never refuses), ``refuses`` (prepare always refuses), ``claims-bfloat16`` (declares
    bfloat16 native), ``no-vendor``, ``silent-unavailable`` (a second device, unavailable with a
    blank reason), ``unstable`` (capabilities change between discoveries), ``float16-none``
    (declares float16 none, which onnxruntime runs); join several with ``+``. ``details`` are added
    to the device's."""

    name = "kit"

    def __init__(self, fault: str = "", details: dict[str, str] | None = None) -> None:
        self.faults = frozenset(fault.split("+")) - {""}
        self.details = details or {}
        self.discoveries = 0

    def discover(self) -> list[hal.Device]:
        (ort,) = super().discover()
        self.discoveries += 1
        caps = ort.capabilities
        if "claims-bfloat16" in self.faults:
            caps = evolve(caps, formats={**dict(caps.formats), "bfloat16": Support.NATIVE})
        if "accepts-anything" in self.faults:  # claims the kit's made-up operator domain
            caps = evolve(caps, opsets=evolve(caps.opsets, domains=(*caps.opsets.domains, UNKNOWN_DOMAIN)))
        if "float16-none" in self.faults:
            caps = evolve(caps, formats={**dict(caps.formats), "float16": Support.NONE})
        if "unstable" in self.faults and self.discoveries > 1:
            caps = evolve(caps, dynamic_shapes=not caps.dynamic_shapes)
        device = evolve(
            ort,
            id=DEVICE,
            backend=self.name,
            vendor="" if "no-vendor" in self.faults else "hal.testing meta-tests",
            capabilities=caps,
            details={**dict(ort.details), **self.details},
        )
        found = [device]
        if "silent-unavailable" in self.faults:
            found.append(evolve(device, id="kit:other", available=False, reason="   "))
        return found

    def prepare(self, model: Any, device: hal.Device, options: hal.CompileOptions) -> Any:
        if "refuses" in self.faults:
            msg = f"{device.id} refuses every model (fault 'refuses')"
            raise CompileError(msg)
        try:
            runner = super().prepare(model, device, options)
        except CompileError:
            if "accepts-anything" not in self.faults:
                raise
            return FaultyRunner(_Nothing(), frozenset({"silent"}))
        return FaultyRunner(runner, self.faults)


class _Nothing:
    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        raise RuntimeError("nothing was compiled")


class FaultyPlugin:
    def __init__(self, backend: FaultyBackend) -> None:
        self.backend = backend

    @hal.hookimpl
    def hal_register_backends(self, register):  # type: ignore[no-untyped-def]
        register(self.backend)


@pytest.fixture
def kit(pytester: pytest.Pytester) -> Iterator[Any]:
    """``kit(fault, *pytest_args, details=...)`` runs the contract kit on ``kit:cpu`` with that
    fault, in a fresh directory holding one passing test of its own; returns pytester's result."""
    pytester.makepyfile(test_vendor="def test_vendor_own():\n    pass\n")

    def run(fault: str, *args: str, details: dict[str, str] | None = None) -> pytest.RunResult:
        _plugins.registry().add_plugin(FaultyPlugin(FaultyBackend(fault, details)), name="kit-meta-test")
        try:
            return pytester.runpytest_inprocess(
                "-p", "hal.testing", "--hal-device", DEVICE, *FEW_NODE_CASES, "-q", *QUIET, *args
            )
        finally:
            _plugins.registry().remove_plugin("kit-meta-test")

    yield run


def _failed(result: pytest.RunResult) -> set[str]:
    """The kit's test functions that failed (without class, parameters or path)."""
    names = set()
    for report in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
        if report.failed:
            names.add(report.nodeid.split("::")[-1].split("[")[0])
    return names


def _run(result: pytest.RunResult) -> set[str]:
    return {
        r.nodeid.split("::")[-1].split("[")[0]
        for r in result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
        if r.when == "call"
    }


class TestPlugin:
    def test_is_a_pytest11_entry_point_named_like_its_module(self) -> None:
        found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
        assert found.get("hal.testing") == "hal.testing", f"pytest11 entry points: {found}"

    def test_without_hal_device_it_adds_nothing(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_vendor="def test_vendor_own():\n    pass\n")
        result = pytester.runpytest_inprocess("-p", "hal.testing", "-q")
        result.assert_outcomes(passed=1)
        assert _run(result) == {"test_vendor_own"}

    def test_unknown_device_is_a_usage_error(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_vendor="def test_vendor_own():\n    pass\n")
        result = pytester.runpytest_inprocess("-p", "hal.testing", "--hal-device", "nosuch:0")
        assert result.ret != 0
        result.stdout.fnmatch_lines(["*--hal-device nosuch:0: no plugin registers that device*"])

    def test_selection_and_the_vendors_own_tests(self, kit: Any, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            test_uses_fixture="def test_sees_the_device(hal_device):\n    assert hal_device.id == 'kit:cpu'\n"
        )
        result = kit("", "-k", "vendor_own or sees_the_device or every_field")
        result.assert_outcomes(passed=3)
        assert _run(result) == {"test_vendor_own", "test_sees_the_device", "test_every_field_is_filled"}


class TestTheKitCatches:
    def test_nothing_on_a_correct_device(self, kit: Any) -> None:
        result = kit("", details={"onnx_node_floor": "0.5"})
        assert _failed(result) <= {"test_caller_mistakes_are_hal_errors"}, result.stdout.str()[-3000:]
        assert "kit:cpu:" in result.stdout.str() and "ONNX node test cases" in result.stdout.str()

    @pytest.mark.parametrize(
        ("fault", "selection", "must_fail"),
        [
            pytest.param(
                "wrong",
                "Feeds or Threads or compute or Precision",
                {
                    "test_feeds_as_users_have_them",
                    "test_one_executable_from_eight_threads",
                    "test_native_and_emulated_formats_compute",
                    "test_float32_models_match_the_reference",
                },
                id="wrong-answers",
            ),
            pytest.param("bfloat16", "Precision", {"test_float32_models_match_the_reference"}, id="bfloat16-compute"),
            pytest.param("freed-copy", "users_have_them", {"test_feeds_as_users_have_them"}, id="freed-copy"),
            pytest.param("freed-copy", "io_kinds", {"test_declared_io_kinds_pass_in_and_out"}, id="freed-copy-in-a-list"),
            pytest.param("wrong", "io_kinds", {"test_declared_io_kinds_pass_in_and_out"}, id="wrong-sequence"),
            pytest.param("shared-output", "alias_between", {"test_outputs_do_not_alias_between_runs"}, id="shared-output"),
            pytest.param("memoized", "writing", {"test_writing_to_a_result_does_not_change_the_next"}, id="memoized-output"),
            pytest.param("racy", "Threads", {"test_one_executable_from_eight_threads"}, id="not-thread-safe"),
            pytest.param("silent", "dynamic_shapes", {"test_dynamic_shapes_broadcast_or_fail_at_run_time"}, id="swallowed-error"),
            pytest.param(
                "accepts-anything", "cannot_compile", {"test_model_the_device_cannot_compile_is_refused"}, id="no-refusal"
            ),
            pytest.param(
                "refuses",
                "compute or storage",
                {"test_native_and_emulated_formats_compute", "test_storage_formats_move_exactly"},
                id="refuses",
            ),
            pytest.param("claims-bfloat16", "compute and bfloat16", {"test_native_and_emulated_formats_compute"}, id="false-claim"),
            pytest.param("no-vendor", "every_field", {"test_every_field_is_filled"}, id="empty-field"),
            pytest.param("silent-unavailable", "say_why", {"test_unavailable_devices_say_why"}, id="no-reason"),
            pytest.param("unstable", "repeatable", {"test_discovery_is_repeatable"}, id="unstable-discovery"),
        ],
    )
    def test_a_broken_device(self, kit: Any, fault: str, selection: str, must_fail: set[str]) -> None:
        result = kit(fault, "-k", selection)
        assert must_fail <= _run(result), f"the selection ran {sorted(_run(result))}"
        missed = must_fail - _failed(result)
        assert not missed, f"fault {fault!r}: these kit tests passed: {sorted(missed)}\n{result.stdout.str()[-3000:]}"

    def test_a_device_below_its_declared_node_floor(self, kit: Any) -> None:
        result = kit("wrong", "-k", "node_cases", details={"onnx_node_floor": "0.9"})
        assert _failed(result) == {"test_node_cases_fed_read_only"}
        result.stdout.fnmatch_lines(["*below the floor*it declares (onnx_node_floor)*"])

    def test_feeds_the_core_lets_through(self, kit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        # Break the core's feed checks once: bad feeds reach the runtime, which fails its own way.
        result = kit("", "-k", "bad_feeds")
        assert _run(result) == {"test_bad_feeds_are_input_errors"} and not _failed(result)
        def unchecked(self: hal.Executable, feeds: Any, output_names: Any = None) -> dict[str, Any]:
            names = list(output_names or [o.name for o in self.outputs])
            return dict(zip(names, self.runner.run(dict(feeds), names)))

        monkeypatch.setattr(hal.executable.Executable, "run", unchecked)
        result = kit("", "-k", "bad_feeds")
        assert _failed(result) == {"test_bad_feeds_are_input_errors"}

    def test_none_formats_the_core_lets_through(self, kit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        # Break lowering once: a format the device rates none (float16 here) reaches it, and it
        # answers wrong. With lowering intact the core refuses such models and the check passes.
        result = kit("wrong+float16-none", "-k", "none_formats and float16")
        assert _run(result) == {"test_none_formats_are_refused_or_lowered"} and not _failed(result)
        monkeypatch.setattr(hal.compiler, "legalize_formats", lambda proto, capabilities: (proto, []))
        result = kit("wrong+float16-none", "-k", "none_formats and float16")
        assert _failed(result) == {"test_none_formats_are_refused_or_lowered"}

