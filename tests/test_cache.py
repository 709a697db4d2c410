"""The compile cache's integrity: entries and backend artifacts are checked on read (a damaged,
truncated or foreign one is rebuilt with a WARNING), and a cache that cannot be written is skipped
with a WARNING, never a failed compile. Backend artifacts here are onnxruntime's optimized models
(ort:cpu); the plugins test theirs the same way."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hal
from hal import cache as hal_cache
from hal._paths import backend_cache_dir
from hal.cache import Artifact, CompileCache
from hal.testing.build import make_model

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def cache(tmp_path, monkeypatch, fresh_registry) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("HAL_CACHE_DIR", str(root))
    return root


@pytest.fixture
def probe_again():
    """Make onnxruntime's runtime limits be probed (and their file written) again in this test."""
    import hal.backends.onnxruntime as hort

    hort.runtime_limits.cache_clear()
    yield
    hort.runtime_limits.cache_clear()


def linear(seed: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """y = x @ w + b; w (8x4) is returned so tests can find its bytes in a file."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        [("x", TensorProto.FLOAT, [2, 8])],
        [("y", TensorProto.FLOAT, [2, 4])],
        initializers=[onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
    )
    return model, w


def expected(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return x @ init["w"] + init["b"]


X = np.arange(16, dtype=np.float32).reshape(2, 8) / 8


def change_one_weight(path: Path, w: np.ndarray) -> None:
    """Change w[0, 0] in the file, keeping its size (what the issue did to a cached model)."""
    data = path.read_bytes()
    at = data.find(w.tobytes())
    assert at >= 0, f"the weights are not stored as is in {path.name}"
    changed = data[:at] + np.float32(w[0, 0] + 100).tobytes() + data[at + 4 :]
    assert len(changed) == len(data)
    path.write_bytes(changed)


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def ort_artifacts(root: Path) -> list[Path]:
    return sorted((root / "backends" / "ort").glob("*.ort.onnx"))


class TestCompileCache:
    def test_round_trip(self, tmp_path):
        cache = CompileCache(tmp_path)
        cache.put("k" * 64, b"payload")
        assert cache.get("k" * 64) == b"payload"
        assert cache.get("j" * 64) is None

    def test_an_entry_copied_to_another_keys_name_is_refused(self, tmp_path, caplog):
        cache = CompileCache(tmp_path)
        a, b = "a" * 64, "b" * 64
        cache.put(a, b"the answer for a")
        cache.put(b, b"the answer for b")
        cache._path(b).write_bytes(cache._path(a).read_bytes())  # a valid entry, under the wrong key
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert cache.get(b) is None
        assert warnings_about(caplog, str(cache._path(b)))
        assert not cache._path(b).exists()
        assert cache.get(a) == b"the answer for a"

    @pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
    def test_a_damaged_entry_is_removed(self, tmp_path, caplog, damage):
        cache = CompileCache(tmp_path)
        cache.put("k" * 64, b"x" * 100)
        path = cache._path("k" * 64)
        data = path.read_bytes()
        path.write_bytes({"flip": data[:-1] + b"y", "truncate": data[:-10], "empty": b""}[damage])
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert cache.get("k" * 64) is None
        assert warnings_about(caplog, "corrupt") and not path.exists()

    def test_an_entry_of_the_previous_format_is_rebuilt_quietly(self, tmp_path, caplog):
        cache = CompileCache(tmp_path)
        path = cache._path("k" * 64)
        path.parent.mkdir(parents=True)
        payload = b"from an older onnx-hal"
        path.write_bytes(b"HALC\x01" + hashlib.sha256(payload).digest() + payload)  # format 1: no key
        with caplog.at_level(logging.INFO, logger="hal.cache"):
            assert cache.get("k" * 64) is None
        assert not warnings_about(caplog, "")
        assert any("older onnx-hal" in r.getMessage() for r in caplog.records)
        cache.put("k" * 64, b"new")
        assert cache.get("k" * 64) == b"new"

    def test_lowered_models_swapped_between_keys_are_rebuilt(self, cache, caplog):
        """Two models that ort:cpu lowers (int4 Add): their compiled/ entries hold the lowered
        models. Swapped, each would answer with the other's weights."""
        import ml_dtypes

        def int4_add(value: int) -> onnx.ModelProto:
            w = helper.make_tensor("w", TensorProto.INT4, [4], [value] * 4)
            return make_model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", TensorProto.INT4, [4])],
                              [("y", TensorProto.INT4, [4])], initializers=[w], opset=21)

        x = np.array([1, 2, 3, -1], ml_dtypes.int4)
        for value in (1, 2):
            hal.compile(int4_add(value)).to("ort:cpu", fallback=None, verify=False)
        entries = sorted((cache / "compiled").rglob("*"), key=lambda p: p.stat().st_mtime_ns)
        # Each lowering is two entries: its JSON record (read by ranking) and the lowered model
        # (read by prepare): swap the models.
        header = len(b"HALC\x02") + 32
        first, second = (p for p in entries if p.is_file() and not p.read_bytes()[header:].startswith(b"{"))
        blobs = first.read_bytes(), second.read_bytes()
        first.write_bytes(blobs[1])
        second.write_bytes(blobs[0])
        with caplog.at_level(logging.WARNING):
            for value in (1, 2):
                exe = hal.compile(int4_add(value)).to("ort:cpu", fallback=None, verify=False)
                assert exe.lowering  # really lowered, so the entry held a model
                np.testing.assert_array_equal(exe.run({"x": x})["y"].astype(np.int8), x.astype(np.int8) + value)
        assert len(warnings_about(caplog, "another key")) == 2


class TestArtifact:
    def test_round_trip_and_record(self, tmp_path):
        artifact = Artifact(tmp_path / "a.bin", "key-a")
        assert artifact.read() is None and not artifact.check()  # absent: quietly None
        assert artifact.write(b"compiled bytes", {"compiler": "x 1.0"})
        assert artifact.read() == b"compiled bytes" and artifact.check()
        record = json.loads(artifact.record.read_text())
        st = artifact.path.stat()
        assert record == {"key": "key-a", "size": 14, "sha256": hashlib.sha256(b"compiled bytes").hexdigest(),
                          "compiler": "x 1.0", "stat": [st.st_dev, st.st_ino, 14, st.st_mtime_ns, st.st_ctime_ns]}
        assert artifact.record.name == "a.bin" + hal_cache.RECORD_SUFFIX

    def test_an_unchanged_file_is_not_hashed_again(self, tmp_path, monkeypatch):
        artifact = Artifact(tmp_path / "a.bin", "key-a")
        assert artifact.write(b"x" * 1000)

        def no_hashing(*args, **kwargs):
            raise AssertionError("an unchanged file was hashed on read")

        with monkeypatch.context() as patch:
            patch.setattr(hashlib, "sha256", no_hashing)
            patch.setattr(hashlib, "file_digest", no_hashing)
            assert artifact.check() and artifact.read() == b"x" * 1000

    def test_a_change_that_restores_size_and_mtime_is_still_seen(self, tmp_path, caplog):
        """`touch -r` can put the modification time back; the change time cannot be set back."""
        artifact = Artifact(tmp_path / "a.bin", "key-a")
        artifact.write(b"x" * 1000)
        st = artifact.path.stat()
        artifact.path.write_bytes(b"x" * 999 + b"y")
        os.utime(artifact.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert artifact.read() is None
        assert "sha256" in warnings_about(caplog, str(artifact.path))[0]

    def test_a_record_without_stat_means_hash_every_time(self, tmp_path, caplog):
        """What is written when the filesystem clock could not be seen to pass the file's change
        time: readers hash the file."""
        artifact = Artifact(tmp_path / "a.bin", "key-a")
        artifact.write(b"x" * 1000)
        record = json.loads(artifact.record.read_text())
        artifact.record.write_text(json.dumps({**record, "stat": None}))
        assert artifact.read() == b"x" * 1000
        artifact.path.write_bytes(b"y" * 1000)
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert not artifact.check()

    @pytest.mark.parametrize(
        ("damage", "says"),
        [
            ("flip", "sha256"),
            ("truncate", "truncated"),
            ("other-artifact", "sha256"),
            ("other-artifact-and-record", "another cache key"),
            ("damaged-record", "record"),
        ],
    )
    @pytest.mark.parametrize("how", ["read", "check"])
    def test_a_damaged_or_foreign_file_is_removed_with_a_warning(self, tmp_path, caplog, damage, says, how):
        artifact = Artifact(tmp_path / "a.bin", "key-a")
        other = Artifact(tmp_path / "b.bin", "key-b")
        artifact.write(b"A" * 64)
        other.write(b"B" * 64)
        if damage == "flip":
            artifact.path.write_bytes(b"A" * 63 + b"a")  # one byte, same size
        elif damage == "truncate":
            artifact.path.write_bytes(b"A" * 32)
        elif damage.startswith("other-artifact"):
            artifact.path.write_bytes(other.path.read_bytes())
            if damage.endswith("record"):
                artifact.record.write_bytes(other.record.read_bytes())
        else:
            artifact.record.write_text('{"key": "key-a", "size"')
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert (artifact.read() if how == "read" else artifact.check()) in (None, False)
        (message,) = warnings_about(caplog, str(artifact.path))
        assert says in message
        assert not artifact.path.exists() and not artifact.record.exists()
        assert other.read() == b"B" * 64  # the other one is untouched

    def test_a_file_without_a_record_is_not_used(self, tmp_path, caplog):
        artifact = Artifact(tmp_path / "a.bin", "key-a")
        artifact.path.write_bytes(b"written by an older version, or a writer that has not finished")
        with caplog.at_level(logging.INFO, logger="hal.cache"):
            assert artifact.read() is None
        assert not warnings_about(caplog, "") and any("no record" in r.getMessage() for r in caplog.records)
        assert artifact.write(b"rebuilt") and artifact.read() == b"rebuilt"

    def test_content_addressed_file(self, tmp_path, caplog):
        data = b"a model"
        digest = hashlib.sha256(data).hexdigest()
        artifact = Artifact(tmp_path / f"{digest}.onnx", digest, sha256=digest)
        assert artifact.write(data) and artifact.check()
        artifact.record.unlink()  # an older onnx-hal wrote none: the name is what it must hash to
        assert artifact.check()
        artifact.path.write_bytes(b"a modem")
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert not artifact.check()
        assert warnings_about(caplog, artifact.path.name) and not artifact.path.exists()
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert not artifact.write(b"another model")  # refused: it would never verify
        assert not artifact.path.exists()

    def test_adopt_moves_a_runtime_written_file_into_place(self, tmp_path):
        artifact = Artifact(tmp_path / "a.bin", "key-a")
        scratch = artifact.temp_path()
        assert scratch.parent == tmp_path and scratch.name.startswith(".")
        scratch.write_bytes(b"written by the runtime")
        assert artifact.adopt(scratch)
        assert not scratch.exists() and artifact.read() == b"written by the runtime"

    def test_a_failed_write_is_a_warning_not_an_error(self, tmp_path, caplog):
        (tmp_path / "file").write_text("")
        artifact = Artifact(tmp_path / "file" / "a.bin", "key-a")
        with caplog.at_level(logging.WARNING, logger="hal.cache"):
            assert not artifact.write(b"data")
        assert warnings_about(caplog, "compile cache skipped")

    def test_info_counts_artifacts_not_records(self, cache):
        hal.compile(linear(0)[0]).to("ort:cpu", verify=False)
        section = hal_cache.info()["sections"]["backends/ort"]
        assert section["files"] == 1
        assert section["bytes"] == sum(p.stat().st_size for p in (cache / "backends" / "ort").iterdir())


class TestOrtOptimizedModel:
    """ort:cpu keeps onnxruntime's optimized model as ``backends/ort/<key>.ort.onnx`` and loads it in
    later processes: it is an :class:`Artifact`, checked before onnxruntime sees it."""

    def test_a_changed_weight_is_detected_and_rebuilt(self, cache, caplog):
        import onnxruntime as ort

        from hal._plugins import registry

        model, w = linear(0)
        want = expected(model, X)
        hal.compile(model).to("ort:cpu", verify=False)
        (path,) = ort_artifacts(cache)
        change_one_weight(path, w)
        damaged = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
        assert not np.allclose(damaged.run(None, {"x": X})[0], want)  # the damage matters
        backend = registry().backend("ort")
        hits = backend.cache_hits
        with caplog.at_level(logging.WARNING):
            exe = hal.compile(model).to("ort:cpu", verify=False)
        np.testing.assert_allclose(exe.run({"x": X})["y"], want, rtol=1e-5, atol=1e-5)
        (message,) = warnings_about(caplog, path.name)
        assert "sha256" in message
        assert backend.cache_hits == hits  # not served from the damaged file
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = hal.compile(model).to("ort:cpu", verify=False)
        assert backend.cache_hits == hits + 1 and not caplog.records  # rebuilt, and good again
        np.testing.assert_allclose(again.run({"x": X})["y"], want, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("with_record", [False, True])
    def test_another_models_file_copied_over_is_rebuilt(self, cache, caplog, with_record):
        (model_a, _), (model_b, _) = linear(0), linear(1)
        hal.compile(model_a).to("ort:cpu", verify=False)
        (path_a,) = ort_artifacts(cache)
        hal.compile(model_b).to("ort:cpu", verify=False)
        (path_b,) = (p for p in ort_artifacts(cache) if p != path_a)
        path_a.write_bytes(path_b.read_bytes())
        if with_record:
            Artifact(path_a, "").record.write_bytes(Artifact(path_b, "").record.read_bytes())
        with caplog.at_level(logging.WARNING):
            exe = hal.compile(model_a).to("ort:cpu", verify=False)
        np.testing.assert_allclose(exe.run({"x": X})["y"], expected(model_a, X), rtol=1e-5, atol=1e-5)
        assert warnings_about(caplog, path_a.name)

    def test_a_truncated_file_is_rebuilt(self, cache, caplog):
        model, _ = linear(0)
        hal.compile(model).to("ort:cpu", verify=False)
        (path,) = ort_artifacts(cache)
        path.write_bytes(path.read_bytes()[:-7])
        with caplog.at_level(logging.WARNING):
            exe = hal.compile(model).to("ort:cpu", verify=False)
        np.testing.assert_allclose(exe.run({"x": X})["y"], expected(model, X), rtol=1e-5, atol=1e-5)
        assert "truncated" in warnings_about(caplog, path.name)[0]


def _deny_writes_under(root: Path, monkeypatch) -> None:
    """What a read-only directory does to a user that is not root: creating a directory or a file
    in it fails with EACCES and ``os.access(W_OK)`` says no. Root writes through mode bits, so
    for root the os-level calls are patched to fail that way under ``root``."""
    real_mkdir, real_open, real_access = os.mkdir, os.open, os.access

    def under(path) -> bool:
        return Path(os.fspath(path)).resolve().is_relative_to(root.resolve())

    def mkdir(path, *args, **kwargs):
        if under(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and under(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK and under(path) else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "access", access)


def make_read_only(root: Path, monkeypatch) -> str:
    """Make ``root`` (and what is in it) read-only for this process; returns how."""
    if IS_ROOT:
        _deny_writes_under(root, monkeypatch)
        return "os-level EACCES (root ignores mode bits)"
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    return "chmod 0555"


@pytest.fixture
def restore_modes(tmp_path):
    yield
    for path in [tmp_path, *tmp_path.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)


class TestUnwritableCache:
    """Every way the cache cannot be written: the compile goes on without it, with a WARNING that
    says the cache is skipped and why, and answers right."""

    @pytest.mark.parametrize("where", ["names-a-file", "under-a-file"])
    def test_cache_dir_through_a_file(self, tmp_path, monkeypatch, fresh_registry, probe_again, caplog, where):
        (tmp_path / "file").write_text("not a directory")
        root = tmp_path / "file" if where == "names-a-file" else tmp_path / "file" / "cache"
        monkeypatch.setenv("HAL_CACHE_DIR", str(root))
        model, _ = linear(0)
        with caplog.at_level(logging.WARNING):
            assert backend_cache_dir("ort") == ""
            exe = hal.compile(model).to("ort:cpu")  # verification on: its verdict is not kept either
        np.testing.assert_allclose(exe.run({"x": X})["y"], expected(model, X), rtol=1e-5, atol=1e-5)
        skipped = warnings_about(caplog, "compile cache skipped")
        assert skipped and all("NotADirectoryError" in m for m in skipped)
        assert any("runtime" in m for m in skipped)  # onnxruntime's probe result was not kept
        assert any("backends" in m for m in skipped)

    def test_read_only_cache_dir(self, tmp_path, monkeypatch, fresh_registry, probe_again, caplog, restore_modes):
        root = tmp_path / "cache"
        root.mkdir()
        monkeypatch.setenv("HAL_CACHE_DIR", str(root))
        how = make_read_only(root, monkeypatch)
        model, _ = linear(0)
        with caplog.at_level(logging.WARNING):
            exe = hal.compile(model).to("ort:cpu")
        np.testing.assert_allclose(exe.run({"x": X})["y"], expected(model, X), rtol=1e-5, atol=1e-5)
        skipped = warnings_about(caplog, "compile cache skipped")
        assert skipped and all("PermissionError" in m for m in skipped), how
        assert not list(root.iterdir())

    def test_a_filled_cache_made_read_only_is_still_read(self, tmp_path, monkeypatch, cache, caplog, restore_modes):
        import hal.compiler

        model, _ = linear(0)
        hal.compile(model).to("ort:cpu")
        how = make_read_only(cache, monkeypatch)
        lowerings = []
        lower_for = hal.compiler.lower_for
        monkeypatch.setattr(hal.compiler, "lower_for", lambda *a, **k: lowerings.append(1) or lower_for(*a, **k))
        with caplog.at_level(logging.WARNING):
            exe = hal.compile(model).to("ort:cpu")
        np.testing.assert_allclose(exe.run({"x": X})["y"], expected(model, X), rtol=1e-5, atol=1e-5)
        assert warnings_about(caplog, "compile cache skipped"), how  # backends/ort is not writable
        assert not lowerings  # the compiled/ entry was read

    def test_full_disk(self, tmp_path):
        """A child process whose writes fail with EFBIG (RLIMIT_FSIZE 0, SIGXFSZ ignored): every
        write the HAL and onnxruntime make to the cache fails the way a full disk makes them fail."""
        model, _ = linear(0)
        onnx.save(model, tmp_path / "m.onnx")
        result = run_on_a_full_disk(tmp_path, "ort:cpu", "")
        np.testing.assert_allclose(np.array(result["y"], np.float32), expected(model, X), rtol=1e-5, atol=1e-5)
        assert "compile cache skipped" in result["log"] and "File too large" in result["log"]
        assert "onnxruntime could not save its optimized model" in result["log"]
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size]


_FULL_DISK = r"""
import json, logging, resource, signal, sys
import numpy as np
import hal

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
exe = hal.compile(sys.argv[1]).to(sys.argv[2], strict=True)
x = np.arange(16, dtype=np.float32).reshape(2, 8) / 8
print(json.dumps({"y": exe.run({"x": x})["y"].tolist()}))
"""


def run_on_a_full_disk(tmp_path: Path, device: str, plugins: str) -> dict:
    env = dict(os.environ, HAL_CACHE_DIR=str(tmp_path / "cache"), HAL_LOAD_PLUGINS=plugins,
               PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "m.onnx"), device],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return {**json.loads(proc.stdout.splitlines()[-1]), "log": proc.stderr}


class TestCacheRootAt:
    """hal._paths.cache_root_at: every cache under one directory for a block (hal bench's cold
    placement), in every thread, without touching os.environ, then back."""

    def test_overrides_hal_cache_dir_nests_and_restores(self, tmp_path, monkeypatch):
        import threading

        from hal._paths import cache_root, cache_root_at

        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "env"))
        with cache_root_at(tmp_path / "a") as root:
            assert root == cache_root() == tmp_path / "a"
            assert os.environ["HAL_CACHE_DIR"] == str(tmp_path / "env")
            assert CompileCache().root == tmp_path / "a" / "compiled"
            assert backend_cache_dir("x") == str(tmp_path / "a" / "backends" / "x")
            seen = []
            thread = threading.Thread(target=lambda: seen.append(cache_root()))
            thread.start()
            thread.join()
            assert seen == [tmp_path / "a"]
            with cache_root_at(tmp_path / "b"):
                assert cache_root() == tmp_path / "b"
            assert cache_root() == tmp_path / "a"
        assert cache_root() == tmp_path / "env"

    def test_restores_after_an_error(self, tmp_path, monkeypatch):
        from hal._paths import cache_root, cache_root_at

        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "env"))
        with pytest.raises(RuntimeError), cache_root_at(tmp_path / "a"):
            raise RuntimeError("boom")
        assert cache_root() == tmp_path / "env"
