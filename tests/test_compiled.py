"""Compile once, target any chip: the portable compiled file, lowering, fallback, placement,
verdicts, and the compile cache."""

from __future__ import annotations

import logging
import multiprocessing
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hal
from hal import cache as hal_cache
from hal.cli import main
from hal.errors import CompileError, LoweringError, ModelError
from hal.testing.build import make_model, optional_info, sequence_info


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))


def acme_model():
    """y = 2x through an operator of a vendor domain that onnxruntime does not know."""
    graph = helper.make_graph(
        [helper.make_node("Double", ["x"], ["y"], domain="com.acme")], "acme",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)], ir_version=9)


def int4_identity():
    """Identity on int4 has no onnxruntime CPU kernel; lowering moves it in int32 instead."""
    return make_model([helper.make_node("Identity", ["x"], ["y"])],
                      [("x", TensorProto.INT4, [4])], [("y", TensorProto.INT4, [4])], opset=21)


def _spy_on_lowering(monkeypatch):
    """Record each lower_for call and each (proto, lowered model) the ort backend is asked to prepare."""
    import hal.compiler
    from hal._plugins import registry

    lowerings, seen = [], []
    lower_for = hal.compiler.lower_for
    monkeypatch.setattr(hal.compiler, "lower_for", lambda *a, **k: lowerings.append(1) or lower_for(*a, **k))
    backend = registry().backend("ort")
    prepare = backend.prepare
    monkeypatch.setattr(backend, "prepare", lambda model, device, options: seen.append((model.proto, model)) or prepare(model, device, options))
    return lowerings, seen


class ReferenceBackend(hal.Backend):
    """A second real backend for fallback tests: ONNX's reference evaluator, any format."""

    name = "ref"
    version = "1"

    def discover(self):
        caps = hal.Capabilities.from_levels(native=[f for f in hal.NumberFormat if not f.value.startswith(("float6", "complex", "string"))],
                                            opsets=hal.OpsetRange(1, 25, domains=("com.acme",)))
        return [hal.Device(id="ref:0", backend="ref", vendor="ONNX", name="reference", kind="cpu", capabilities=caps)]

    def prepare(self, model, device, options):
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun

        class Double(OpRun):
            op_domain = "com.acme"

            def _run(self, x):
                return (x * 2,)

        session = ReferenceEvaluator(model.proto, new_ops=[Double])

        class Runner:
            def run(self, feeds, names):
                return session.run(list(names), feeds)

        return Runner()


class Plugin:
    @hal.hookimpl
    def hal_register_backends(self, register):
        register(ReferenceBackend())


@pytest.fixture
def with_reference(fresh_registry):
    reg = fresh_registry()
    reg.add_plugin(Plugin(), name="ref")
    yield reg
    reg.remove_plugin("ref")


class TestCompiledFile:
    def test_save_and_load_round_trip(self, tmp_path, linear_model):
        compiled = hal.compile(linear_model)
        path = tmp_path / "model.halc.onnx"
        compiled.save(path)
        back = hal.load_compiled(path)
        assert back.digest == compiled.digest
        assert back.manifest["requirements"]["parameter_bytes"] == compiled.manifest["requirements"]["parameter_bytes"]
        assert back.manifest["versions"]["onnx-hal"] == hal.__version__
        x = np.ones((2, 8), np.float32)
        np.testing.assert_array_equal(back.to("ort:cpu").run({"x": x})["y"], compiled.to("ort:cpu").run({"x": x})["y"])

    def test_compiled_file_is_plain_onnx_and_recompiles_to_itself(self, tmp_path, linear_model):
        path = tmp_path / "c.onnx"
        hal.compile(linear_model).save(path)
        onnx.checker.check_model(onnx.load(path))
        assert hal.compile(path).digest == hal.load_compiled(path).digest

    def test_tampered_file_is_refused(self, tmp_path, linear_model):
        path = tmp_path / "c.onnx"
        hal.compile(linear_model).save(path)
        proto = onnx.load(path)
        proto.graph.node[0].name = "changed"
        onnx.save(proto, path)
        with pytest.raises(ModelError, match="does not match its manifest"):
            hal.load_compiled(path)

    def test_plain_model_is_not_a_compiled_one(self, tmp_path, linear_model):
        onnx.save(linear_model, tmp_path / "plain.onnx")
        with pytest.raises(ModelError, match="not a compiled one"):
            hal.load_compiled(tmp_path / "plain.onnx")

    def test_cli_compile_then_run(self, tmp_path, linear_model, capsys):
        onnx.save(linear_model, tmp_path / "m.onnx")
        assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.halc")]) == 0
        np.save(tmp_path / "x.npy", np.ones((1, 8), np.float32))
        assert main(["run", str(tmp_path / "m.halc"), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npy'}"]) == 0
        assert "y: float32 [1, 4]" in capsys.readouterr().out


class TestFallback:
    def test_auto_fallback_moves_the_model_and_says_so(self, with_reference, caplog):
        compiled = hal.compile(acme_model())
        with caplog.at_level(logging.WARNING, logger="hal.compile"):
            exe = compiled.to("ort:cpu")
        assert exe.device.id == "ref:0"
        assert exe.lowering[0].kind == "fallback"
        assert "from ort:cpu to ref:0" in exe.lowering[0].detail
        assert any("fallback" in r.message and "ref:0" in r.message for r in caplog.records)
        np.testing.assert_array_equal(exe.run({"x": np.arange(4, dtype=np.float32)})["y"], [0, 2, 4, 6])
        assert exe.placement[0].device == "ref:0"

    @pytest.mark.parametrize("kwargs", [{"fallback": None}, {"strict": True}])
    def test_no_fallback_names_the_operators(self, with_reference, kwargs):
        with pytest.raises(LoweringError, match=r"ort:cpu cannot run the model \(operators: com.acme.Double\)") as info:
            hal.compile(acme_model()).to("ort:cpu", **kwargs)
        assert info.value.operators == ("com.acme.Double",)

    def test_explicit_fallback_device(self, with_reference):
        assert hal.compile(acme_model()).to("ort:cpu", fallback="ref:0").device.id == "ref:0"

    def test_no_device_can_compile(self, fresh_registry):
        with pytest.raises(CompileError, match="no device could compile"):
            hal.compile(acme_model()).to("ort:cpu")

    def test_device_list_is_tried_in_order(self, with_reference, linear_model):
        assert hal.compile(linear_model).to(["ref:0", "ort:cpu"]).device.id == "ref:0"
        assert hal.compile(acme_model()).to(["ort:cpu", "ref:0"], fallback=None).device.id == "ref:0"

    def test_int4_identity_runs_on_cpu_moved_in_int32(self, fresh_registry):
        exe = hal.compile(int4_identity()).to("ort:cpu", fallback=None)
        x = np.array([1, -2, 3, 7], dtype=hal.NumberFormat.INT4.dtype)
        np.testing.assert_array_equal(exe.run({"x": x})["y"].astype(int), [1, -2, 3, 7])
        assert any("int4" in s.detail for s in exe.lowering)

    def test_unavailable_explicit_device_is_an_error_not_a_fallback(self, fresh_registry, linear_model):
        with pytest.raises(hal.errors.UnknownDeviceError):
            hal.compile(linear_model).to("cuda:0")


class TestAuto:
    def test_auto_prefers_a_device_that_runs_the_model_as_is(self, with_reference):
        # bfloat16 MatMul: ort:cpu only stores bf16 and needs lowering; ref:0 runs it as is.
        model = make_model([helper.make_node("MatMul", ["a", "b"], ["c"])],
                           [("a", TensorProto.BFLOAT16, [2, 2]), ("b", TensorProto.BFLOAT16, [2, 2])],
                           [("c", TensorProto.BFLOAT16, [2, 2])], opset=21)
        compiled = hal.compile(model)
        ranked = [d.id for d, _ in hal.compiled.rank(compiled.model, hal.devices())]
        assert ranked == ["ref:0", "ort:cpu"]
        assert compiled.to("auto").device.id == "ref:0"

    def test_opset_conversion_does_not_demote_a_device(self, with_reference):
        # Opset 6: ort:cpu (7..25) converts it, ref:0 (1..25) takes it as is; conversion keeps
        # every operator's meaning, so the tie goes to ort:cpu as the reference implementation.
        model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2])],
                           [("y", TensorProto.FLOAT, [2])], opset=6, ir_version=3)
        compiled = hal.compile(model)
        ranked = [(d.id, v.status) for d, v in hal.compiled.rank(compiled.model, hal.devices())]
        assert ranked == [("ort:cpu", "lowered"), ("ref:0", "as-is")]
        assert compiled.to("auto").device.id == "ort:cpu"

    def test_verdicts(self, with_reference):
        model = make_model([helper.make_node("MatMul", ["a", "b"], ["c"])],
                           [("a", TensorProto.BFLOAT16, [2, 2]), ("b", TensorProto.BFLOAT16, [2, 2])],
                           [("c", TensorProto.BFLOAT16, [2, 2])], opset=21)
        compiled = hal.compile(model)
        cpu, ref = compiled.explain("ort:cpu"), compiled.explain("ref:0")
        assert cpu.status == "lowered" and any("bfloat16" in s.detail for s in cpu.steps)
        assert ref.status == "as-is"


class EvaluatorGpu(hal.Backend):
    """An accelerator (ranked before ort:cpu) that runs models with ONNX's reference evaluator
    and declares the graph input and output kinds it is given."""

    name = "evalgpu"
    version = "1"

    def __init__(self, io_kinds=()):
        self.io_kinds = io_kinds
        self.prepared = 0

    def discover(self):
        caps = hal.Capabilities.from_levels(native=["float32", "int64", "bool"], io_kinds=self.io_kinds)
        return [hal.Device(id="evalgpu:0", backend="evalgpu", vendor="ONNX", name="evaluator", kind="gpu", capabilities=caps)]

    def prepare(self, model, device, options):
        from onnx.reference import ReferenceEvaluator

        self.prepared += 1
        session = ReferenceEvaluator(model.proto)

        class Runner:
            def run(self, feeds, names):
                return session.run(list(names), feeds)

        return Runner()


@pytest.fixture
def evalgpu(fresh_registry):
    """``evalgpu(io_kinds)``: the EvaluatorGpu backend registered in this process."""
    reg = fresh_registry()
    added = []

    def add(io_kinds=()):
        backend = EvaluatorGpu(io_kinds)

        class Plugin:
            @hal.hookimpl
            def hal_register_backends(self, register):
                register(backend)

        reg.add_plugin(Plugin(), name="evalgpu")
        added.append("evalgpu")
        return backend

    yield add
    for name in added:
        reg.remove_plugin(name)


def split_model():
    """SplitToSequence of x into rows, then each row doubled by SequenceMap: a sequence out."""
    body = helper.make_graph(
        [helper.make_node("Add", ["e", "e"], ["d"])], "double",
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3])], [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 3])],
    )
    nodes = [helper.make_node("SplitToSequence", ["x"], ["rows"], axis=0),
             helper.make_node("SequenceMap", ["rows"], ["y"], body=body)]
    return make_model(nodes, [("x", TensorProto.FLOAT, [4, 3])], [sequence_info("y", TensorProto.FLOAT, [1, 3])], opset=18)


def sequence_identity():
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [sequence_info("x", TensorProto.FLOAT, [None])],
                      [sequence_info("y", TensorProto.FLOAT, [None])], opset=18)


class TestIoKinds:
    """Sequences and optionals go only to devices whose capabilities declare them (io_kinds)."""

    def test_a_tensor_model_prefers_the_accelerator(self, evalgpu, linear_model):
        evalgpu()
        assert hal.compile(linear_model).to("auto").device.id == "evalgpu:0"

    def test_a_device_without_sequences_refuses_at_placement(self, evalgpu):
        backend = evalgpu()
        compiled = hal.compile(split_model())
        verdict = compiled.explain("evalgpu:0")
        assert verdict.status == "cannot"
        assert verdict.reason == (
            "output 'y' is a sequence of float32 [1, 3], and the device passes tensors only (Capabilities.io_kinds): "
            "run the model on a device that declares 'sequence' there, such as ort:cpu"
        )
        with pytest.raises(LoweringError, match=r"evalgpu:0 cannot run the model and strict=True forbids .*: output 'y' is a sequence"):
            compiled.to("evalgpu:0", strict=True)
        assert backend.prepared == 0  # refused before the backend saw it

    def test_auto_and_fallback_take_the_model_to_ort_cpu(self, evalgpu, caplog):
        evalgpu()
        compiled = hal.compile(split_model())
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        exe = compiled.to("auto")
        assert exe.device.id == "ort:cpu" and exe.verification.passed
        got = exe.run({"x": x})["y"]
        assert len(got) == 4 and all(np.array_equal(row, 2 * x[i : i + 1]) for i, row in enumerate(got))
        with caplog.at_level(logging.WARNING, logger="hal.compile"):
            moved = compiled.to("evalgpu:0")
        assert moved.device.id == "ort:cpu"
        assert moved.lowering[0].kind == "fallback" and "output 'y' is a sequence" in moved.lowering[0].detail

    def test_a_device_that_declares_sequences_runs_them(self, evalgpu):
        backend = evalgpu(io_kinds=("sequence",))
        exe = hal.compile(sequence_identity()).to("auto")
        assert exe.device.id == "evalgpu:0" and backend.prepared == 1
        out = exe.run({"x": [np.ones(2, np.float32), np.zeros(5, np.float32)]})["y"]
        assert [a.tolist() for a in out] == [[1, 1], [0, 0, 0, 0, 0]]

    def test_optional_sequences_need_their_own_declaration(self, evalgpu):
        evalgpu(io_kinds=("sequence", "optional"))
        model = make_model([helper.make_node("Identity", ["x"], ["y"])], [optional_info("x", TensorProto.FLOAT, None, sequence=True)],
                           [optional_info("y", TensorProto.FLOAT, None, sequence=True)], opset=18)
        compiled = hal.compile(model)
        assert "input 'x' is an optional sequence of float32 any shape, and the device passes tensors and sequence, optional" in (
            compiled.explain("evalgpu:0").reason
        )
        exe = compiled.to("auto")
        assert exe.device.id == "ort:cpu"
        assert exe.run({"x": None})["y"] is None
        assert exe.run({"x": [np.ones(1, np.float32)]})["y"][0].tolist() == [1]

    def test_maps_are_refused_everywhere_with_the_reason(self, fresh_registry):
        value = helper.make_value_info("m", helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
        graph = helper.make_graph([helper.make_node("Identity", ["m"], ["n"])], "maps", [value], [helper.make_value_info("n", value.type)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
        with pytest.raises(CompileError, match=r"ort:cpu: input 'm' is a map\(int64, tensor\(float\)\); the HAL passes tensors, sequences"):
            hal.compile(model).to("auto")


class TestLoweringOnCpu:
    def test_bfloat16_matmul_runs_after_legalization_and_is_recorded(self, fresh_registry):
        import ml_dtypes

        model = make_model([helper.make_node("MatMul", ["a", "b"], ["c"])],
                           [("a", TensorProto.BFLOAT16, [2, 3]), ("b", TensorProto.BFLOAT16, [3, 2])],
                           [("c", TensorProto.BFLOAT16, [2, 2])], opset=21)
        exe = hal.compile(model).to("ort:cpu", fallback=None)
        a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
        b = np.ones((3, 2), ml_dtypes.bfloat16)
        c = exe.run({"a": a, "b": b})["c"]
        assert c.dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(c.astype(np.float32), (a.astype(np.float32) @ b.astype(np.float32)).astype(ml_dtypes.bfloat16).astype(np.float32))
        assert any(s.kind == "legalize-format" and "bfloat16" in s.detail for s in exe.lowering)

    def test_opset_28_quantize_dequantize_runs_on_cpu(self, fresh_registry):
        import ml_dtypes

        scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
        model = make_model(
            [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
            [("x", TensorProto.FLOAT, [4])], [("y", TensorProto.FLOAT, [4])], initializers=[scale], opset=28, ir_version=12,
        )
        exe = hal.compile(model).to("ort:cpu", fallback=None)
        x = np.array([1.0, -3.0, 100.0, 0.1], np.float32)
        expected = (x / 0.5).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * 0.5
        np.testing.assert_array_equal(exe.run({"x": x})["y"], expected)
        assert any(s.kind == "convert-opset" for s in exe.lowering)


def _compile_in_child(path: str, cache_dir: str, queue) -> None:  # pragma: no cover - runs in a child
    os.environ["HAL_CACHE_DIR"] = cache_dir
    os.environ["HAL_LOAD_PLUGINS"] = ""
    import numpy as np

    import hal

    exe = hal.compile(path).to("ort:cpu")
    queue.put(exe.run({"x": np.ones((1, 8), np.float32)})["y"].tolist())


class TestCompileCache:
    def test_entries_are_written_and_reused(self, fresh_registry, linear_model):
        from hal._plugins import registry

        hal.compile(linear_model).to("ort:cpu")
        info = hal_cache.info()
        assert info["sections"]["compiled"]["files"] == 1
        assert info["sections"]["backends/ort"]["files"] == 1
        backend = registry().backend("ort")
        hits = backend.cache_hits
        hal.compile(linear_model).to("ort:cpu")
        assert backend.cache_hits == hits + 1
        assert hal_cache.info()["sections"]["compiled"]["files"] == 1

    def test_warm_to_neither_lowers_nor_stores_an_unchanged_model(self, fresh_registry, linear_model, monkeypatch):
        from hal._paths import cache_root

        lowerings, seen = _spy_on_lowering(monkeypatch)
        compiled = hal.compile(linear_model)
        compiled.to("ort:cpu")
        assert len(lowerings) == 1
        (entry,) = (p for p in (cache_root() / "compiled").rglob("*") if p.is_file())
        assert entry.stat().st_size < len(compiled.model.serialized)  # steps only, no copy of the model
        hal.compile(linear_model).to("ort:cpu")
        assert len(lowerings) == 1  # the warm to() took the lowering from the cache
        for model, lowered in seen:
            assert lowered.digest == compiled.digest
            assert model.SerializeToString(deterministic=True) == compiled.model.serialized

    def test_one_lowering_per_device_shared_by_ranking_and_preparing(self, with_reference, linear_model, monkeypatch):
        lowerings, _ = _spy_on_lowering(monkeypatch)
        compiled = hal.compile(linear_model)
        compiled.to("auto")
        assert len(lowerings) == 2  # ort:cpu and ref:0, each once: ranking and prepare share it
        compiled.to("auto")
        compiled.explain("ref:0")
        compiled.to("ref:0")
        assert len(lowerings) == 2  # warm, in process: nothing lowered again
        hal.compile(linear_model).to("auto")
        assert len(lowerings) == 2  # another CompiledModel, as in a new process: from the cache

    def test_a_refusal_is_cached_too(self, fresh_registry, monkeypatch):
        lowerings, _ = _spy_on_lowering(monkeypatch)
        for _ in range(2):
            with pytest.raises(LoweringError):
                hal.compile(acme_model()).to("ort:cpu", strict=True)
        assert len(lowerings) == 1

    def test_a_lowered_model_is_cached_with_its_digest(self, fresh_registry, monkeypatch):
        import hashlib

        lowerings, seen = _spy_on_lowering(monkeypatch)
        for _ in range(2):
            exe = hal.compile(int4_identity()).to("ort:cpu", fallback=None)
            assert exe.lowering
        assert len(lowerings) == 1
        (cold, _), (warm, lowered) = seen
        assert warm.SerializeToString(deterministic=True) == cold.SerializeToString(deterministic=True)
        assert lowered.digest == hashlib.sha256(warm.SerializeToString(deterministic=True)).hexdigest()
        assert lowered.digest != hal.compile(int4_identity()).digest

    def test_corrupt_entries_are_detected_and_rebuilt(self, fresh_registry, linear_model, caplog):
        from hal._paths import cache_root

        hal.compile(linear_model).to("ort:cpu")
        for path in cache_root().rglob("*"):
            if path.is_file():
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with caplog.at_level(logging.WARNING):
            exe = hal.compile(linear_model).to("ort:cpu")
        assert exe.run({"x": np.ones((1, 8), np.float32)})["y"].shape == (1, 4)
        assert any("corrupt" in r.message or "unusable" in r.message for r in caplog.records)
        # rebuilt: the next compile reads valid entries without warnings
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            hal.compile(linear_model).to("ort:cpu")
        assert not caplog.records

    def test_concurrent_processes_share_the_cache(self, tmp_path, linear_model):
        path = tmp_path / "m.onnx"
        onnx.save(linear_model, path)
        cache_dir = str(tmp_path / "shared-cache")
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        children = [ctx.Process(target=_compile_in_child, args=(str(path), cache_dir, queue)) for _ in range(3)]
        for c in children:
            c.start()
        results = [queue.get(timeout=120) for _ in children]
        for c in children:
            c.join(timeout=60)
            assert c.exitcode == 0
        assert results[0] == results[1] == results[2]
        leftovers = [p for p in (tmp_path / "shared-cache").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
        assert not leftovers
        os.environ["HAL_CACHE_DIR"] = cache_dir
        try:
            assert hal_cache.info()["sections"]["compiled"]["files"] == 1
        finally:
            os.environ["HAL_CACHE_DIR"] = str(tmp_path / "cache")

    def test_cli_info_and_clear(self, fresh_registry, linear_model, capsys):
        hal.compile(linear_model).to("ort:cpu")
        assert main(["cache", "info"]) == 0
        assert "compiled" in capsys.readouterr().out
        assert main(["cache", "clear"]) == 0
        assert hal_cache.info()["sections"] == {"compiled": {"files": 0, "bytes": 0}} or not hal_cache.info()["sections"]


class TestExplainCli:
    def test_explain_prints_placement_and_lowering(self, tmp_path, fresh_registry, capsys):
        model = make_model([helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")],
                           [("a", TensorProto.BFLOAT16, [2, 2]), ("b", TensorProto.BFLOAT16, [2, 2])],
                           [("c", TensorProto.BFLOAT16, [2, 2])], opset=21)
        onnx.save(model, tmp_path / "bf16.onnx")
        assert main(["explain", str(tmp_path / "bf16.onnx"), "--device", "ort:cpu"]) == 0
        out = capsys.readouterr().out
        assert "runs on    ort:cpu" in out and "legalize-format" in out and "bfloat16" in out

    def test_inspect_shows_device_verdicts(self, tmp_path, fresh_registry, capsys):
        onnx.save(int4_identity(), tmp_path / "i4.onnx")
        assert main(["inspect", str(tmp_path / "i4.onnx")]) == 0
        out = capsys.readouterr().out
        assert "ort:cpu: runs after lowering: Identity" in out

    def test_inspect_says_cannot_for_an_undeclared_operator_domain(self, tmp_path, fresh_registry, capsys):
        onnx.save(acme_model(), tmp_path / "acme.onnx")
        assert main(["inspect", str(tmp_path / "acme.onnx")]) == 0
        out = capsys.readouterr().out
        assert "ort:cpu: cannot: operators com.acme.Double are from a domain the device does not declare" in out
        assert "runs as is" not in out


class TestTargets:
    @pytest.mark.parametrize(
        ("target", "shown"),
        [(None, "not None"), (123, "not int 123"), ([], "not an empty list"), (["ort:cpu", None], "a list holding NoneType")],
    )
    def test_what_to_cannot_take_is_a_device_error_naming_the_fix(self, fresh_registry, linear_model, target, shown):
        with pytest.raises(hal.errors.DeviceError, match=r"to\(\) takes a device id such as 'ort:cpu', 'auto'") as info:
            hal.compile(linear_model).to(target)
        assert shown in str(info.value)


class TestSave:
    @pytest.mark.parametrize(
        ("where", "message"),
        [
            (lambda tmp: tmp, "is a directory; name a file in it"),
            (lambda tmp: tmp / "missing" / "m.onnx", "its directory .*missing does not exist; create it first"),
            (lambda tmp: tmp / "file.txt" / "m.onnx", "its directory .*file.txt is not a directory"),
            (lambda tmp: "/proc/hal-test.onnx", "cannot write the compiled model to /proc/hal-test.onnx"),
        ],
    )
    def test_unwritable_paths_are_an_output_path_error_naming_the_path(self, tmp_path, linear_model, where, message):
        (tmp_path / "file.txt").write_text("x")
        path = where(tmp_path)
        with pytest.raises(hal.errors.OutputPathError, match=message) as info:
            hal.compile(linear_model).save(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, OSError)  # also an OSError, for callers who do not know the HAL
        assert not (tmp_path / "missing").exists()

    @pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
    def test_the_file_honours_the_umask(self, tmp_path, linear_model, umask):
        old = os.umask(umask)
        try:
            hal.compile(linear_model).save(tmp_path / "m.onnx")
        finally:
            os.umask(old)
        assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~umask

    def test_cli_compile_to_a_directory_is_one_line_and_exit_1(self, tmp_path, linear_model, capsys):
        onnx.save(linear_model, tmp_path / "m.onnx")
        assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("hal: error: cannot save to") and "is a directory" in err
        assert len(err.strip().splitlines()) == 1
