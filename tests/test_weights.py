"""External data stays external (issue 10): checked once, mapped, never copied, hashed once, and
what a runtime reads is the file the HAL checked.

Hostile layouts (absolute paths, '..', links, offsets past the end) are tests/test_model.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hal
from hal.errors import ModelError
from hal.testing.build import make_model
from hal.weights import Weights


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))


def _external(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": str(offset), "length": str(length)}.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def mlp_with_external_weights(directory: Path, seed: int = 0, *, data_name: str = "weights.bin") -> tuple[Path, list[np.ndarray]]:
    """x[1, 16] -> MatMul w1[16, 32] -> Relu -> MatMul w2[32, 8] (+ a bf16 bias), every weight in
    one external file, with gaps between tensors."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    blob = bytearray()
    tensors = []
    for name, array in (("w1", w1), ("w2", w2), ("b", b)):
        blob += b"\x5a" * 24  # a gap the model does not reference
        tensors.append(_external(onnx.numpy_helper.from_array(array, name), data_name, len(blob), array.nbytes))
        blob += array.tobytes()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / data_name).write_bytes(bytes(blob))
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        [("x", TensorProto.FLOAT, [1, 16])],
        [("y", TensorProto.FLOAT, [1, 8])],
        initializers=tensors,
    )
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, [w1, w2, b]


def _expected(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    w1, w2, b = weights
    return np.maximum(x @ w1, 0) @ w2 + b


X = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)


class TestKeptExternal:
    def test_the_graph_stays_small_and_the_weights_are_read_only_views(self, tmp_path):
        path, weights = mlp_with_external_weights(tmp_path)
        model = hal.load(path)
        assert model.proto.ByteSize() < 2000, "external weights were copied into the protobuf"
        for tensor, array in zip(model.proto.graph.initializer, weights):
            view = model.weights.array(tensor)
            np.testing.assert_array_equal(view, array)
            assert not view.flags.writeable and not view.flags.owndata

    def test_ort_cpu_answers_with_the_weights(self, tmp_path):
        """onnxruntime gets the mapped bytes (its placeholders are sparse zero files: an answer
        from them would be the bias alone)."""
        path, weights = mlp_with_external_weights(tmp_path)
        exe = hal.compile(path).to("ort:cpu", strict=True)
        np.testing.assert_allclose(exe.run({"x": X})["y"], _expected(X, weights), rtol=1e-5, atol=1e-5)
        assert exe.verification.passed, exe.verification.summary()  # the evaluator got the bytes too

    def test_a_file_swapped_after_loading_is_not_what_runs(self, tmp_path):
        """The HAL holds the checked file open: replacing it afterwards (a rename over it, as an
        attacker or a careless sync would) changes nothing for the loaded model."""
        path, weights = mlp_with_external_weights(tmp_path)
        model = hal.load(path)
        other_dir = tmp_path / "other"
        mlp_with_external_weights(other_dir, seed=1)
        os.replace(other_dir / "weights.bin", tmp_path / "weights.bin")
        exe = hal.compile(model).to("ort:cpu", strict=True)
        np.testing.assert_allclose(exe.run({"x": X})["y"], _expected(X, weights), rtol=1e-5, atol=1e-5)

    def test_a_runtime_never_opens_the_path_the_model_names(self, tmp_path, monkeypatch):
        """Run from a directory holding a file of the data file's name but other bytes: a runtime
        that resolved the location itself (relative to the working directory, as onnx's helpers
        do for a model given as bytes) would answer with it."""
        path, weights = mlp_with_external_weights(tmp_path / "model")
        decoy = tmp_path / "cwd"
        mlp_with_external_weights(decoy, seed=2)
        monkeypatch.chdir(decoy)
        exe = hal.compile(hal.load(path.read_bytes(), base_dir=path.parent)).to("ort:cpu", strict=True)
        np.testing.assert_allclose(exe.run({"x": X})["y"], _expected(X, weights), rtol=1e-5, atol=1e-5)


class TestDigest:
    def test_the_digest_covers_the_bytes(self, tmp_path):
        path, _ = mlp_with_external_weights(tmp_path / "a")
        other, _ = mlp_with_external_weights(tmp_path / "b", seed=1)
        assert path.read_bytes() == other.read_bytes(), "the graphs are the same; only the data differs"
        assert hal.load(path).digest != hal.load(other).digest

    def test_the_digest_ignores_where_the_bytes_sit(self, tmp_path):
        """Saved elsewhere, with the weights laid out anew in one file, the model keeps its digest
        (and a compiled model its manifest's)."""
        path, weights = mlp_with_external_weights(tmp_path / "a")
        compiled = hal.compile(path)
        out = tmp_path / "saved" / "m.onnx"
        out.parent.mkdir()
        compiled.save(out)
        assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
        assert out.stat().st_size < 4000, "the weights were written into the model file"
        again = hal.load_compiled(out)
        assert again.digest == compiled.digest
        exe = again.to("ort:cpu", strict=True)
        np.testing.assert_allclose(exe.run({"x": X})["y"], _expected(X, weights), rtol=1e-5, atol=1e-5)

    def test_a_second_load_hashes_nothing(self, tmp_path, monkeypatch):
        path, _ = mlp_with_external_weights(tmp_path)
        first = hal.load(path).digest
        reads = []
        real_view = Weights.view

        def counting_view(self, tensor):
            reads.append(tensor.name)
            return real_view(self, tensor)

        monkeypatch.setattr(Weights, "view", counting_view)
        assert hal.load(path).digest == first
        assert reads == [], f"the second load read {reads} to hash them"

    def test_a_changed_file_is_hashed_again(self, tmp_path):
        path, _ = mlp_with_external_weights(tmp_path)
        first = hal.load(path).digest
        data = tmp_path / "weights.bin"
        blob = bytearray(data.read_bytes())
        blob[30] ^= 0xFF  # inside w1
        data.write_bytes(bytes(blob))
        assert hal.load(path).digest != first


class TestSizeChecks:
    def test_a_length_that_does_not_fit_the_type_and_shape_is_refused(self, tmp_path):
        path, _ = mlp_with_external_weights(tmp_path)
        proto = onnx.load(path, load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "length":
                entry.value = "60"
        path.write_bytes(proto.SerializeToString())
        with pytest.raises(ModelError, match="need 2048"):
            hal.load(path)

    def test_inline_refuses_past_the_limit(self, tmp_path):
        path, _ = mlp_with_external_weights(tmp_path)
        model = hal.load(path)
        with pytest.raises(ModelError, match="do not fit in one protobuf"):
            model.weights.inline(model.proto, limit=100)
        assert model.weights.inline(model.proto).graph.initializer[0].raw_data


GIB = 2**30


@pytest.mark.skipif(os.environ.get("HAL_SKIP_LARGE") == "1", reason="HAL_SKIP_LARGE=1")
def test_a_model_over_2_gib_loads_compiles_runs_and_round_trips(tmp_path):
    """An embedding of 2 GiB + 4 MiB (a sparse file of zeros but for two rows: no disk, and only
    the rows read are paged in), looked up with Gather: past protobuf's limit, so only external
    data can hold it."""
    rows, width = (2 * GIB + 4 * 2**20) // (4 * 1024), 1024
    data = tmp_path / "embedding.bin"
    with open(data, "wb") as f:
        f.truncate(rows * width * 4)
        for row, value in ((7, 1.5), (rows - 1, -2.0)):
            f.seek(row * width * 4)
            f.write(np.full(width, value, np.float32).tobytes())
    table = _external(TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width]), "embedding.bin", 0, rows * width * 4)
    model = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [("ids", TensorProto.INT64, [3])],
        [("y", TensorProto.FLOAT, [3, width])],
        initializers=[table],
    )
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    try:
        _run_and_round_trip(tmp_path, path, data, rows, width)
    finally:  # pytest keeps recent temporary directories: gigabytes must not stay behind
        for leftover in (data, tmp_path / "saved" / "big.onnx.data"):
            leftover.unlink(missing_ok=True)


def _run_and_round_trip(tmp_path: Path, path: Path, data: Path, rows: int, width: int) -> None:
    ids = np.array([7, rows - 1, 3], np.int64)
    want = np.stack([np.full(width, 1.5), np.full(width, -2.0), np.zeros(width)]).astype(np.float32)

    compiled = hal.compile(path)
    assert compiled.model.weights.nbytes > 2 * GIB
    exe = compiled.to("ort:cpu", strict=True, example={"ids": ids})
    np.testing.assert_array_equal(exe.run({"ids": ids})["y"], want)

    out = tmp_path / "saved" / "big.onnx"
    out.parent.mkdir()
    compiled.save(out)
    data.unlink()  # the saved copy stands on its own
    again = hal.load_compiled(out)
    assert again.digest == compiled.digest
    np.testing.assert_array_equal(again.to("ort:cpu", strict=True, verify=False).run({"ids": ids})["y"], want)
