"""The examples a newcomer starts from keep working."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

import hal

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_on_every_available_device():
    # Same environment (HAL_LOAD_PLUGINS included, set or not) so both processes see the same plugins.
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    available = [d.id for d in hal.devices() if d.available]
    for device in available:
        assert f"{device} " in result.stdout
    assert "differs" not in result.stdout


def test_example_plugin_registers_a_device_that_runs(fresh_registry, linear_model):
    spec = importlib.util.spec_from_file_location("hal_example", ROOT / "examples" / "plugin" / "hal_example" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reg = fresh_registry()
    reg.add_plugin(module, name="example")
    try:
        assert "example:reference" in [d.id for d in hal.devices()]
        x = np.ones((2, 8), np.float32)
        compiled = hal.compile(linear_model)
        np.testing.assert_allclose(compiled.to("example:reference").run({"x": x})["y"],
                                   compiled.to("ort:cpu").run({"x": x})["y"], rtol=1e-5)
    finally:
        reg.remove_plugin("example")


def test_example_plugin_declares_its_entry_point():
    text = (ROOT / "examples" / "plugin" / "setup.cfg").read_text()
    assert "[options.entry_points]" in text and "example = hal_example" in text


def test_fp8_example_runs_with_the_core_alone():
    """examples/fp8.py with no plugin loaded: ort:cpu alone, within the reported error, and how to
    get the other devices."""
    import os

    env = {**os.environ, "HAL_LOAD_PLUGINS": ""}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "fp8.py")], capture_output=True, text=True,
                            timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr
    sections = result.stdout.strip().split("\n\n")
    assert "end to end on ort:cpu" in sections[0]  # the accuracy report
    assert sections[1].startswith("ort:cpu: ") and "within it" in sections[1]
    assert sections[2].startswith("not here: ") and "pip install -e plugins/hal-sim" in sections[2]
