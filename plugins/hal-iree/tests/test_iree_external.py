"""Models with external data on iree:local-task (issue 10): the external weights become IREE
parameters, left out of the vmfb and given to the runtime from the HAL's mapping at load, so a
model past protobuf's 2 GiB compiles and runs and the weights are not copied."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from iree_helpers import iree_backend, to_strict
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import hal
from hal.errors import CompileError
from hal.testing.build import make_model

GIB = 2**30


def _external(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": str(offset), "length": str(length)}.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def _mlp(directory: Path, seed: int, width: int = 1024, *, offset: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """MatMul -> Add -> Relu -> MatMul with 2 x ``width``^2 float32 weights drawn from ``seed`` in
    ``weights.bin`` (``offset`` bytes in, else aligned), and an inline bias: onnx's helpers."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
        "w2": (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
    }
    bias = np.linspace(-1, 1, width, dtype=np.float32)  # the same in every model: it is inline, in the graph
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        [("x", TensorProto.FLOAT, [4, width])],
        [("y", TensorProto.FLOAT, [4, width])],
        initializers=[numpy_helper.from_array(v, k) for k, v in weights.items()]
        + [numpy_helper.from_array(bias, "b")],
    )
    directory.mkdir(parents=True, exist_ok=True)
    if offset:
        (directory / "weights.bin").write_bytes(b"\0" * offset)
        for name, tensor in zip(weights, model.graph.initializer):
            external_data_helper.set_external_data(tensor, "weights.bin", offset=offset)
            offset += weights[name].nbytes + 4  # each tensor misaligned
    else:
        # the bias (4 KiB, at the size threshold's edge) stays inline: a mixed model
        external_data_helper.convert_model_to_external_data(
            model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=64 * width + 64
        )
    external_data_helper.write_external_data_tensors(model, str(directory))
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, {**weights, "b": bias}


def _answer(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ weights["w1"] + weights["b"], 0) @ weights["w2"]


def _vmfbs(cache: Path) -> list[Path]:
    return sorted((cache / "backends" / "iree").glob("*.vmfb"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, so the vmfbs it makes can be counted and weighed."""
    root = tmp_path / "cache"
    monkeypatch.setenv("HAL_CACHE_DIR", str(root))
    return root


class TestExternalWeights:
    def test_run_right_and_the_vmfb_holds_no_weights(self, tmp_path: Path, cache: Path) -> None:
        path, weights = _mlp(tmp_path / "m", seed=0)
        model = hal.load(path)
        assert model.weights is not None and model.weights.nbytes == 8 * 2**20
        exe = to_strict(hal.compile(model), "iree:local-task")
        x = np.random.default_rng(9).standard_normal((4, 1024)).astype(np.float32)
        np.testing.assert_allclose(exe.run({"x": x})["y"], _answer(weights, x), rtol=1e-4, atol=1e-4)
        (vmfb,) = _vmfbs(cache)
        assert vmfb.stat().st_size < model.weights.nbytes / 50, vmfb.stat().st_size
        record = json.loads(Path(f"{vmfb}.record").read_text())
        assert record["parameters"] == 2  # w1 and w2; the inline bias is inside

    def test_same_graph_other_weights_share_one_vmfb(self, tmp_path: Path, cache: Path) -> None:
        backend = iree_backend()
        x = np.random.default_rng(9).standard_normal((4, 1024)).astype(np.float32)
        answers, compiles = [], []
        for seed in (1, 2):
            path, weights = _mlp(tmp_path / f"m{seed}", seed=seed)
            before = backend.compile_count
            exe = to_strict(hal.compile(path), "iree:local-task")
            compiles.append(backend.compile_count - before)
            answers.append(exe.run({"x": x})["y"])
            np.testing.assert_allclose(answers[-1], _answer(weights, x), rtol=1e-4, atol=1e-4)
        assert compiles == [1, 0]  # the second model loaded the first's vmfb with its own weights
        assert len(_vmfbs(cache)) == 1
        assert not np.allclose(answers[0], answers[1])

    def test_names_that_sanitize_alike_stay_apart(self, tmp_path: Path, cache: Path) -> None:
        """IREE's importer names a parameter after its initializer with ':' replaced: 'w:0' and
        'w_0' would read one tensor for both."""
        rng = np.random.default_rng(6)
        a, b = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
        inits = [numpy_helper.from_array(a, "w:0"), numpy_helper.from_array(b, "w_0")]
        model = make_model(
            [helper.make_node("MatMul", ["x", "w:0"], ["h"]), helper.make_node("MatMul", ["h", "w_0"], ["y"])],
            [("x", TensorProto.FLOAT, [2, 64])], [("y", TensorProto.FLOAT, [2, 64])], initializers=inits,
        )
        external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
        external_data_helper.write_external_data_tensors(model, str(tmp_path))
        (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
        exe = to_strict(hal.compile(tmp_path / "m.onnx"), "iree:local-task")
        x = rng.standard_normal((2, 64)).astype(np.float32)
        np.testing.assert_allclose(exe.run({"x": x})["y"], x @ a @ b, rtol=1e-4, atol=1e-4)

    def test_misaligned_tensors_are_right_and_logged(
        self, tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path, weights = _mlp(tmp_path / "m", seed=3, width=256, offset=4)
        with caplog.at_level(logging.INFO, logger="hal_iree"):
            exe = to_strict(hal.compile(path), "iree:local-task")
        x = np.random.default_rng(9).standard_normal((4, 256)).astype(np.float32)
        np.testing.assert_allclose(exe.run({"x": x})["y"], _answer(weights, x), rtol=1e-4, atol=1e-4)
        assert any("not 64-byte aligned" in r.getMessage() for r in caplog.records)

    def test_weights_inside_on_request(self, tmp_path: Path, cache: Path) -> None:
        path, weights = _mlp(tmp_path / "m", seed=4, width=256)
        exe = to_strict(hal.compile(path), "iree:local-task", iree_parameters="none")
        x = np.random.default_rng(9).standard_normal((4, 256)).astype(np.float32)
        np.testing.assert_allclose(exe.run({"x": x})["y"], _answer(weights, x), rtol=1e-4, atol=1e-4)
        (vmfb,) = _vmfbs(cache)
        assert vmfb.stat().st_size > 2 * 256 * 256 * 4

    def test_inline_weights_as_parameters_on_request(self, cache: Path) -> None:
        rng = np.random.default_rng(5)
        w = rng.standard_normal((256, 256)).astype(np.float32)
        model = make_model(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            [("x", TensorProto.FLOAT, [2, 256])], [("y", TensorProto.FLOAT, [2, 256])],
            initializers=[numpy_helper.from_array(w, "w")],
        )
        exe = to_strict(hal.compile(model), "iree:local-task", iree_parameters=1024)
        x = rng.standard_normal((2, 256)).astype(np.float32)
        np.testing.assert_allclose(exe.run({"x": x})["y"], x @ w, rtol=1e-4, atol=1e-4)
        (vmfb,) = _vmfbs(cache)
        assert vmfb.stat().st_size < w.nbytes / 4

    def test_an_unknown_choice_is_refused(self, tmp_path: Path, cache: Path) -> None:
        path, _ = _mlp(tmp_path / "m", seed=0, width=128)
        with pytest.raises(CompileError, match="iree_parameters must be"):
            to_strict(hal.compile(path), "iree:local-task", iree_parameters="some")


_LARGE_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
    import hal, onnx, onnxruntime, iree.runtime, iree.compiler
    base, anon = status("VmHWM"), status("RssAnon")
    rows = int(sys.argv[2])
    ids = np.array([7, rows - 1, 3], np.int64)
    exe = hal.compile(hal.load(sys.argv[1])).to("iree:local-task", strict=True, example={"ids": ids})
    y = exe.run({"ids": ids})["y"]
    print(json.dumps({"y": y[:, :4].tolist(), "hwm_growth": status("VmHWM") - base,
                      "anon_growth": status("RssAnon") - anon}))
""")


@pytest.mark.skipif(os.environ.get("HAL_SKIP_LARGE") == "1", reason="HAL_SKIP_LARGE=1")
def test_a_model_over_2_gib_runs_without_copying_its_weights(tmp_path: Path) -> None:
    """An embedding of 2 GiB + 4 MiB (a sparse file of zeros but for two rows: no disk, and only
    the rows read are paged in), looked up with Gather, in a fresh process: the answer is right,
    and the process's peak memory grows by far less than the weights (a copy would add 2 GiB)."""
    rows, width = (2 * GIB + 4 * 2**20) // (4 * 1024), 1024
    data = tmp_path / "embedding.bin"
    try:
        with open(data, "wb") as f:
            f.truncate(rows * width * 4)
            for row, value in ((7, 1.5), (rows - 1, -2.0)):
                f.seek(row * width * 4)
                f.write(np.full(width, value, np.float32).tobytes())
        table = _external(
            TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width]), "embedding.bin", 0,
            rows * width * 4,
        )
        model = make_model(
            [helper.make_node("Gather", ["table", "ids"], ["y"])],
            [("ids", TensorProto.INT64, [3])], [("y", TensorProto.FLOAT, [3, width])], initializers=[table],
        )
        path = tmp_path / "big.onnx"
        path.write_bytes(model.SerializeToString())
        env = dict(os.environ, HAL_CACHE_DIR=str(tmp_path / "cache"), HAL_LOAD_PLUGINS="iree")
        out = subprocess.run(
            [sys.executable, "-c", _LARGE_CHILD, str(path), str(rows)],
            capture_output=True, text=True, env=env, check=False, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["y"] == [[1.5] * 4, [-2.0] * 4, [0.0] * 4]
        assert result["hwm_growth"] < GIB / 2, result  # the weights: 2 GiB
        assert result["anon_growth"] < 256 * 2**20, result
        (vmfb,) = (tmp_path / "cache" / "backends" / "iree").glob("*.vmfb")
        assert vmfb.stat().st_size < 2**20
    finally:  # pytest keeps recent temporary directories: gigabytes must not stay behind
        data.unlink(missing_ok=True)
