"""The hal command, run in-process through hal.cli.main."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hal.cli import main
from hal.testing.build import make_model, optional_info, sequence_info


@pytest.fixture
def model_path(tmp_path, linear_model):
    path = tmp_path / "linear.onnx"
    onnx.save(linear_model, path)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestDevices:
    def test_table(self, capsys, fresh_registry):
        code, out, _ = run(capsys, "devices")
        assert code == 0
        assert out.splitlines()[0].split()[:5] == ["ID", "VENDOR", "KIND", "BACKEND", "STATUS"]
        assert "ort:cpu" in out and "available" in out and "native fp32" in out

    def test_json(self, capsys, fresh_registry):
        code, out, _ = run(capsys, "devices", "--json")
        data = json.loads(out)
        (cpu,) = [d for d in data["devices"] if d["id"] == "ort:cpu"]
        assert cpu["available"] is True
        assert cpu["capabilities"]["formats"]["bfloat16"] == "storage"
        assert data["problems"] == []

    def test_unavailable_devices_show_the_reason(self, capsys, fresh_registry):
        import hal

        class Offline(hal.Backend):
            name = "offline"
            version = "1"

            def discover(self):
                return [hal.Device(id="offline:0", backend="offline", vendor="V", name="N", kind="gpu",
                                   available=False, reason="no driver; install the vendor driver")]

            def prepare(self, model, device, options):
                raise AssertionError("never called for an unavailable device")

        class Plugin:
            @hal.hookimpl
            def hal_register_backends(self, register):
                register(Offline())

        fresh_registry().add_plugin(Plugin(), name="offline")
        _, out, _ = run(capsys, "devices")
        assert "unavailable: no driver; install the vendor driver" in out


class TestPlugins:
    def test_json_lists_builtin(self, capsys, fresh_registry):
        code, out, _ = run(capsys, "plugins", "--json")
        (cpu,) = [p for p in json.loads(out) if p["name"] == "cpu"]
        assert code == 0 and cpu["status"] == "loaded" and cpu["hooks"] == ["hal_register_backends"]

    def test_table(self, capsys, fresh_registry):
        _, out, _ = run(capsys, "plugins")
        assert "hal_register_backends" in out and "loaded" in out


class TestInspect:
    def test_text(self, capsys, model_path):
        code, out, _ = run(capsys, "inspect", str(model_path))
        assert code == 0
        assert "x: float32 [batch, 8]" in out
        assert "ai.onnx 17" in out
        assert "144 bytes" in out  # (8*4 + 4) float32 parameters
        assert "MatMul" in out and "Add" in out

    def test_json(self, capsys, model_path):
        _, out, _ = run(capsys, "inspect", str(model_path), "--json")
        data = json.loads(out)
        assert data["inputs"] == [{"name": "x", "format": "float32", "shape": ["batch", 8]}]
        assert {"domain": "ai.onnx", "op_type": "MatMul", "count": 1} in data["operators"]
        assert data["parameter_bytes"] == 144


class TestRun:
    def test_writes_outputs(self, capsys, tmp_path, model_path, linear_model):
        x = np.ones((3, 8), np.float32)
        np.save(tmp_path / "x.npy", x)
        code, out, _ = run(capsys, "run", str(model_path), "--device", "ort:cpu",
                           "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "out"))
        assert code == 0 and "on ort:cpu" in out
        y = np.load(tmp_path / "out" / "y.npy")
        w = onnx.numpy_helper.to_array(linear_model.graph.initializer[0])
        b = onnx.numpy_helper.to_array(linear_model.graph.initializer[1])
        np.testing.assert_allclose(y, x @ w + b, rtol=1e-5)

    def test_ml_dtypes_inputs_from_npy(self, capsys, tmp_path):
        model = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                           [("x", TensorProto.BFLOAT16, [3])], [("y", TensorProto.FLOAT, [3])], opset=21)
        onnx.save(model, tmp_path / "m.onnx")
        np.save(tmp_path / "x.npy", np.array([1.5, -2, 3], ml_dtypes.bfloat16))
        code, out, err = run(capsys, "run", str(tmp_path / "m.onnx"), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npy'}")
        assert code == 0, err
        assert "[1.5, -2.0, 3.0]" in out

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--device", "ort:cpu"], "missing feeds ['x']"),
            (["--device", "nope:0", "--input", "x=X"], "unknown device 'nope:0'"),
            (["--device", "ort:cpu", "--input", "x"], "must be NAME=FILE.npy"),
            (["--device", "ort:cpu", "--input", "x=/does/not/exist.npy"], "does not exist"),
        ],
    )
    def test_errors_are_one_line_and_exit_non_zero(self, capsys, tmp_path, model_path, args, message):
        args = [a.replace("X", str(tmp_path / "x.npy")) for a in args]
        np.save(tmp_path / "x.npy", np.ones((1, 8), np.float32))
        code, out, err = run(capsys, "run", str(model_path), *args)
        assert code == 1
        assert message in err
        assert len(err.strip().splitlines()) == 1 and err.startswith("hal: error:")

    def test_bad_model_file(self, capsys, tmp_path):
        (tmp_path / "bad.onnx").write_bytes(b"garbage" * 10)
        code, _, err = run(capsys, "inspect", str(tmp_path / "bad.onnx"))
        assert code == 1 and "not" in err and len(err.strip().splitlines()) == 1

    def test_debug_shows_the_traceback(self, tmp_path):
        import hal

        with pytest.raises(hal.errors.ModelError):
            main(["--debug", "inspect", str(tmp_path / "missing.onnx")])


def _ab_model():
    """Two outputs whose names map to the same file name."""
    return make_model([helper.make_node("Neg", ["x"], ["a/b"]), helper.make_node("Abs", ["x"], ["a_b"])],
                      [("x", TensorProto.FLOAT, [3])], [("a/b", TensorProto.FLOAT, [3]), ("a_b", TensorProto.FLOAT, [3])])


class TestSequencesAndOptionals:
    @pytest.fixture
    def split_path(self, tmp_path):
        nodes = [helper.make_node("SplitToSequence", ["x"], ["rows"], axis=0, keepdims=0),
                 helper.make_node("Identity", ["p"], ["q"])]
        model = make_model(nodes, [("x", TensorProto.FLOAT, [3, 2]), optional_info("p", TensorProto.INT64, [2])],
                           [sequence_info("rows", TensorProto.FLOAT, [2]), optional_info("q", TensorProto.INT64, [2])], opset=18)
        onnx.save(model, tmp_path / "split.onnx")
        return tmp_path / "split.onnx"

    def test_inspect_says_what_each_holds(self, capsys, split_path):
        code, out, _ = run(capsys, "inspect", str(split_path))
        assert code == 0
        assert "rows: sequence of float32 [2]" in out and "p: optional int64 [2]" in out and "x: float32 [3, 2]" in out
        _, out, _ = run(capsys, "inspect", str(split_path), "--json")
        assert json.loads(out)["outputs"][0] == {"name": "rows", "format": "float32", "shape": [2], "kind": "sequence"}

    def test_run_writes_a_sequence_as_npz(self, capsys, tmp_path, split_path):
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "p.npy", np.array([4, 5]))
        code, out, err = run(capsys, "run", str(split_path), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npy'}",
                             "--input", f"p={tmp_path / 'p.npy'}", "--output-dir", str(tmp_path / "out"))
        assert code == 0, err
        assert "rows: sequence of 3: float32 [2], float32 [2], float32 [2] ->" in out
        with np.load(tmp_path / "out" / "rows.npz") as rows:
            assert [rows[f"arr_{i}"].tolist() for i in range(3)] == x.tolist()
        assert np.load(tmp_path / "out" / "q.npy").tolist() == [4, 5]

    def test_a_sequence_input_is_refused_with_the_reason(self, capsys, tmp_path):
        model = make_model([helper.make_node("Identity", ["s"], ["t"])], [sequence_info("s", TensorProto.FLOAT, None)],
                           [sequence_info("t", TensorProto.FLOAT, None)], opset=18)
        onnx.save(model, tmp_path / "seq.onnx")
        code, _, err = run(capsys, "run", str(tmp_path / "seq.onnx"), "--device", "ort:cpu")
        assert code == 1
        assert "'s' (sequence of float32 any shape) takes a list of arrays: run the model from Python" in err


class TestCliMistakes:
    """Issue 8 item 6: every mistake on the command line is one line `hal: error: ...` and exit 1."""

    @staticmethod
    def one_line(code, err):
        assert code == 1, err
        assert err.startswith("hal: error: ") and len(err.strip().splitlines()) == 1, err

    def test_an_npz_input(self, capsys, tmp_path, model_path):
        np.savez(tmp_path / "x.npz", x=np.ones((1, 8), np.float32))
        code, _, err = run(capsys, "run", str(model_path), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npz'}")
        self.one_line(code, err)
        assert "x.npz is a .npz archive (several arrays); save one array per input with np.save" in err

    def test_a_text_file_and_a_directory_as_input(self, capsys, tmp_path, model_path):
        (tmp_path / "x.txt").write_text("1 2 3")
        for path, message in ((tmp_path / "x.txt", "is not a .npy file"), (tmp_path, "cannot be read")):
            code, _, err = run(capsys, "run", str(model_path), "--device", "ort:cpu", "--input", f"x={path}")
            self.one_line(code, err)
            assert message in err

    def test_a_header_claiming_more_than_the_file_holds_is_refused_before_allocating(self, capsys, tmp_path, model_path):
        with open(tmp_path / "huge.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 8)})
            f.write(b"\0" * 64)
        code, _, err = run(capsys, "run", str(model_path), "--device", "ort:cpu", "--input", f"x={tmp_path / 'huge.npy'}")
        self.one_line(code, err)
        assert "header says shape [1099511627776, 8] of float32 (35184372088832 bytes), but the file holds 64 bytes" in err

    def test_a_truncated_npy(self, capsys, tmp_path, model_path):
        np.save(tmp_path / "x.npy", np.ones((4, 8), np.float32))
        data = (tmp_path / "x.npy").read_bytes()
        (tmp_path / "x.npy").write_bytes(data[:-10])
        code, _, err = run(capsys, "run", str(model_path), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npy'}")
        self.one_line(code, err)
        assert "truncated or damaged" in err

    def test_output_dir_naming_a_file(self, capsys, tmp_path, model_path):
        np.save(tmp_path / "x.npy", np.ones((1, 8), np.float32))
        code, _, err = run(capsys, "run", str(model_path), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npy'}",
                           "--output-dir", str(tmp_path / "x.npy"))
        self.one_line(code, err)
        assert "is a file, not a directory" in err
        assert np.load(tmp_path / "x.npy").shape == (1, 8)  # untouched

    def test_compile_output_naming_a_directory(self, capsys, tmp_path, model_path):
        code, _, err = run(capsys, "compile", str(model_path), "-o", str(tmp_path))
        self.one_line(code, err)
        assert f"cannot save to {tmp_path}: it is a directory" in err

    def test_onnxruntime_prints_nothing_of_its_own(self, capfd, tmp_path):
        # A reshape only the runtime can find wrong: onnxruntime used to print its own coloured
        # ERROR line to stderr before the HAL's.
        shape = helper.make_tensor("s", TensorProto.INT64, [1], [5])
        model = make_model([helper.make_node("Reshape", ["x", "s"], ["y"])], [("x", TensorProto.FLOAT, ["n"])],
                           [("y", TensorProto.FLOAT, [5])], initializers=[shape])
        onnx.save(model, tmp_path / "m.onnx")
        np.save(tmp_path / "x.npy", np.ones(3, np.float32))
        code = main(["run", str(tmp_path / "m.onnx"), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npy'}"])
        err = capfd.readouterr().err
        self.one_line(code, err)
        assert "ort:cpu failed to run the model" in err and "[E:onnxruntime" not in err


class TestOutputFiles:
    def test_outputs_whose_names_collide_get_files_of_their_own(self, capsys, tmp_path):
        onnx.save(_ab_model(), tmp_path / "ab.onnx")
        x = np.array([-1, 2, -3], np.float32)
        np.save(tmp_path / "x.npy", x)
        code, out, err = run(capsys, "run", str(tmp_path / "ab.onnx"), "--device", "ort:cpu", "--input", f"x={tmp_path / 'x.npy'}",
                             "--output-dir", str(tmp_path / "out"))
        assert code == 0, err
        assert f"a/b: float32 [3] -> {tmp_path / 'out' / 'a_b.npy'}" in out
        assert f"a_b: float32 [3] -> {tmp_path / 'out' / 'a_b_2.npy'}" in out
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "a_b.npy"), -x)
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "a_b_2.npy"), np.abs(x))

    def test_names_that_differ_only_in_case_get_files_of_their_own(self, tmp_path):
        from hal.cli import _output_files

        files = _output_files(["Y", "y", "y_2", "..", ""], tmp_path)
        assert [p.name for p in files.values()] == ["Y.npy", "y_2.npy", "y_2_2.npy", "output.npy", "output_2.npy"]


class TestBrokenPipe:
    def test_a_reader_that_leaves_early_ends_it_quietly(self, tmp_path, model_path):
        import os
        import subprocess
        import sys

        env = {**os.environ, "HAL_LOAD_PLUGINS": "", "HAL_CACHE_DIR": str(tmp_path / "cache")}
        proc = subprocess.Popen([sys.executable, "-m", "hal", "explain", str(model_path), "--device", "ort:cpu"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdout.close()  # like `| head` that has read all it wanted before hal writes
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as a command killed by it
        assert err == ""
