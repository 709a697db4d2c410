"""hal.bench and `hal bench`: one row per device, figures relative to the baseline, measured and
estimated apart, a device that cannot take the model reported beside the others, the budget and
batch honoured, the JSON and the chart. No timing assertions: the machines are noisy."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest

import hal
from hal import _paths, cli
from hal.bench import WARMUP_RUNS, BenchReport, DeviceBench, Latency, bench, plot
from hal.capabilities import Capabilities, Memory
from hal.errors import CompileError, HalError, InputError, UnknownDeviceError


class Counting(hal.Backend):
    """Devices run with onnx's reference evaluator; every runner counts its calls and records the
    feeds' shapes. ``test:fast`` declares peak throughput and bandwidth (so it has an estimate),
    ``test:picky`` refuses MatMul (lowering fails), ``test:broken`` fails to compile, ``test:gone`` is
    unavailable."""

    name = "test"
    version = "1"

    def __init__(self) -> None:
        self.runners: list[dict] = []

    def discover(self):
        figures = Capabilities.from_levels(native=["float32", "int64"], peak_tflops={"float32": 10.0},
                                           memory=Memory(bandwidth_gbps=100.0), launch_overhead_us=5.0)
        plain = Capabilities.from_levels(native=["float32", "int64"])
        picky = Capabilities.from_levels(native=["float32", "int64"], unsupported_ops=["MatMul"])
        device = dict(backend="test", vendor="test", kind="gpu")
        return [
            hal.Device(id="test:fast", name="fast", capabilities=figures, **device),
            hal.Device(id="test:plain", name="plain", capabilities=plain, **device),
            hal.Device(id="test:picky", name="picky", capabilities=picky, **device),
            hal.Device(id="test:broken", name="broken", capabilities=plain, **device),
            hal.Device(id="test:gone", name="gone", capabilities=plain, available=False, reason="no driver", **device),
        ]

    def prepare(self, model, device, options):
        from onnx.reference import ReferenceEvaluator

        if device.id == "test:broken":
            raise CompileError("test:broken cannot compile anything")
        session = ReferenceEvaluator(model.proto)
        record = {"device": device.id, "calls": 0, "shapes": []}
        self.runners.append(record)

        class Runner:
            def run(self, feeds, names):
                record["calls"] += 1
                record["shapes"].append({k: tuple(v.shape) for k, v in feeds.items()})
                record["last"] = {k: np.array(v) for k, v in feeds.items()}
                return session.run(list(names), feeds)

        return Runner()


@pytest.fixture
def counting(fresh_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "user-cache"))
    reg = fresh_registry()
    backend = Counting()

    class Plugin:
        @hal.hookimpl
        def hal_register_backends(self, register):
            register(backend)

    reg.add_plugin(Plugin(), name="counting")
    yield backend
    reg.remove_plugin("counting")


@pytest.fixture
def model_file(tmp_path, linear_model) -> str:
    path = tmp_path / "linear.onnx"
    onnx.save(linear_model, path)
    return str(path)


class TestBench:
    def test_one_row_per_device_in_order_and_the_baseline_is_exactly_one(self, counting, linear_model):
        report = bench(linear_model, ["test:fast", "test:plain", "ort:cpu"], runs=5)
        assert [r.device for r in report.rows] == ["test:fast", "test:plain", "ort:cpu"]
        assert report.baseline == "test:fast"
        base = report.row("test:fast")
        assert base.speed == 1.0 and base.estimated_speed == 1.0
        for r in report.rows:
            assert r.error is None and r.measured
            assert r.latency.runs == 5 and r.latency.p50 <= r.latency.p90 <= r.latency.p99
            assert r.speed == pytest.approx(base.latency.p50 / r.latency.p50)
            assert r.cold_to > 0 and r.warm_to > 0 and r.throughput > 0
            assert r.verification == "passed"

    def test_a_baseline_not_named_is_measured_first(self, counting, linear_model):
        report = bench(linear_model, ["test:plain"], baseline="test:fast", runs=3)
        assert [r.device for r in report.rows] == ["test:fast", "test:plain"]
        assert report.baseline == "test:fast" and report.row("test:fast").speed == 1.0

    def test_a_device_declaring_figures_has_an_estimate_and_ort_cpu_has_none(self, counting, linear_model):
        report = bench(linear_model, ["test:fast", "ort:cpu"], runs=3, batch=4)
        fast, cpu = report.row("test:fast"), report.row("ort:cpu")
        assert fast.estimate is not None and fast.estimate.kind == "estimated"
        assert fast.estimate.flops == 2 * 4 * 8 * 4 + 4 * 4  # the estimate is of the feeds' shapes
        assert fast.estimated_speed == 1.0
        assert cpu.estimate is None and cpu.estimated_speed is None
        assert "declares neither" in cpu.estimate_note
        assert cpu.measured and cpu.speed is not None  # measured all the same

    def test_without_a_baseline_estimate_no_estimated_speed_and_the_report_says_why(self, counting, linear_model):
        report = bench(linear_model, ["ort:cpu", "test:fast"], runs=3)
        assert report.row("test:fast").estimate is not None
        assert report.row("test:fast").estimated_speed is None
        assert any("--baseline test:fast" in line for line in report.lines())

    def test_devices_that_cannot_take_the_model_get_a_reason_and_the_others_run(self, counting, linear_model):
        report = bench(linear_model, ["test:fast", "test:picky", "test:broken", "test:gone", "test:plain"], runs=3)
        assert [r.device for r in report.rows] == ["test:fast", "test:picky", "test:broken", "test:gone", "test:plain"]
        assert "MatMul" in report.row("test:picky").error
        assert "cannot compile anything" in report.row("test:broken").error
        assert "no driver" in report.row("test:gone").error
        for device in ("test:picky", "test:broken", "test:gone"):
            row = report.row(device)
            assert not row.measured and row.speed is None and row.cold_to is None
        assert report.row("test:plain").measured
        # strict: no fallback moved picky's model to another device and measured that instead
        assert {r["device"] for r in counting.runners} == {"test:fast", "test:plain"}

    def test_runs_are_the_runs_asked_for(self, counting, linear_model):
        bench(linear_model, ["test:fast"], runs=37)
        cold, warm = counting.runners  # one runner per placement: cold, then warm
        assert warm["calls"] == WARMUP_RUNS + 37
        assert cold["calls"] == 1  # the verification run, in the cold placement only

    def test_seconds_time_runs_for_about_that_long(self, counting, linear_model):
        report = bench(linear_model, ["test:fast"], seconds=0.2)
        row = report.row("test:fast")
        assert row.latency.runs >= 1 and row.latency.elapsed >= 0.2
        assert report.runs is None and report.seconds == 0.2

    def test_batch_sets_the_symbolic_first_dimension(self, counting, linear_model):
        report = bench(linear_model, ["test:fast"], runs=2, batch=3)
        assert counting.runners[-1]["shapes"][-1] == {"x": (3, 8)}
        assert report.batch == 3 and report.feeds == (("x", "float32", (3, 8)),)
        bench(linear_model, ["test:fast"], runs=2)
        assert counting.runners[-1]["shapes"][-1] == {"x": (1, 8)}  # symbolic dimensions are 1 otherwise

    def test_batch_against_a_static_first_dimension_is_refused(self, counting, add_model):
        with pytest.raises(InputError, match="static first dimension of 2"):
            bench(add_model, ["test:fast"], runs=1, batch=4)
        assert not counting.runners  # refused before anything was placed
        assert bench(add_model, ["test:fast"], runs=1, batch=2).batch == 2
        assert bench(add_model, ["test:fast"], runs=1).batch == 2  # the feeds' first dimension

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"runs": 3, "seconds": 1.0}, "not both"),
            ({"runs": 0}, "positive whole number"),
            ({"runs": -2}, "positive whole number"),
            ({"seconds": 0.0}, "positive, finite"),
            ({"batch": 0}, "batch must be"),
        ],
    )
    def test_bad_budgets_are_refused(self, counting, linear_model, kwargs, match):
        with pytest.raises(InputError, match=match):
            bench(linear_model, ["test:fast"], **kwargs)

    def test_an_unknown_device_is_the_callers_mistake(self, counting, linear_model):
        with pytest.raises(UnknownDeviceError, match="nope:0"):
            bench(linear_model, ["test:fast", "nope:0"], runs=1)
        assert not counting.runners

    def test_cold_placement_uses_a_temporary_cache_and_leaves_the_users_alone(self, counting, linear_model, tmp_path):
        report = bench(linear_model, ["test:fast"], runs=1)
        assert report.row("test:fast").verification == "passed"  # verified afresh: the cache was empty
        assert not (tmp_path / "user-cache" / "compiled").exists()
        assert not (tmp_path / "user-cache" / "verified").exists()
        assert _paths.cache_root() == tmp_path / "user-cache"

    def test_progress_is_reported_per_stage_not_per_run(self, counting, linear_model):
        events = []
        bench(linear_model, ["test:fast"], runs=200, progress=lambda *e: events.append(e))
        stages = [e[1] for e in events]
        assert stages[:3] == ["cold to()", "warm to()", "warm-up"] and stages[-1] == "done"
        runs = [e for e in events if e[1] == "runs"]
        assert runs[-1][2:] == (200.0, 200.0)
        assert len(runs) < 200

    def test_peak_memory_is_measured_where_the_machine_says(self, counting, linear_model):
        report = bench(linear_model, ["test:fast"], runs=2)
        if sys.platform.startswith("linux"):
            assert report.memory_method is not None
            assert report.row("test:fast").peak_memory is not None and report.row("test:fast").peak_memory >= 0


class TestBenchReport:
    def test_to_dict_keeps_measured_and_estimated_apart(self, counting, linear_model):
        report = bench(linear_model, ["test:fast", "ort:cpu"], runs=3)
        data = json.loads(json.dumps(report.to_dict()))
        assert data["baseline"] == "test:fast" and data["runs"] == 3
        fast, cpu = data["devices"]
        assert fast["measured"]["speed_vs_baseline"] == 1.0
        assert fast["measured"]["latency"]["p50_s"] == report.row("test:fast").latency.p50
        assert fast["estimated"]["kind"] == "estimated"
        assert fast["estimated"]["seconds"] == report.row("test:fast").estimate.seconds
        assert cpu["estimated"]["seconds"] is None and cpu["estimated"]["note"]

    def test_lines_say_which_figure_is_estimated(self):
        lat = Latency(1e-3, 1e-3, 1e-3, 1e-3, 1, 1e-3)
        rows = [
            DeviceBench("a:0", latency=lat, speed=1.0),
            DeviceBench("b:0", latency=lat, speed=0.5),
            DeviceBench("c:0", error="cannot take the model: no"),
        ]
        report = BenchReport("m", "d", "a:0", 1, (), 1, None, None, None, rows)
        assert report.lines() == [
            "a:0: the baseline",
            "b:0 = 0.50 x a:0 (measured p50)",
            "c:0: not measured: cannot take the model: no",
        ]


class TestPlot:
    def test_writes_a_png(self, counting, linear_model, tmp_path):
        pytest.importorskip("matplotlib")
        report = bench(linear_model, ["test:fast", "ort:cpu", "test:picky"], runs=2)
        target = tmp_path / "bench.png"
        plot(report, target)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_without_matplotlib_the_error_names_the_extra(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
        report = BenchReport("m", "d", "a:0", 1, (), 1, None, None, None, [DeviceBench("a:0")])
        with pytest.raises(HalError, match=r"pip install onnx-hal\[plot\]"):
            plot(report, "x.png")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


class TestCli:
    def test_table_with_every_device_and_the_relative_lines(self, counting, model_file, capsys):
        code, out, _ = _cli(capsys, model_file, "--devices", "test:fast", "ort:cpu", "test:picky", "--runs", "3")
        assert code == 0
        assert "test:fast (baseline)" in out and "ort:cpu" in out and "test:picky" in out
        assert "(estimated)" in out and "(measured)" in out
        assert "ort:cpu = " in out and "x test:fast (measured p50)" in out
        assert "test:picky: not measured: cannot take the model" in out

    def test_json_only_and_the_same_figures_as_the_table(self, counting, model_file, capsys, monkeypatch):
        report = bench(model_file, ["test:fast", "ort:cpu"], runs=3)
        monkeypatch.setattr("hal.bench.bench", lambda *a, **k: report)
        code, out, err = _cli(capsys, model_file, "--json")
        assert code == 0 and not err
        data = json.loads(out)  # nothing but JSON on stdout
        assert data == json.loads(json.dumps(report.to_dict()))
        _, table, _ = _cli(capsys, model_file)
        for r in report.rows:
            assert f"{r.latency.p50 * 1e3:.3g}" in table
        assert f"{report.row('ort:cpu').speed:.2f}x" in table

    def test_json_parses_from_a_real_run(self, counting, model_file, capsys):
        code, out, _ = _cli(capsys, model_file, "--devices", "test:plain", "test:fast", "--runs", "2", "--batch", "5", "--json")
        data = json.loads(out)
        assert code == 0 and data["batch"] == 5 and data["baseline"] == "test:plain"
        assert [d["device"] for d in data["devices"]] == ["test:plain", "test:fast"]
        assert data["devices"][0]["measured"]["speed_vs_baseline"] == 1.0
        assert data["devices"][0]["estimated"]["seconds"] is None
        assert data["devices"][1]["estimated"]["seconds"] > 0

    @pytest.mark.parametrize(
        ("argv", "match"),
        [
            (["--devices", "nope:0"], "unknown device 'nope:0'"),
            (["--runs", "3", "--seconds", "1"], "not both"),
            (["--runs", "-1"], "positive whole number"),
            (["--batch", "0"], "batch must be"),
        ],
    )
    def test_errors_are_one_line(self, counting, model_file, capsys, argv, match):
        code, out, err = _cli(capsys, model_file, *argv)
        assert code == 1 and not out
        assert err.count("\n") == 1 and err.startswith("hal: error: ") and match in err
        assert not counting.runners

    def test_exit_1_when_no_device_could_be_measured(self, counting, model_file, capsys):
        code, out, _ = _cli(capsys, model_file, "--devices", "test:broken", "--runs", "1")
        assert code == 1 and "test:broken: the baseline" in out

    def test_plot_writes_a_png(self, counting, model_file, capsys, tmp_path):
        pytest.importorskip("matplotlib")
        target = tmp_path / "chart.png"
        code, out, _ = _cli(capsys, model_file, "--devices", "test:fast", "test:plain", "--runs", "2", "--plot", str(target))
        assert code == 0 and f"chart: {target}" in out
        assert target.read_bytes()[:4] == b"\x89PNG"

    def test_plot_without_matplotlib_fails_first_in_one_line(self, counting, model_file, capsys, monkeypatch, tmp_path):
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
        code, out, err = _cli(capsys, model_file, "--devices", "test:fast", "--plot", str(tmp_path / "c.png"))
        assert code == 1 and not out
        assert err.count("\n") == 1 and "pip install onnx-hal[plot]" in err
        assert not counting.runners  # refused before any device was benched

    @pytest.mark.parametrize("by_seconds", [False, True])
    def test_the_progress_bar_takes_every_stage(self, by_seconds):
        from contextlib import ExitStack

        with ExitStack() as stack:
            progress = cli._bench_progress(stack, by_seconds)
            for stage in ("cold to()", "warm to()", "warm-up"):
                progress("a:0", stage, 0.0, 0.0)
            progress("a:0", "runs", 50.0, 100.0)
            progress("a:0", "done", 0.0, 0.0)

    def test_plot_into_a_missing_directory_fails_first(self, counting, model_file, capsys, tmp_path):
        code, _, err = _cli(capsys, model_file, "--devices", "test:fast", "--plot", os.fspath(tmp_path / "no" / "c.png"))
        assert code == 1 and "has no directory" in err and not counting.runners


def test_feeds_are_seeded_and_reproducible(counting, linear_model):
    bench(linear_model, ["test:fast"], runs=1, batch=2)
    bench(linear_model, ["test:fast"], runs=1, batch=2)
    first, second = counting.runners[1]["last"]["x"], counting.runners[3]["last"]["x"]
    assert first.shape == (2, 8) and np.array_equal(first, second)
