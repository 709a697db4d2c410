"""Discovery: iree:local-task is available here; GPU drivers are listed with a reason when not."""

from __future__ import annotations

import subprocess
import sys

import hal
from hal.capabilities import DeviceKind


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
    from conftest import iree_backend

    version = iree_backend().version
    assert "compiler" in version and "runtime" in version
