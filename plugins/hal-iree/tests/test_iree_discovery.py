"""Discovery: iree:local-task is available here; GPU drivers are listed with a reason when not."""

from __future__ import annotations

import subprocess
import sys

import hal
from hal.plugin import DeviceKind


def _iree_devices() -> dict[str, hal.Device]:
    return {d.id: d for d in hal.devices() if d.backend == "iree"}


def test_local_task_is_available() -> None:
    devices = _iree_devices()
    cpu = devices["iree:local-task"]
    assert cpu.available, cpu.reason
    assert cpu.kind is DeviceKind.CPU
    assert cpu.capabilities.support("float32").value == "native"


def test_gpu_drivers_are_listed_with_a_short_reason_when_unavailable() -> None:
    devices = _iree_devices()
    for name in ("cuda", "hip", "vulkan"):
        device = devices[f"iree:{name}"]
        assert device.kind is DeviceKind.GPU
        if not device.available:
            assert device.reason
            assert "\n" not in device.reason and len(device.reason) < 200, device.reason
            assert "install" in device.reason  # says what to do
            assert ".c:" not in device.reason  # no runtime source locations


def test_plugin_import_does_not_import_iree() -> None:
    code = "import sys, hal_iree; print(any(m.startswith('iree') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version_names_compiler_and_runtime() -> None:
    from iree_helpers import iree_backend

    version = iree_backend().version
    assert "compiler" in version and "runtime" in version


def test_an_available_cuda_device_names_its_gpu_target() -> None:
    """Where a GPU is present (on a lent H200: sm_90), iree:cuda compiles for it, not for IREE's
    default target (which does not load on Hopper); elsewhere the driver library is absent."""
    from hal_iree.backend import cuda_compute_capability, iree_cuda_target

    device = _iree_devices()["iree:cuda"]
    if not device.available:
        return
    capability = cuda_compute_capability()
    assert capability is not None
    details = dict(device.details)
    assert details["compute_capability"] == f"{capability[0]}.{capability[1]}"
    assert details["gpu_target"] == iree_cuda_target(capability)


def test_the_target_is_the_newest_iree_knows_at_or_below_the_gpu() -> None:
    from hal_iree.backend import iree_cuda_target

    assert iree_cuda_target((8, 0)) == "sm_80"  # A100: its own
    assert iree_cuda_target((9, 0)) == "sm_89"  # H100/H200: IREE 3.13 has no sm_90
    assert iree_cuda_target((10, 0)) == "sm_89"  # B200: no sm_100 either
    assert iree_cuda_target((12, 0)) == "sm_120"
    assert iree_cuda_target((5, 2)) is None  # older than anything IREE targets


def test_cuda_flags_take_the_gpus_target_and_an_explicit_one_wins() -> None:
    from iree_helpers import iree_backend

    from hal.plugin import CompileOptions

    backend = iree_backend()
    # The record discovery builds for a cuda GPU with compute capability 9.0 (what an H200 reports).
    gpu = backend._device("cuda", "cuda", DeviceKind.GPU, "NVIDIA", True, None, {"driver": "cuda", "gpu_target": "sm_90"})  # noqa: SLF001
    assert "--iree-cuda-target=sm_90" in backend.compile_flags(gpu, CompileOptions())
    flags = backend.compile_flags(gpu, CompileOptions(extra={"iree_gpu_target": "sm_80"}))
    assert "--iree-cuda-target=sm_80" in flags and "--iree-cuda-target=sm_90" not in flags
    unknown = backend._device("cuda", "cuda", DeviceKind.GPU, "NVIDIA", True, None, {"driver": "cuda"})  # noqa: SLF001
    assert not any(f.startswith("--iree-cuda-target") for f in backend.compile_flags(unknown, CompileOptions()))


def test_a_runtime_only_install_refuses_to_compile_with_a_fix(monkeypatch) -> None:
    """iree-base-runtime without iree-base-compiler runs cached vmfbs; a compile is a CompileError."""
    import importlib.util

    import pytest

    from hal.errors import CompileError
    from hal_iree import _compile

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setitem(sys.modules, "iree.compiler", None)  # makes the import fail
    _compile.compiler_version.cache_clear()  # the version is read once per process
    try:
        with pytest.raises(CompileError, match="pip install iree-base-compiler"):
            _compile.compiler_version()
    finally:
        monkeypatch.undo()
        _compile.compiler_version.cache_clear()


def test_the_target_table_matches_the_installed_compiler() -> None:
    """Every target the table lists compiles a one-op module, and sm_90 does not (when a newer
    iree-compile learns it, the table should take it, and this says so)."""
    import pytest

    compiler = pytest.importorskip("iree.compiler")
    from hal_iree.backend import _IREE_CUDA_TARGETS

    source = (
        "func.func @main(%a: tensor<4xf32>, %b: tensor<4xf32>) -> tensor<4xf32> {\n"
        "  %0 = arith.addf %a, %b : tensor<4xf32>\n  return %0 : tensor<4xf32>\n}\n"
    )

    def compiles(target: int) -> bool:
        try:
            compiler.compile_str(
                source, target_backends=["cuda"], input_type="auto",
                extra_args=[f"--iree-cuda-target=sm_{target}"],
            )
        except Exception:  # noqa: BLE001 - CompilerToolError, whatever the version raises
            return False
        return True

    assert [t for t in _IREE_CUDA_TARGETS if not compiles(t)] == []
    assert not compiles(90), "this iree-compile knows sm_90: add it to _IREE_CUDA_TARGETS"
