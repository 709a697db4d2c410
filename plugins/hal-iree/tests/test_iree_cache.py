"""The vmfb cache: a second prepare skips iree-compile; a damaged entry is rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import feeds_for, iree_backend, mlp_model, to_strict

import hal

DEVICE = "iree:local-task"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path))
    return tmp_path / "backends" / "iree"


def test_second_prepare_hits_the_cache(cache_dir: Path) -> None:
    backend = iree_backend()
    compiled = hal.compile(mlp_model(batch=2))
    before = backend.compile_count, backend.cache_hits
    first = to_strict(compiled, DEVICE)
    assert backend.compile_count == before[0] + 1
    vmfbs = list(cache_dir.glob("*.vmfb"))
    assert len(vmfbs) == 1 and vmfbs[0].with_suffix(".json").exists()
    second = to_strict(compiled, DEVICE)
    assert backend.compile_count == before[0] + 1  # iree-compile not invoked again
    assert backend.cache_hits == before[1] + 1
    feeds = feeds_for(compiled)
    np.testing.assert_array_equal(first.run(feeds)["y"], second.run(feeds)["y"])
    # Different compiler flags are a different entry.
    to_strict(compiled, DEVICE, iree_opt_level=1)
    assert backend.compile_count == before[0] + 2
    assert len(list(cache_dir.glob("*.vmfb"))) == 2
    assert not list(cache_dir.glob(".*.tmp"))  # no temp files left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing-meta"])
def test_damaged_vmfb_is_rebuilt(cache_dir: Path, damage: str) -> None:
    backend = iree_backend()
    compiled = hal.compile(mlp_model(batch=2))
    feeds = feeds_for(compiled)
    want = compiled.to("ort:cpu").run(feeds)["y"]
    to_strict(compiled, DEVICE)
    (vmfb,) = cache_dir.glob("*.vmfb")
    data = vmfb.read_bytes()
    if damage == "truncate":
        vmfb.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        vmfb.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])
    else:
        vmfb.with_suffix(".json").unlink()
    count = backend.compile_count
    exe = to_strict(compiled, DEVICE)
    assert backend.compile_count == count + 1
    np.testing.assert_allclose(exe.run(feeds)["y"], want, rtol=1e-4, atol=1e-4)
    meta = json.loads(vmfb.with_suffix(".json").read_text())
    assert meta["size"] == vmfb.stat().st_size
    count = backend.compile_count
    to_strict(compiled, DEVICE)  # the rebuilt entry is good again
    assert backend.compile_count == count


_WARM_CHILD = """
import sys, hal
from hal._plugins import registry
exe = hal.compile(sys.argv[1]).to("iree:local-task", strict=True)
backend = registry().backend("iree")
print(backend.compile_count, backend.cache_hits, "iree.compiler" in sys.modules)
"""


def test_a_warm_process_neither_compiles_nor_loads_the_compiler(tmp_path: Path) -> None:
    onnx.save(mlp_model(batch=3), tmp_path / "mlp.onnx")
    env = dict(os.environ, HAL_CACHE_DIR=str(tmp_path / "cache"), HAL_LOAD_PLUGINS="iree")
    cmd = [sys.executable, "-c", _WARM_CHILD, str(tmp_path / "mlp.onnx")]
    cold, warm = (subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split() for _ in "12")
    assert cold == ["1", "0", "True"]
    assert warm == ["0", "1", "False"]  # the vmfb came from the cache; iree.compiler was never imported


def test_compiler_version_matches_the_compiler_package() -> None:
    from hal_iree._compile import compiler_version
    from iree.compiler import version

    revision = version.REVISIONS.get("IREE", "")[:12]
    assert compiler_version() == (f"{version.VERSION}@{revision}" if revision else version.VERSION)
