"""Tests of the ``cuda`` backend (hal-nvidia).

The test machines have no NVIDIA GPU and no driver. Tests marked "mocked NVML" answer NVML's calls
with :mod:`fake_nvml` because we cannot have an H100, A100 or B200 here: they check what the
plugin makes of what NVML would say, not the hardware. The no-driver path and onnxruntime-gpu's
behaviour without CUDA libraries are real: they run against the installed pynvml and
onnxruntime-gpu. ``test_runs_on_a_real_gpu`` runs only where a GPU and CUDA are present.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys

import fake_nvml
import numpy as np
import onnx
import pytest
from attrs import evolve
from fake_nvml import A100, B200, H100, L4, FakeGpu, make_nvml
from hal_nvidia.backend import NO_GPU_ID, CudaBackend, provider_library_problem
from hal_nvidia.chips import NVLINK_LINK_GBPS, find_chip, nvlink_generation
from onnx import TensorProto, helper

import hal
from hal.errors import CompileError, HalError, UnavailableDeviceError
from hal.plugin import (
    CompileOptions, Device, E8M0Encoding, InterconnectKind, LoweredModel, NumberFormat, ScaledFormat, Support,
    reload_plugins, runtime_limits,
)

F = NumberFormat


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def _add_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _discover(*gpus: FakeGpu, **kwargs: object) -> list[Device]:
    return CudaBackend(nvml=make_nvml(gpus, **kwargs)).discover()  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_visible_devices_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# -- mocked NVML: what the plugin makes of each chip ------------------------------------------------


def test_h100_mocked_nvml() -> None:
    """Mocked NVML (no H100 here): cc 9.0 -> FP8 E4M3/E5M2 native, no MX, NVLink 4 x 18 = 900 GB/s."""
    (dev,) = _discover(H100)
    caps = dev.capabilities
    assert (dev.id, dev.name, dev.kind.value, dev.vendor) == ("cuda:0", "NVIDIA H100 80GB HBM3", "gpu", "NVIDIA")
    assert caps.support(F.FLOAT8_E4M3FN) is Support.NATIVE
    assert caps.support(F.FLOAT8_E5M2) is Support.NATIVE
    assert caps.support(F.FLOAT8_E4M3FNUZ) is Support.STORAGE
    assert caps.support(F.FLOAT8_E5M2FNUZ) is Support.STORAGE
    assert caps.support(F.BFLOAT16) is Support.NATIVE
    assert caps.support(F.FLOAT16) is Support.NATIVE
    assert caps.support(F.FLOAT8_E8M0) is Support.STORAGE
    assert caps.support(F.FLOAT4_E2M1) is Support.STORAGE
    assert caps.e8m0_encoding is None
    # onnxruntime-gpu's loader limits narrow the table (1.31 reads at most IR 13).
    assert caps.opsets.max_ir_version == runtime_limits().max_ir_version
    assert not [s for s in caps.scaled if s.scale is F.FLOAT8_E8M0]
    assert ScaledFormat("float8_e4m3fn", "float32", (128, 128), Support.EMULATED) in caps.scaled
    assert caps.interconnect.kind is InterconnectKind.NVLINK
    assert caps.interconnect.links == 18
    assert caps.interconnect.bandwidth_gbps == 900
    assert caps.memory.capacity_bytes == 81559 * 2**20
    assert caps.memory.bandwidth_gbps == 3350
    assert caps.peak(F.FLOAT8_E4M3FN) == 1979
    assert caps.peak(F.BFLOAT16) == 989
    assert dict(dev.details)["compute_capability"] == "9.0"
    assert dict(dev.details)["nvlink_generation"] == "4"


def test_b200_mocked_nvml() -> None:
    """Mocked NVML (no B200 here): cc 10.0 -> MX block scales with OCP E8M0, FP4/FP6, NVLink 5."""
    (dev,) = _discover(B200)
    caps = dev.capabilities
    assert caps.e8m0_encoding is E8M0Encoding.OCP
    assert caps.support(F.FLOAT8_E8M0) is Support.NATIVE
    assert caps.support(F.FLOAT4_E2M1) is Support.NATIVE
    assert caps.support(F.FLOAT6_E2M3) is Support.NATIVE
    assert caps.support(F.FLOAT8_E4M3FNUZ) is Support.STORAGE
    for element in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1"):
        assert ScaledFormat(element, "float8_e8m0", (1, 32), Support.NATIVE) in caps.scaled
    assert ScaledFormat("float4_e2m1", "float8_e4m3fn", (1, 16), Support.NATIVE) in caps.scaled
    assert caps.interconnect.bandwidth_gbps == 1800
    assert caps.peak(F.FLOAT8_E4M3FN) == 4500
    assert caps.peak(F.BFLOAT16) == 2250


def test_a100_mocked_nvml() -> None:
    """Mocked NVML (no A100 here): cc 8.0 -> bf16 native, FP8 storage only, NVLink 3 x 12 = 600 GB/s."""
    (dev,) = _discover(A100)
    caps = dev.capabilities
    assert caps.support(F.BFLOAT16) is Support.NATIVE
    assert caps.support(F.FLOAT8_E4M3FN) is Support.STORAGE
    assert caps.support(F.FLOAT8_E5M2) is Support.STORAGE
    assert caps.scaled == ()
    assert caps.e8m0_encoding is None
    assert (caps.interconnect.links, caps.interconnect.bandwidth_gbps) == (12, 600)
    assert caps.peak(F.BFLOAT16) == 312
    assert caps.peak(F.FLOAT8_E4M3FN) is None


@pytest.mark.parametrize(
    ("cc", "fp16", "bf16", "fp8"),
    [
        ((6, 1), Support.EMULATED, Support.EMULATED, Support.STORAGE),
        ((7, 0), Support.NATIVE, Support.EMULATED, Support.STORAGE),
        ((7, 5), Support.NATIVE, Support.EMULATED, Support.STORAGE),
        ((8, 6), Support.NATIVE, Support.NATIVE, Support.STORAGE),
        ((8, 9), Support.NATIVE, Support.NATIVE, Support.NATIVE),
        ((12, 0), Support.NATIVE, Support.NATIVE, Support.NATIVE),
    ],
)
def test_compute_capability_thresholds(cc: tuple[int, int], fp16: Support, bf16: Support, fp8: Support) -> None:
    """Mocked NVML: the format thresholds 7.0 (fp16), 8.0 (bf16), 8.9 (FP8), 10.0 (MX) by cc alone."""
    (dev,) = _discover(FakeGpu("NVIDIA Some GPU", cc, 8 * 2**30))
    caps = dev.capabilities
    assert caps.support(F.FLOAT16) is fp16
    assert caps.support(F.BFLOAT16) is bf16
    assert caps.support(F.FLOAT8_E4M3FN) is fp8
    assert (caps.e8m0_encoding is E8M0Encoding.OCP) == (cc >= (10, 0))
    assert caps.peak_tflops == ()  # not in the chip table: no guessed figures
    assert caps.memory.bandwidth_gbps is None


def test_gpu_without_nvlink_is_pcie() -> None:
    """Mocked NVML (an L4, cc 8.9, has no NVLink: NVML answers NOT_SUPPORTED for link 0)."""
    (dev,) = _discover(L4)
    assert dev.capabilities.interconnect.kind is InterconnectKind.PCIE
    assert dev.capabilities.interconnect.links is None
    assert dev.capabilities.support(F.FLOAT8_E4M3FN) is Support.NATIVE


def test_down_links_are_not_counted() -> None:
    """Mocked NVML: links NVML reports as disabled do not add bandwidth."""
    gpu = FakeGpu("NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30, nvlinks=16, down_links=2, nvlink_version=6)
    (dev,) = _discover(gpu)
    assert (dev.capabilities.interconnect.links, dev.capabilities.interconnect.bandwidth_gbps) == (16, 800)


def test_nvlink_peers_and_ordinals() -> None:
    """Mocked NVML: two H100s linked to each other see each other as peers by CUDA id."""
    a = FakeGpu(H100.name, (9, 0), 80 * 2**30, nvlinks=18, nvlink_version=6, uuid="GPU-aaaa", peers=[1])
    b = FakeGpu(H100.name, (9, 0), 80 * 2**30, nvlinks=18, nvlink_version=6, uuid="GPU-bbbb", peers=[0])
    devs = _discover(a, b)
    assert [d.id for d in devs] == ["cuda:0", "cuda:1"]
    assert devs[0].capabilities.interconnect.peers == ("cuda:1",)
    assert devs[1].capabilities.interconnect.peers == ("cuda:0",)


def test_cuda_visible_devices_renumbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mocked NVML: NVML ignores CUDA_VISIBLE_DEVICES, CUDA does not; ids follow CUDA's numbering."""
    a = FakeGpu("NVIDIA A100-SXM4-80GB", (8, 0), 80 * 2**30, uuid="GPU-aaaa")
    b = FakeGpu("NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30, uuid="GPU-bbbb")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    (dev,) = _discover(a, b)
    assert (dev.id, dev.name, dict(dev.details)["nvml_index"]) == ("cuda:0", b.name, "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert [d.name for d in _discover(a, b)] == [b.name, a.name]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (dev,) = _discover(a, b)
    assert dev.id == NO_GPU_ID and not dev.available and "CUDA_VISIBLE_DEVICES" in (dev.reason or "")


def test_nvml_is_shut_down_after_discovery() -> None:
    """Mocked NVML: every nvmlInit is matched by nvmlShutdown, so discovery leaks no NVML handle."""
    nvml = make_nvml([H100])
    CudaBackend(nvml=nvml).discover()  # type: ignore[arg-type]
    assert nvml.state["initialised"] == 0


def test_capabilities_survive_json() -> None:
    """Mocked NVML: a B200's capabilities round-trip through JSON (the compile cache key)."""
    (dev,) = _discover(B200)
    assert Device.from_dict(dev.to_dict()) == dev


def test_chip_table_matching() -> None:
    """The chip table picks the SXM H100 and leaves the PCIe card (other figures) without a row."""
    assert find_chip("NVIDIA H100 80GB HBM3").model == "H100 SXM"  # type: ignore[union-attr]
    assert find_chip("NVIDIA H100 PCIe") is None
    assert find_chip("NVIDIA A100 80GB PCIe") is None
    assert find_chip("NVIDIA H800 PCIe") is None
    # NVML's name on a real H200 (read on a lent machine); not the H20, whose name it contains.
    assert find_chip("NVIDIA H200").model == "H200 SXM"  # type: ignore[union-attr]
    assert find_chip("NVIDIA H20").model == "H20"  # type: ignore[union-attr]
    assert find_chip("NVIDIA H200 NVL") is None  # the PCIe card's figures differ
    assert "secondary" in find_chip("NVIDIA H800").source  # type: ignore[union-attr]
    # nvmlDeviceGetNvLinkVersion answers the nvmlNvlinkVersion_t enum, not the generation
    assert [nvlink_generation(v) for v in (4, 5, 6, 7)] == [3, 3, 4, 5]
    assert NVLINK_LINK_GBPS[4] * 18 == 900


# -- no driver: mocked and real ------------------------------------------------------------------------


def test_nvml_library_missing_mocked() -> None:
    """Mocked NVML raising LIBRARY_NOT_FOUND, as pynvml does without a driver: one placeholder."""
    devs = _discover(init_error=fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert [(d.id, d.available) for d in devs] == [(NO_GPU_ID, False)]
    assert "driver" in (devs[0].reason or "")
    assert devs[0].capabilities.formats.at_least(Support.STORAGE) == ()  # claims nothing


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    (dev,) = CudaBackend().discover()
    assert dev.id == NO_GPU_ID and not dev.available
    assert "nvidia-ml-py" in (dev.reason or "")


@pytest.mark.skipif(_driver_present(), reason="an NVIDIA driver is installed: the no-driver path cannot be seen")
def test_no_driver_real() -> None:
    """Real pynvml on this machine (no libnvidia-ml.so.1): no fake GPU, one unavailable placeholder."""
    (dev,) = CudaBackend().discover()
    assert dev.id == NO_GPU_ID
    assert not dev.available
    assert "NVML Shared Library Not Found" in (dev.reason or "")
    assert "install the NVIDIA driver" in (dev.reason or "")


@pytest.mark.skipif(_driver_present(), reason="an NVIDIA driver is installed")
def test_compiling_for_the_placeholder_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real, through the public API: cuda:none is listed and compiling for it raises a HalError."""
    monkeypatch.setenv("HAL_LOAD_PLUGINS", "nvidia")
    reload_plugins()
    try:
        devices = {d.id: d for d in hal.devices()}
        assert NO_GPU_ID in devices and not devices[NO_GPU_ID].available
        with pytest.raises(UnavailableDeviceError, match="NVML"):
            hal.compile(_add_model()).to(NO_GPU_ID)
    finally:
        reload_plugins()


def test_prepare_refuses_an_unavailable_device() -> None:
    (dev,) = _discover(init_error=fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(UnavailableDeviceError) as info:
        CudaBackend().prepare(LoweredModel.from_proto(_add_model()), dev, CompileOptions())
    assert isinstance(info.value, HalError)


# -- onnxruntime-gpu, for real ---------------------------------------------------------------------------


def test_onnxruntime_is_the_gpu_build() -> None:
    """The environment has onnxruntime-gpu's module, not the CPU onnxruntime's (they share it)."""
    import onnxruntime as ort

    assert "CUDAExecutionProvider" in ort.get_available_providers()


def test_sessions_forbid_the_cpu() -> None:
    """Real onnxruntime: the session options forbid CPU fallback and the provider list has no CPU."""
    backend = CudaBackend()
    (dev,) = _discover(H100)
    so = backend.session_options(dev, CompileOptions())
    assert so.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    assert [p for p, _ in backend.providers(dev, CompileOptions())] == ["CUDAExecutionProvider"]
    trt = backend.providers(dev, CompileOptions(cache_dir="/tmp/x", extra={"provider": "tensorrt"}))
    assert [p for p, _ in trt] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert trt[0][1]["trt_engine_cache_path"] == "/tmp/x"
    with pytest.raises(CompileError, match="provider"):
        backend.providers(dev, CompileOptions(extra={"provider": "rocm"}))


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_missing_cuda_libraries_raise_not_run_on_cpu(provider: str) -> None:
    """Real onnxruntime-gpu without CUDA libraries: it lists CUDAExecutionProvider, fails to create
    it and would run on the CPU; the backend raises CompileError naming the missing library."""
    if provider_library_problem("CUDAExecutionProvider") is None:
        pytest.skip("CUDA libraries load here; covered by test_runs_on_a_real_gpu")
    (dev,) = _discover(H100)  # mocked NVML says there is a GPU; the runtime is real
    dev = evolve(dev, available=True, reason=None)
    with pytest.raises(CompileError) as info:
        CudaBackend().prepare(LoweredModel.from_proto(_add_model()), dev, CompileOptions(extra={"provider": provider}))
    assert "cannot open shared object file" in str(info.value)


def test_discovery_reports_missing_cuda_libraries() -> None:
    """Mocked NVML (a GPU) + real onnxruntime-gpu without CUDA: the GPU is listed, unavailable,
    with the loader's reason, so `hal devices` says so before anyone compiles."""
    problem = provider_library_problem("CUDAExecutionProvider")
    (dev,) = _discover(H100)
    assert dev.available is (problem is None)
    if problem is not None:
        assert "cannot open shared object file" in (dev.reason or "")


@pytest.mark.skipif(
    not _driver_present() or provider_library_problem("CUDAExecutionProvider") is not None,
    reason="needs an NVIDIA GPU with its driver and CUDA libraries",
)
def test_runs_on_a_real_gpu() -> None:
    """Real GPU only: the first device runs a model on CUDAExecutionProvider with correct output."""
    backend = CudaBackend()
    dev = backend.discover()[0]
    assert dev.available, dev.reason
    runner = backend.prepare(LoweredModel.from_proto(_add_model()), dev, CompileOptions())
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = runner.run({"x": x}, ["y"])
    np.testing.assert_array_equal(y, x + x)


def test_import_is_cheap() -> None:
    """Importing the plugin (and registering it) loads neither pynvml nor onnxruntime."""
    code = (
        "import sys, hal_nvidia; hal_nvidia.hal_register_backends(register=lambda b: None); "
        "bad = {'pynvml', 'onnxruntime'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nvml_failing_mid_listing_gives_a_placeholder() -> None:
    """Mocked NVML whose nvmlDeviceGetCount fails (e.g. a GPU fallen off the bus): a reason, no raise."""
    nvml = make_nvml([H100])

    def broken() -> int:
        raise fake_nvml.NVMLError(15)  # NVML_ERROR_GPU_IS_LOST

    nvml.nvmlDeviceGetCount = broken
    (dev,) = CudaBackend(nvml=nvml).discover()
    assert dev.id == NO_GPU_ID and "NVML failed while listing GPUs" in (dev.reason or "")
    assert nvml.state["initialised"] == 0
