"""Fixtures for hal-openvino's tests: a private HAL cache and the openvino:CPU device."""

from __future__ import annotations

import os

import pytest

# Load this plugin (and the built-in ORT CPU backend used as the reference) unless told otherwise.
os.environ.setdefault("HAL_LOAD_PLUGINS", "openvino")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test gets its own HAL cache so OpenVINO's model cache never leaks between tests."""
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "hal-cache"))


@pytest.fixture(scope="session")
def cpu():
    import hal

    devices = {d.id: d for d in hal.devices()}
    assert "openvino:CPU" in devices, f"openvino:CPU not discovered; devices: {sorted(devices)}"
    return devices["openvino:CPU"]
