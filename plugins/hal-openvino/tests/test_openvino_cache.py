"""OpenVINO's model file in the HAL cache (``backends/openvino/models/<sha256>.onnx``) is checked
before OpenVINO gets its path: a changed weight, a truncated file or another model's file is
removed with a WARNING and never compiled, and no blob OpenVINO compiled from a damaged file is
loaded again. A cache that cannot be written is skipped with a WARNING, never a failed compile."""

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
from onnx.reference import ReferenceEvaluator
from ov_models import mlp

import hal
import hal_openvino.backend as ov_backend
from hal.plugin import Artifact, backend

DEVICE = "openvino:CPU"
X = np.linspace(-2, 2, 4 * 64, dtype=np.float32).reshape(4, 64)


def answer(model: onnx.ModelProto) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, {"x": X})[0]


def run(model: onnx.ModelProto) -> np.ndarray:
    return hal.compile(model).to(DEVICE, strict=True, verify=False).run({"x": X})["y"]


def model_file(model: onnx.ModelProto) -> Path:
    cache = Path(os.environ["HAL_CACHE_DIR"]) / "backends" / "openvino"
    return cache / "models" / f"{hal.compile(model).digest}.onnx"


def damage(path: Path, how: str, other: onnx.ModelProto) -> None:
    """Damage the file as the issue did, then date it 5 s later, as a later edit would be: OpenVINO
    sees another size or time than its blob's and compiles whatever the file now holds."""
    data = path.read_bytes()
    if how == "weight":
        w0 = onnx.numpy_helper.to_array(onnx.load_from_string(data).graph.initializer[0])
        at = data.find(w0.tobytes())
        assert at >= 0
        data = data[:at] + np.float32(w0.flat[0] + 50).tobytes() + data[at + 4 :]  # same size
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = other.SerializeToString(deterministic=True)
    path.write_bytes(data)
    later = path.stat().st_mtime + 5
    os.utime(path, (later, later))


def ov_warnings(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and path.name in r.getMessage()]


@pytest.mark.parametrize("how", ["weight", "truncate", "another-model"])
def test_a_damaged_model_file_is_never_compiled(caplog, how):
    model, other = mlp(seed=0), mlp(seed=1)
    want = answer(model)
    np.testing.assert_allclose(run(model), want, rtol=1e-4, atol=1e-4)
    path = model_file(model)
    damage(path, how, other)
    with caplog.at_level(logging.WARNING):
        got = run(model)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    (message,) = ov_warnings(caplog, path)
    assert "removing it" in message
    assert not path.exists()  # removed; this compile read the model from memory
    np.testing.assert_allclose(run(model), want, rtol=1e-4, atol=1e-4)
    assert path.read_bytes() == hal.compile(model).model.serialized  # written again


def test_a_blob_compiled_from_a_damaged_file_is_not_loaded_again(monkeypatch, caplog):
    """A process that did not check the file (an older onnx-hal) compiled the damaged model, and
    OpenVINO kept that blob under the file's path with its size and time in whole seconds. When
    the HAL writes the file again with that size within that second, OpenVINO would take the blob:
    the damaged model's blob must be gone by then."""
    model = mlp(seed=0)
    want = answer(model)
    run(model)
    path = model_file(model)
    damage(path, "weight", model)
    damaged_time = path.stat().st_mtime_ns

    class Unchecked(Artifact):
        def check(self) -> bool:
            return True

    monkeypatch.setattr(ov_backend, "Artifact", Unchecked)
    assert not np.allclose(run(model), want, rtol=1e-4, atol=1e-4)  # OpenVINO compiled the damaged file
    assert backend("openvino").compile_count and list(path.parent.parent.glob("*.blob"))

    class SameSecond(Artifact):  # rewrites keep the damaged file's time
        def write(self, data, info=None) -> bool:
            written = super().write(data, info)
            os.utime(self.path, ns=(damaged_time, damaged_time))
            return written

    monkeypatch.setattr(ov_backend, "Artifact", SameSecond)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(run(model), want, rtol=1e-4, atol=1e-4)  # damage found, from memory
    assert ov_warnings(caplog, path)
    np.testing.assert_allclose(run(model), want, rtol=1e-4, atol=1e-4)  # file rewritten at the old time
    assert path.stat().st_mtime_ns == damaged_time and path.read_bytes() == hal.compile(model).model.serialized


@pytest.mark.parametrize("where", ["names-a-file", "under-a-file"])
def test_cache_dir_through_a_file(tmp_path, monkeypatch, caplog, where):
    (tmp_path / "file").write_text("not a directory")
    root = tmp_path / "file" if where == "names-a-file" else tmp_path / "file" / "cache"
    monkeypatch.setenv("HAL_CACHE_DIR", str(root))
    model = mlp(seed=0)
    with caplog.at_level(logging.WARNING):
        got = run(model)
    np.testing.assert_allclose(got, answer(model), rtol=1e-4, atol=1e-4)
    skipped = [r.getMessage() for r in caplog.records if "compile cache skipped" in r.getMessage()]
    assert any("backends/openvino" in m and "NotADirectoryError" in m for m in skipped)


def test_read_only_cache_dir(tmp_path, monkeypatch, caplog):
    """A filled cache made read-only. Root writes through mode bits, so as root this test denies
    writes where the kernel would for another user: os.access(W_OK) says no for the backend's
    directory (and then OpenVINO is given no CACHE_DIR at all). As another user, chmod 0555."""
    root = Path(os.environ["HAL_CACHE_DIR"])
    model = mlp(seed=0)
    run(model)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if m & os.W_OK and str(root) in str(p)
                            else real_access(p, m, *a, **k))
    else:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            got = run(model)
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    np.testing.assert_allclose(got, answer(model), rtol=1e-4, atol=1e-4)
    assert any("compile cache skipped" in r.getMessage() and "PermissionError" in r.getMessage() for r in caplog.records)


_FULL_DISK = r"""
import json, logging, resource, signal, sys
import numpy as np, hal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
logging.basicConfig(level=logging.WARNING)
exe = hal.compile(sys.argv[1]).to("openvino:CPU", strict=True)
print(json.dumps(exe.run({"x": np.load(sys.argv[2])})["y"].tolist()))
"""


def test_full_disk(tmp_path):
    """Every write to the cache fails with EFBIG (RLIMIT_FSIZE 0 in a child): the model file, the
    compiled/ entry, OpenVINO's blob (OpenVINO skips it quietly)."""
    model = mlp(seed=0)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", X)
    env = dict(os.environ, HAL_CACHE_DIR=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "m.onnx"), str(tmp_path / "x.npy")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.array(json.loads(proc.stdout.splitlines()[-1]), np.float32), answer(model),
                               rtol=1e-4, atol=1e-4)
    assert "compile cache skipped" in proc.stderr and "File too large" in proc.stderr
    assert "backends/openvino/models" in proc.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size]
