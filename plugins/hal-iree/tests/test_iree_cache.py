"""The vmfb cache: a second prepare skips iree-compile; a damaged or foreign vmfb is rebuilt with a
WARNING; a cache that cannot be written is skipped with a WARNING."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from iree_helpers import feeds_for, iree_backend, mlp_model, to_strict

import hal
from hal.plugin import Artifact

DEVICE = "iree:local-task"


def _record(vmfb: Path) -> Path:
    """The record next to a vmfb, which hal-iree names by its cache key."""
    return Artifact(vmfb, vmfb.stem).record


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
    assert len(vmfbs) == 1 and _record(vmfbs[0]).exists()
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


def _answer(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "another-model", "another-model-and-record", "missing-meta"])
def test_damaged_vmfb_is_rebuilt(cache_dir: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    backend = iree_backend()
    model = mlp_model(batch=2)
    compiled = hal.compile(model)
    feeds = feeds_for(compiled)
    want = _answer(model, feeds)
    to_strict(compiled, DEVICE, verify=False)
    (vmfb,) = cache_dir.glob("*.vmfb")
    data = vmfb.read_bytes()
    if damage == "truncate":
        vmfb.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        vmfb.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])  # same size
    elif damage.startswith("another-model"):  # what another model's compile left, copied over this one
        to_strict(hal.compile(mlp_model(batch=3)), DEVICE, verify=False)
        (other,) = (p for p in cache_dir.glob("*.vmfb") if p != vmfb)
        vmfb.write_bytes(other.read_bytes())
        if damage.endswith("record"):
            _record(vmfb).write_bytes(_record(other).read_bytes())
    else:
        _record(vmfb).unlink()
    count = backend.compile_count
    with caplog.at_level(logging.WARNING):
        exe = to_strict(compiled, DEVICE, verify=False)
    assert backend.compile_count == count + 1
    np.testing.assert_allclose(exe.run(feeds)["y"], want, rtol=1e-4, atol=1e-4)
    named = [r for r in caplog.records if r.levelno == logging.WARNING and vmfb.name in r.getMessage()]
    assert len(named) == (0 if damage == "missing-meta" else 1)  # a file without a record is an INFO
    meta = json.loads(_record(vmfb).read_text())
    assert meta["size"] == vmfb.stat().st_size and meta["key"] == vmfb.stem
    count = backend.compile_count
    to_strict(compiled, DEVICE, verify=False)  # the rebuilt entry is good again
    assert backend.compile_count == count


@pytest.mark.parametrize("where", ["names-a-file", "under-a-file", "read-only"])
def test_an_unwritable_cache_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture, where: str) -> None:
    """HAL_CACHE_DIR through a regular file (mkdir raises NotADirectoryError), or a read-only
    directory: chmod 0555, or as root (who writes through mode bits) os.access(W_OK) saying no
    for it, as the kernel says to other users."""
    (tmp_path / "file").write_text("not a directory")
    root = {"names-a-file": tmp_path / "file", "under-a-file": tmp_path / "file" / "c"}.get(where, tmp_path / "ro")
    monkeypatch.setenv("HAL_CACHE_DIR", str(root))
    if where == "read-only":
        (root / "backends" / "iree").mkdir(parents=True)
        if os.geteuid() == 0:
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if m & os.W_OK and str(root) in str(p)
                                else real_access(p, m, *a, **k))
        else:
            (root / "backends" / "iree").chmod(0o555)
    model = mlp_model(batch=2)
    compiled = hal.compile(model)
    feeds = feeds_for(compiled)
    with caplog.at_level(logging.WARNING):
        exe = to_strict(compiled, DEVICE, verify=False)
    (root / "backends" / "iree").exists() and (root / "backends" / "iree").chmod(0o755)
    np.testing.assert_allclose(exe.run(feeds)["y"], _answer(model, feeds), rtol=1e-4, atol=1e-4)
    error = "PermissionError" if where == "read-only" else "NotADirectoryError"
    assert any("compile cache skipped" in r.getMessage() and "backends/iree" in r.getMessage()
               and error in r.getMessage() for r in caplog.records)


_FULL_DISK_CHILD = """
import json, logging, resource, signal, sys
import numpy as np, hal
import hal_iree._compile as steps

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
full = (0, resource.RLIM_INFINITY)
resource.setrlimit(resource.RLIMIT_FSIZE, full)
build_vmfb = steps.build_vmfb

def compile_with_scratch_space(*args, **kwargs):  # the compiler's temporary files are on another disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    try:
        return build_vmfb(*args, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, full)

steps.build_vmfb = compile_with_scratch_space
logging.basicConfig(level=logging.WARNING)
exe = hal.compile(sys.argv[1]).to("iree:local-task", strict=True)
print(json.dumps(exe.run({"x": np.load(sys.argv[2])})["y"].tolist()))
"""


def test_a_full_disk_is_skipped(tmp_path: Path) -> None:
    """The cache's disk is full: in a child, every write fails with EFBIG (RLIMIT_FSIZE 0) except
    those of the compile itself (its temporary directory, iree-compile's scratch files)."""
    model = mlp_model(batch=2)
    onnx.save(model, tmp_path / "m.onnx")
    feeds = feeds_for(hal.compile(model))
    np.save(tmp_path / "x.npy", feeds["x"])
    env = dict(os.environ, HAL_CACHE_DIR=str(tmp_path / "cache"), HAL_LOAD_PLUGINS="iree", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    got = np.array(json.loads(proc.stdout.splitlines()[-1]), np.float32)
    np.testing.assert_allclose(got, _answer(model, feeds), rtol=1e-4, atol=1e-4)
    assert "compile cache skipped" in proc.stderr and "File too large" in proc.stderr
    assert "backends/iree" in proc.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size]


_WARM_CHILD = """
import sys, hal, hal.plugin
exe = hal.compile(sys.argv[1]).to("iree:local-task", strict=True)
backend = hal.plugin.backend("iree")
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
