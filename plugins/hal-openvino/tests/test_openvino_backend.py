"""Discovery, running generated models against onnxruntime, precision, cache and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper
from ov_models import attention, conv, long_dot, make, mlp, vi

import hal
import hal.plugin
from hal.errors import CompileError, InputError
from hal.plugin import CompileOptions, LoweredModel


def test_import_does_not_load_openvino():
    code = "import sys, hal_openvino; assert 'openvino' not in sys.modules, 'openvino imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_is_listed():
    plugins = {p.name: p for p in hal.plugins()}
    assert plugins["openvino"].status == "loaded", plugins["openvino"]
    assert plugins["openvino"].distribution == "hal-openvino"
    assert "openvino" in plugins["openvino"].backends


def test_cpu_discovered_with_sensible_capabilities(cpu):
    caps = cpu.capabilities
    assert cpu.backend == "openvino" and cpu.kind is hal.DeviceKind.CPU and cpu.available
    assert cpu.name and cpu.name != "CPU"  # FULL_DEVICE_NAME
    assert caps.support("float32") is hal.Support.NATIVE
    assert caps.support("int8") is hal.Support.NATIVE
    assert caps.support("float8_e4m3fn") is hal.Support.STORAGE
    # chips.md: OpenVINO 2026.4 has no FNUZ types, no int2.
    for fmt in ("float8_e4m3fnuz", "float8_e5m2fnuz", "int2", "uint2", "complex64"):
        assert caps.support(fmt) is hal.Support.NONE, fmt
    optimization = dict(cpu.details)["optimization_capabilities"].split(",")
    assert "FP32" in optimization
    expected_bf16 = hal.Support.NATIVE if "BF16" in optimization else hal.Support.EMULATED
    assert caps.support("bfloat16") is expected_bf16
    assert caps.memory.capacity_bytes and caps.memory.capacity_bytes > 2**28
    assert caps.e8m0_encoding is hal.E8M0Encoding.OCP
    assert 28 in caps.opsets and 7 in caps.opsets


@pytest.mark.parametrize(
    ("build", "feeds"),
    [
        (mlp, {"x": np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)}),
        (conv, {"x": np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)}),
        (attention, {"x": np.random.default_rng(5).standard_normal((2, 16, 32)).astype(np.float32)}),
    ],
    ids=["mlp", "conv", "attention"],
)
def test_matches_onnxruntime(build, feeds):
    compiled = hal.compile(build())
    got = compiled.to("openvino:CPU").run(feeds)
    want = compiled.to("ort:cpu").run(feeds)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_dynamic_batch_and_outputs_do_not_alias():
    exe = hal.compile(mlp()).to("openvino:CPU")
    rng = np.random.default_rng(6)
    first = exe.run({"x": rng.standard_normal((2, 64)).astype(np.float32)})["y"]
    kept = first.copy()
    second = exe.run({"x": rng.standard_normal((7, 64)).astype(np.float32)})["y"]
    assert second.shape == (7, 64)
    np.testing.assert_array_equal(first, kept)  # the first result was not overwritten


def test_non_contiguous_and_read_only_feeds():
    exe = hal.compile(mlp()).to("openvino:CPU")
    x = np.random.default_rng(7).standard_normal((4, 128)).astype(np.float32)
    want = exe.run({"x": np.ascontiguousarray(x[:, ::2])})["y"]
    np.testing.assert_array_equal(exe.run({"x": x[:, ::2]})["y"], want)
    frozen = np.ascontiguousarray(x[:, ::2])
    frozen.flags.writeable = False
    np.testing.assert_array_equal(exe.run({"x": frozen})["y"], want)


def _property_text(value) -> str:
    """OpenVINO property values as comparable text: ``f32``, ``ACCURACY``, ``0``."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    return str(getattr(value, "name", value))


class TestPrecisionProperties:
    """Every OpenVINO default that lowers precision is turned off unless reduced precision is allowed."""

    def test_device_lists_which_it_has(self, cpu):
        from hal_openvino.backend import EXACT_PRECISION

        supported = hal.plugin.backend("openvino").core().get_property("CPU", "SUPPORTED_PROPERTIES")
        listed = dict(cpu.details)["precision_properties"].split(",")
        assert listed == [key for key in EXACT_PRECISION if key in supported]
        assert {"INFERENCE_PRECISION_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE"} <= set(listed)

    def test_exact_by_default_as_the_compiled_model_reports(self, cpu):
        from hal_openvino.backend import exact_precision

        compiled = hal.compile(mlp()).to("openvino:CPU", strict=True).runner.compiled
        wanted = exact_precision(cpu)
        assert wanted["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0
        for key, value in wanted.items():
            assert _property_text(compiled.get_property(key)) == str(value), key
        assert compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0

    def test_reduced_precision_leaves_openvinos_defaults(self, cpu, caplog):
        from hal_openvino.backend import exact_precision

        core = hal.plugin.backend("openvino").core()
        with caplog.at_level("INFO", logger="hal_openvino"):
            exe = hal.compile(mlp()).to("openvino:CPU", strict=True, verify=False, reduced_precision=True)
        for key in exact_precision(cpu):
            default = core.get_property("CPU", key)
            assert _property_text(exe.runner.compiled.get_property(key)) == _property_text(default), key
        assert f"computes floating point in {exe.runner.inference_precision}" in caplog.text

    @pytest.mark.parametrize(
        ("key", "value"),
        [("INFERENCE_PRECISION_HINT", "bf16"), ("DYNAMIC_QUANTIZATION_GROUP_SIZE", 32), ("KV_CACHE_PRECISION", "u8"),
         ("EXECUTION_MODE_HINT", "PERFORMANCE")],
    )
    def test_config_may_not_lower_them_without_reduced_precision(self, key, value):
        with pytest.raises(CompileError, match=f"{key}.*reduced_precision"):
            hal.compile(mlp()).to("openvino:CPU", strict=True, config={key: value})
        exe = hal.compile(mlp()).to("openvino:CPU", strict=True, verify=False, reduced_precision=True, config={key: value})
        # What OpenVINO makes of the value on this CPU (it ignores bf16 without BF16 hardware).
        core = hal.plugin.backend("openvino").core()
        direct = core.compile_model(core.read_model(mlp().SerializeToString(), b""), "CPU", {key: value})
        assert _property_text(exe.runner.compiled.get_property(key)) == _property_text(direct.get_property(key))

    def test_config_may_repeat_the_exact_value(self):
        exe = hal.compile(mlp()).to("openvino:CPU", strict=True, config={"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
        assert exe.runner.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0


def test_f32_is_honoured_and_bf16_only_on_request(cpu):
    """On a CPU with BF16 (AMX / avx512_bf16) OpenVINO would compute this in bf16 by default."""
    compiled = hal.compile(long_dot())
    x = np.ones((1, 1024), np.float32)
    want = compiled.to("ort:cpu").run({"x": x})["y"]
    exact = compiled.to("openvino:CPU").run({"x": x})["y"]
    np.testing.assert_allclose(exact, want, rtol=1e-6)
    # verify=False: placement's check would refuse bf16 answers, which is what this test shows.
    reduced_exe = compiled.to("openvino:CPU", reduced_precision=True, strict=True, verify=False)
    if reduced_exe.runner.inference_precision == "f32":
        # What OpenVINO chose, not a guess from OPTIMIZATION_CAPABILITIES (AVX2-VNNI-2 CPUs list BF16
        # but compute f32 by default).
        pytest.skip(f"OpenVINO keeps f32 on {cpu.name} even with reduced precision (no AVX-512 BF16 / AMX)")
    reduced = reduced_exe.run({"x": x})["y"]
    assert abs(float(reduced[0, 0]) - float(want[0, 0])) / float(want[0, 0]) > 1e-4, (reduced, want)


def test_precision_hint_in_config_needs_reduced_precision():
    with pytest.raises(CompileError, match="reduced_precision"):
        hal.compile(mlp()).to("openvino:CPU", strict=True, config={"INFERENCE_PRECISION_HINT": "bf16"})
    exe = hal.compile(mlp()).to("openvino:CPU", reduced_precision=True, config={"INFERENCE_PRECISION_HINT": "f32"})
    assert exe.run({"x": np.zeros((1, 64), np.float32)})["y"].shape == (1, 64)


def test_model_cache_is_populated(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    hal.compile(conv()).to("openvino:CPU")
    blobs = list((tmp_path / "cache" / "backends" / "openvino").iterdir())
    assert blobs, "OpenVINO wrote nothing to its CACHE_DIR"
    again = hal.compile(conv()).to("openvino:CPU")  # loads from the cache
    assert again.run({"x": np.zeros((1, 3, 16, 16), np.float32)})["y"].shape == (1, 8, 1, 1)


def test_warm_compile_loads_the_blob_without_reading_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    backend = hal.plugin.backend("openvino")
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    compiles, hits = backend.compile_count, backend.cache_hits
    cold = hal.compile(conv()).to("openvino:CPU", strict=True)
    assert (backend.compile_count, backend.cache_hits) == (compiles + 1, hits)
    assert list((tmp_path / "cache" / "backends" / "openvino").glob("*.blob")), "CACHE_DIR is not in HAL_CACHE_DIR"
    core = backend.core()

    class NoReading:  # what a fresh process has on a warm cache: a Core that must not parse the model
        def read_model(self, *args, **kwargs):
            raise AssertionError("a warm compile read the model")

        def __getattr__(self, name):
            return getattr(core, name)

    monkeypatch.setattr(backend, "_core", NoReading())
    warm = hal.compile(conv()).to("openvino:CPU", strict=True)
    assert (backend.compile_count, backend.cache_hits) == (compiles + 1, hits + 1)
    assert warm.runner.compiled.get_property("LOADED_FROM_CACHE")
    np.testing.assert_array_equal(warm.run({"x": x})["y"], cold.run({"x": x})["y"])


def test_damaged_model_file_is_written_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "backends" / "openvino"
    compiled = hal.compile(conv())
    compiled.to("openvino:CPU", strict=True)
    (model_file,) = (cache / "models").glob("*.onnx")
    assert model_file.read_bytes() == compiled.model.serialized
    for blob in cache.glob("*.blob"):
        blob.unlink()
    model_file.write_bytes(model_file.read_bytes()[:100])
    exe = hal.compile(conv()).to("openvino:CPU", strict=True)  # compiled from memory instead
    assert not model_file.exists()
    assert exe.run({"x": np.zeros((1, 3, 16, 16), np.float32)})["y"].shape == (1, 8, 1, 1)
    hal.compile(conv()).to("openvino:CPU", strict=True)
    assert model_file.read_bytes() == compiled.model.serialized


def test_unsupported_operator_raises_compile_error(cpu):
    model = make(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [vi("x", TensorProto.FLOAT8E4M3FN, [4])],
        [vi("y", TensorProto.FLOAT8E4M3FN, [4])],
    )
    with pytest.raises(CompileError, match=r"openvino:CPU.*unsupported src_prc: f8e4m3"):
        hal.plugin.backend("openvino").prepare(LoweredModel.from_proto(model), cpu, CompileOptions())


def test_unreadable_model_raises_compile_error():
    # A well-formed ONNX model using a type OpenVINO's frontend does not know (FNUZ fp8).
    model = make(
        [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT8E4M3FNUZ), helper.make_node("Cast", ["c"], ["y"], to=1)],
        [vi("x", TensorProto.FLOAT, [4])],
        [vi("y", TensorProto.FLOAT, [4])],
    )
    with pytest.raises(CompileError, match="openvino:CPU") as info:
        hal.compile(model).to("openvino:CPU", strict=True)
    assert "Exception from" not in str(info.value)


def test_cast_to_int4_is_refused_before_openvino_sees_it():
    model = make(
        [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT4), helper.make_node("Cast", ["c"], ["y"], to=1)],
        [vi("x", TensorProto.FLOAT, [4])],
        [vi("y", TensorProto.FLOAT, [4])],
    )
    with pytest.raises(CompileError, match="Cast to int4"):
        hal.compile(model).to("openvino:CPU", strict=True)


def test_bad_feeds_raise_input_error():
    exe = hal.compile(mlp()).to("openvino:CPU")
    with pytest.raises(InputError, match="element type"):
        exe.run({"x": np.zeros((2, 64), np.float64)})
    with pytest.raises(InputError, match="shape"):
        exe.run({"x": np.zeros((2, 63), np.float32)})
    with pytest.raises(InputError, match="missing"):
        exe.run({})


def test_an_openvino_that_cannot_start_lists_one_unavailable_device():
    """The convention every backend keeps: nothing seen, one device (the one users name), unavailable."""
    from hal_openvino.backend import OpenVinoBackend

    class Broken:
        @property
        def available_devices(self):
            raise RuntimeError("Exception from src/inference/src/core.cpp:1:\nplugins.xml is missing")

    backend = OpenVinoBackend()
    backend._core = Broken()
    (device,) = backend.discover()
    assert (device.id, device.available) == ("openvino:CPU", False)
    assert "plugins.xml is missing" in device.reason and "Exception from" not in device.reason


def test_prepare_finds_the_device_by_its_handle(cpu):
    """Device records read back from JSON carry no handle: prepare says so instead of guessing."""
    from hal.plugin import Device, LoweredModel

    assert cpu.handle.name == "CPU" and "FP32" in cpu.handle.optimization
    with pytest.raises(CompileError, match="no OpenVinoDevice handle"):
        hal.plugin.backend("openvino").prepare(LoweredModel.from_proto(mlp()), Device.from_dict(cpu.to_dict()), CompileOptions())
