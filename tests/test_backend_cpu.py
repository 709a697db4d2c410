"""The embedded CPU backend's declared capabilities are true of onnxruntime's CPU kernels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import hal
from hal.backends.cpu import CPU_CAPABILITIES
from hal.backends.onnxruntime import fit_capabilities, runtime_limits
from hal.capabilities import NumberFormat, Support
from hal.testing.build import make_model

# The table as narrowed for the installed onnxruntime (the device lists exactly this).
CAPS = fit_capabilities(CPU_CAPABILITIES)

# Ops whose kernels prove compute support: arithmetic for numbers, logic for bool.
COMPUTE = {NumberFormat.BOOL: "And"}


def builds(model) -> bool:
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def binary(fmt: NumberFormat, op: str, opset: int):
    t = fmt.onnx_type
    return make_model([helper.make_node(op, ["a", "b"], ["c"])], [("a", t, [2, 2]), ("b", t, [2, 2])], [("c", t, [2, 2])], opset=opset)


def casts(fmt: NumberFormat, opset: int):
    t = fmt.onnx_type
    return make_model(
        [helper.make_node("Cast", ["a"], ["b"], to=t), helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT)],
        [("a", TensorProto.FLOAT, [2, 2])], [("c", TensorProto.FLOAT, [2, 2])], opset=opset,
    )


class TestDeclaredCapabilities:
    opset = CAPS.opsets.max

    @pytest.mark.parametrize("fmt", CAPS.formats.at_least(Support.EMULATED), ids=lambda f: f.value)
    def test_computed_formats_have_kernels(self, fmt):
        assert builds(binary(fmt, COMPUTE.get(fmt, "Add"), self.opset))

    @pytest.mark.parametrize(
        "fmt", [f for f, s in CAPS.formats.items() if s is Support.STORAGE and f is not NumberFormat.STRING],
        ids=lambda f: f.value,
    )
    def test_storage_formats_cast_but_do_not_compute(self, fmt):
        assert builds(casts(fmt, self.opset))
        assert not builds(binary(fmt, "Add", self.opset)), f"{fmt.value} computes: declare it emulated or native"

    def test_bfloat16_matmul_has_no_kernel(self):
        assert CAPS.support("bfloat16") is Support.STORAGE
        assert not builds(binary(NumberFormat.BFLOAT16, "MatMul", self.opset))

    @pytest.mark.parametrize("fmt", [f for f, s in CAPS.formats.items() if s is Support.NONE], ids=lambda f: f.value)
    def test_formats_declared_none_do_not_even_cast(self, fmt):
        assert not builds(casts(fmt, self.opset))

    def test_storage_formats_round_trip_values(self):
        exe = hal.compile(casts(NumberFormat.FLOAT8_E5M2, 21)).to("ort:cpu")
        x = np.array([[1.0, 2.0], [-3.0, 0.5]], np.float32)
        np.testing.assert_array_equal(exe.run({"a": x})["c"], x)


class TestCpuDevice:
    def test_capabilities_are_the_table_fitted_to_the_installed_onnxruntime(self):
        (cpu,) = [d for d in hal.devices() if d.id == "ort:cpu"]
        assert cpu.capabilities.formats == CAPS.formats
        limits = runtime_limits()
        assert cpu.capabilities.opsets.max_ir_version == limits.max_ir_version
        assert cpu.capabilities.opsets.max == min(CPU_CAPABILITIES.opsets.max, limits.max_opset)

    def test_listed_available_with_details(self):
        (cpu,) = [d for d in hal.devices() if d.id == "ort:cpu"]
        assert cpu.available and cpu.kind is hal.DeviceKind.CPU
        assert dict(cpu.details)["onnxruntime"] == ort.__version__
        assert cpu.capabilities.memory.capacity_bytes and cpu.capabilities.memory.capacity_bytes > 2**28


class TestRuntimeLimits:
    def test_kept_on_disk_and_rebuilt_when_damaged(self, tmp_path, monkeypatch):
        import hal.backends.onnxruntime as hort

        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))
        hort.runtime_limits.cache_clear()
        try:
            first = hort.runtime_limits()
            (entry,) = (tmp_path / "runtime").iterdir()
            assert first == hort.probe_runtime_limits()
            entry.write_text('{"version": "1.0", "max_ir_version": "x"')  # truncated
            hort.runtime_limits.cache_clear()
            assert hort.runtime_limits() == first
            assert hort.RuntimeLimits(**__import__("json").loads(entry.read_text())) == first
        finally:
            hort.runtime_limits.cache_clear()


class TestOptimizedModelCache:
    def test_keyed_by_the_cores_digest_without_rehashing(self, tmp_path):
        """The LoweredModel's digest is trusted: a hit needs no serialization or hashing of the
        model (the core's digest is the model's identity)."""
        from attrs import evolve

        from hal._plugins import registry
        from hal.plugin import CompileOptions, LoweredModel

        backend, device = registry().backend("ort"), registry().device("ort:cpu")
        proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2])], [("y", TensorProto.FLOAT, [2])])
        model = evolve(LoweredModel.from_proto(proto), digest="ab" * 32)
        options = CompileOptions(cache_dir=str(tmp_path))
        hits = backend.cache_hits
        backend.prepare(model, device, options)
        assert backend.cache_hits == hits and len(list(tmp_path.glob("*.ort.onnx"))) == 1
        runner = backend.prepare(model, device, options)
        assert backend.cache_hits == hits + 1
        np.testing.assert_array_equal(runner.run({"x": np.array([-1.0, 2.0], np.float32)}, ["y"])[0], [0.0, 2.0])
        other = evolve(model, digest="cd" * 32)
        backend.prepare(other, device, options)  # another digest is another entry
        assert backend.cache_hits == hits + 1 and len(list(tmp_path.glob("*.ort.onnx"))) == 2


class TestExactPrecision:
    """onnxruntime fuses DequantizeLinear + MatMul on int4/int8 weights into MatMulNBits and by
    default quantizes the activations to int8 (0.6% off); at the default precision ort:cpu must
    compute in float32, as the model says."""

    @pytest.fixture(autouse=True)
    def private_cache(self, tmp_path, monkeypatch):  # an optimized model cached earlier must not answer
        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))

    @staticmethod
    def block_dequantized(elem: int, dtype):
        from onnx import TensorProto, helper

        from hal.testing.build import make_model

        rng = np.random.default_rng(3)
        k, n, block = 128, 16, 32
        q = rng.integers(-7, 8, (k, n)).astype(dtype)
        scale = rng.uniform(0.01, 0.1, (k // block, n)).astype(np.float32)
        inits = [
            helper.make_tensor("q", elem, [k, n], q.reshape(-1).tolist()),
            helper.make_tensor("s", TensorProto.FLOAT, list(scale.shape), scale.reshape(-1)),
        ]
        model = make_model(
            [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"])],
            [("x", TensorProto.FLOAT, [4, k])], [("y", TensorProto.FLOAT, [4, n])], initializers=inits, opset=21,
        )
        x = rng.standard_normal((4, k)).astype(np.float32)
        want = x.astype(np.float64) @ (q.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=0))
        return model, x, want

    @pytest.mark.parametrize("elem", ["int4", "int8"])
    def test_block_dequantized_weights_compute_in_float32(self, elem):
        import ml_dtypes
        from onnx import TensorProto

        code, dtype = {"int4": (TensorProto.INT4, ml_dtypes.int4), "int8": (TensorProto.INT8, np.int8)}[elem]
        model, x, want = self.block_dequantized(code, dtype)
        got = hal.compile(model).to("ort:cpu", strict=True, verify=False).run({"x": x})["y"]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
