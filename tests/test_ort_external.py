"""onnxruntime with external weights: the graph optimizers see the weights' values (a Transpose
of a weight is folded from its real bytes), and ``graph_optimization="disabled"`` uses the mapped
weights in place, with no copy (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hal
from hal.errors import CompileError
from hal.testing.build import make_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))


def _transposed(tmp_path: Path) -> tuple[Path, np.ndarray]:
    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    model = make_model(
        [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        [("x", TensorProto.FLOAT, [2, 32])], [("y", TensorProto.FLOAT, [2, 64])],
        initializers=[onnx.numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "t.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="t.data", size_threshold=0)
    return path, w


@pytest.mark.parametrize("optimization", ["auto", "all", "disabled"])
def test_a_folded_weight_is_folded_from_its_bytes(tmp_path, optimization):
    path, w = _transposed(tmp_path)
    x = np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32)
    exe = hal.compile(path).to("ort:cpu", strict=True, verify=False, graph_optimization=optimization)
    np.testing.assert_allclose(exe.run({"x": x})["y"], x @ w.T, rtol=1e-5, atol=1e-5)


def test_an_unknown_setting_is_named(tmp_path):
    path, _ = _transposed(tmp_path)
    with pytest.raises(CompileError, match="graph_optimization='fast' is not one of 'auto', 'all', 'disabled'"):
        hal.compile(path).to("ort:cpu", strict=True, verify=False, graph_optimization="fast")


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import hal, onnxruntime
    def anon():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    compiled = hal.compile(sys.argv[1])
    before = anon()
    exe = compiled.to("ort:cpu", strict=True, verify=False, graph_optimization=sys.argv[2])
    y = exe.run({"ids": np.array([7, 3], np.int64)})["y"]
    print(json.dumps({"y": y[:, :2].tolist(), "anon_growth": anon() - before}))
""")


@pytest.mark.parametrize(("optimization", "rows"), [
    ("disabled", 65536),  # 256 MiB of float32, asked for in place
    ("auto", (2**31 + 2**22) // 4096),  # 2 GiB + 4 MiB: "auto" keeps weights this large in place
    ("all", 65536),  # copied in for the optimizers: the answer only
])
def test_large_or_unoptimized_weights_stay_in_place(tmp_path, optimization, rows):
    width = 1024  # a sparse file: no disk but row 7
    data = tmp_path / "table.bin"
    with open(data, "wb") as f:
        f.truncate(rows * width * 4)
        f.seek(7 * width * 4)
        f.write(np.full(width, 2.5, np.float32).tobytes())
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "table.bin"), ("offset", "0"), ("length", str(rows * width * 4))):
        entry = table.external_data.add()
        entry.key, entry.value = key, value
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["y"])], [("ids", TensorProto.INT64, [2])],
                       [("y", TensorProto.FLOAT, [2, width])], initializers=[table])
    path = tmp_path / "gather.onnx"
    path.write_bytes(model.SerializeToString())
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), optimization], capture_output=True, text=True,
                             check=False, timeout=300)
    finally:  # pytest keeps recent temporary directories: a 2 GiB file, even sparse, must not stay
        data.unlink()
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["y"] == [[2.5, 2.5], [0.0, 0.0]]
    if optimization != "all":  # ("all" copies the table in today, for its optimizers)
        assert result["anon_growth"] < rows * width, result  # under a quarter of the table: in place
