"""hal.load on good models and on every kind of bad or hostile file we refuse."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hal
from hal.errors import ModelError

from hal.testing.build import make_model, optional_info, sequence_info


def external_model(tmp_path, location="weights.bin", offset=0, length=None, write_data=True):
    """A linear model whose weight lives in external data at `location`."""
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    tensor = numpy_helper.from_array(w, "w")
    if write_data:
        (tmp_path / "weights.bin").write_bytes(b"\0" * offset + w.tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(length if length is not None else w.nbytes)}
    for k, v in entries.items():
        tensor.external_data.add(key=k, value=v)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", TensorProto.FLOAT, [1, 8])],
        [("y", TensorProto.FLOAT, [1, 4])],
        initializers=[tensor],
    )
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, w


class TestLoad:
    def test_path_bytes_and_proto_give_the_same_model(self, tmp_path, linear_model):
        path = tmp_path / "m.onnx"
        onnx.save(linear_model, path)
        a, b, c = hal.load(path), hal.load(path.read_bytes()), hal.load(linear_model)
        assert a.digest == b.digest == c.digest
        assert [i.name for i in a.inputs] == ["x"]
        assert a.inputs[0].shape == ("batch", 8)

    def test_proto_is_copied_not_mutated(self, linear_model):
        before = linear_model.SerializeToString()
        model = hal.load(linear_model)
        model.proto.graph.node.pop()
        assert linear_model.SerializeToString() == before

    def test_requirements(self, linear_model):
        req = hal.load(linear_model).requirements
        assert req.opset == 17
        assert ("", "MatMul", 1) in req.operators and ("", "Add", 1) in req.operators
        assert req.parameter_bytes == (32 + 4) * 4
        assert req.formats == (hal.NumberFormat.FLOAT32,)
        assert ("x", 0, "batch") in req.dynamic_dims
        assert req.estimated_memory_bytes >= req.parameter_bytes

    def test_formats_include_cast_targets(self):
        model = make_model(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN),
             helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT)],
            [("x", TensorProto.FLOAT, [4])], [("z", TensorProto.FLOAT, [4])], opset=19,
        )
        assert hal.NumberFormat.FLOAT8_E4M3FN in hal.load(model).requirements.formats


class TestInputsAndOutputs:
    def test_sequences_and_optionals_are_described_by_their_elements(self):
        model = make_model(
            [helper.make_node("Identity", ["s"], ["t"]), helper.make_node("Identity", ["o"], ["p"])],
            [sequence_info("s", TensorProto.FLOAT, ["n", 3]), optional_info("o", TensorProto.INT64, None, sequence=True)],
            [sequence_info("t", TensorProto.FLOAT, ["n", 3]), optional_info("p", TensorProto.INT64, None, sequence=True)],
            opset=18,
        )
        loaded = hal.load(model)
        s, o = loaded.inputs
        assert (s.kind, s.format, s.shape) == (hal.ValueKind.SEQUENCE, hal.NumberFormat.FLOAT32, ("n", 3))
        assert (o.kind, o.shape, o.kind.is_optional, o.kind.is_sequence) == ("optional-sequence", None, True, True)
        assert s.describe() == "sequence of float32 [n, 3]" and o.describe() == "optional sequence of int64 any shape"
        assert s.to_dict() == {"name": "s", "format": "float32", "shape": ["n", 3], "kind": "sequence"}
        assert [i.name for i in loaded.outputs] == ["t", "p"]
        assert loaded.requirements.dynamic_dims == ()  # a sequence's element sizes are not the model's dims

    def test_a_tensors_record_is_unchanged(self, linear_model):
        (x,) = hal.load(linear_model).inputs
        assert x.kind is hal.ValueKind.TENSOR and x.describe() == "float32 [batch, 8]"
        assert x.to_dict() == {"name": "x", "format": "float32", "shape": ["batch", 8]}


class TestBadFiles:
    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"", "empty"),
            (b"\x00\x01garbage\xff\xfe" * 50, "not a valid ONNX model|does not look like an ONNX model"),
            (b"hello world, this is a text file\n", "not a valid ONNX model|does not look like an ONNX model"),
        ],
    )
    def test_empty_and_garbage_files(self, tmp_path, content, message):
        path = tmp_path / "bad.onnx"
        path.write_bytes(content)
        with pytest.raises(ModelError, match=message):
            hal.load(path)

    @pytest.mark.parametrize("keep", [0.3, 0.5, 0.9, 0.99])
    def test_truncated_files(self, tmp_path, linear_model, keep):
        data = linear_model.SerializeToString()
        path = tmp_path / "cut.onnx"
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(ModelError):
            hal.load(path)

    def test_missing_file_and_directory(self, tmp_path):
        with pytest.raises(ModelError, match="does not exist"):
            hal.load(tmp_path / "nope.onnx")
        with pytest.raises(ModelError, match="not a regular file"):
            hal.load(tmp_path)

    def test_size_bound(self, tmp_path, linear_model, monkeypatch):
        path = tmp_path / "m.onnx"
        onnx.save(linear_model, path)
        monkeypatch.setenv("HAL_MAX_MODEL_BYTES", "100")
        with pytest.raises(ModelError, match="over the 100-byte bound"):
            hal.load(path)
        with pytest.raises(ModelError, match="over the 100-byte bound"):
            hal.load(path.read_bytes())

    def test_invalid_graph_is_refused(self):
        model = make_model([helper.make_node("Add", ["x", "nowhere"], ["z"])],
                           [("x", TensorProto.FLOAT, [2])], [("z", TensorProto.FLOAT, [2])])
        with pytest.raises(ModelError, match="not a valid ONNX model"):
            hal.load(model)

    def test_wrong_type(self):
        with pytest.raises(ModelError, match="path, bytes or onnx.ModelProto"):
            hal.load(42)  # type: ignore[arg-type]


class TestExternalData:
    def test_valid_external_data_stays_external_and_runs(self, tmp_path):
        path, w = external_model(tmp_path, offset=16)
        model = hal.load(path)
        (init,) = model.proto.graph.initializer
        assert init.data_location == TensorProto.EXTERNAL and not init.raw_data, "the weights were copied in"
        mapped = model.weights.array(init)
        np.testing.assert_array_equal(mapped, w)
        assert not mapped.flags.writeable, "a view of the mapped file must be read-only"
        exe = hal.compile(model).to("ort:cpu")
        x = np.ones((1, 8), np.float32)
        np.testing.assert_allclose(exe.run({"x": x})["y"], x @ w)

    @pytest.mark.parametrize("location", ["/etc/passwd", "\\\\server\\share\\w.bin", "C:\\weights.bin"])
    def test_absolute_location(self, tmp_path, location):
        path, _ = external_model(tmp_path, location=location)
        with pytest.raises(ModelError, match="absolute"):
            hal.load(path)

    @pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin", "a\\..\\..\\w.bin"])
    def test_parent_directory(self, tmp_path, location):
        path, _ = external_model(tmp_path, location=location)
        with pytest.raises(ModelError, match=r"'\.\.'"):
            hal.load(path)

    def test_symlink(self, tmp_path):
        secret = tmp_path / "outside"
        secret.mkdir()
        (secret / "data.bin").write_bytes(b"\0" * 128)
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        os.symlink(secret / "data.bin", model_dir / "link.bin")
        path, _ = external_model(model_dir, location="link.bin", write_data=False)
        with pytest.raises(ModelError, match="symbolic link"):
            hal.load(path)

    def test_symlinked_directory(self, tmp_path):
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "weights.bin").write_bytes(b"\0" * 128)
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        os.symlink(outside, model_dir / "sub")
        path, _ = external_model(model_dir, location="sub/weights.bin", write_data=False)
        with pytest.raises(ModelError, match="symbolic link"):
            hal.load(path)

    def test_hardlink(self, tmp_path):
        path, _ = external_model(tmp_path)
        os.link(tmp_path / "weights.bin", tmp_path / "elsewhere.bin")
        with pytest.raises(ModelError, match="hard link"):
            hal.load(path)

    @pytest.mark.parametrize(("offset", "length"), [(0, 10_000), (10_000, 4), (120, 16)])
    def test_offset_and_length_must_stay_in_the_file(self, tmp_path, offset, length):
        path, _ = external_model(tmp_path)
        model = onnx.load(path, load_external_data=False)
        tensor = model.graph.initializer[0]
        for entry in tensor.external_data:
            if entry.key == "offset":
                entry.value = str(offset)
            if entry.key == "length":
                entry.value = str(length)
        path.write_bytes(model.SerializeToString())
        with pytest.raises(ModelError, match="past the end"):
            hal.load(path)

    def test_negative_offset(self, tmp_path):
        path, _ = external_model(tmp_path, offset=0)
        model = onnx.load(path, load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "offset":
                entry.value = "-8"
        path.write_bytes(model.SerializeToString())
        with pytest.raises(ModelError, match="negative"):
            hal.load(path)

    def test_missing_data_file(self, tmp_path):
        path, _ = external_model(tmp_path, location="gone.bin")
        with pytest.raises(ModelError, match="does not exist"):
            hal.load(path)

    def test_external_data_in_bytes_needs_a_directory(self, tmp_path):
        path, w = external_model(tmp_path)
        with pytest.raises(ModelError, match="load it from its file path"):
            hal.load(path.read_bytes())
        model = hal.load(path.read_bytes(), base_dir=tmp_path)
        np.testing.assert_array_equal(model.weights.array(model.proto.graph.initializer[0]), w)


def _neg(in_type=TensorProto.FLOAT, in_shape=(2, 3), out_type=TensorProto.FLOAT, out_shape=(2, 3)):
    return make_model([helper.make_node("Neg", ["x"], ["y"])], [("x", in_type, list(in_shape))], [("y", out_type, list(out_shape))])


class TestContradictions:
    """Models onnxruntime would refuse (or answer against their own declarations) are refused at
    load, so `hal inspect` never says a device runs them."""

    @pytest.mark.parametrize(
        ("build", "message"),
        [
            (lambda: _neg(in_type=999), "Invalid tensor data type 999"),
            (lambda: _neg(out_type=999), r"elem type differs from existing elem type: \(1\) vs \(999\)"),
            (lambda: make_model([helper.make_node("Cast", ["x"], ["y"], to=999)], [("x", TensorProto.FLOAT, [2])],
                                [("y", TensorProto.FLOAT, [2])]), "does not specify a valid type"),
            (lambda: make_model([helper.make_node("Add", ["x", "z"], ["y"])],
                                [("x", TensorProto.FLOAT, [2, 3]), ("z", TensorProto.FLOAT, [4, 5])],
                                [("y", TensorProto.FLOAT, [2, 3])]), "Incompatible dimensions"),
            (lambda: _neg(out_shape=(5, 5)), r"existing shape differ in dimension 0: \(2\) vs \(5\)"),
            (lambda: _neg(out_type=TensorProto.INT64), r"differs from existing elem type: \(1\) vs \(7\)"),
        ],
    )
    def test_contradictions_are_a_model_error(self, build, message):
        with pytest.raises(ModelError, match=f"model contradicts itself: .*{message}.*re-export the model"):
            hal.load(build())

    def test_an_element_type_999_initializer_is_refused(self):
        w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
        w.data_type = 999
        model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", TensorProto.FLOAT, [2])],
                           [("y", TensorProto.FLOAT, [2])], initializers=[w])
        with pytest.raises(ModelError, match="999"):
            hal.load(model)

    def test_contradiction_behind_a_large_initializer_is_found(self):
        # Large initializers enter inference as typed inputs (no data): their shapes still count.
        w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
        model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", TensorProto.FLOAT, [2, 64])],
                           [("y", TensorProto.FLOAT, [2, 32])], initializers=[w])
        with pytest.raises(ModelError, match=r"dimension 1: \(64\) vs \(32\)"):
            hal.load(model)

    def test_stale_value_info_is_not_a_reason_to_refuse(self):
        # onnxruntime overwrites declared intermediate shapes with what it infers, and runs the model.
        model = make_model([helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Neg", ["t"], ["y"])],
                           [("x", TensorProto.FLOAT, [2, 3])], [("y", TensorProto.FLOAT, [2, 3])])
        model.graph.value_info.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [7]))
        loaded = hal.load(model)
        assert [v.name for v in loaded.proto.graph.value_info] == ["t"]  # kept as it was

    def test_where_inference_falls_short_the_model_is_left_to_the_runtime(self):
        # onnx 1.23's strict inference fails inside MeanVarianceNormalization's own function body
        # (a Constant it builds); onnxruntime runs the model, so the HAL must load it.
        model = make_model([helper.make_node("MeanVarianceNormalization", ["x"], ["y"])],
                           [("x", TensorProto.FLOAT, [3, 3, 3, 1])], [("y", TensorProto.FLOAT, [3, 3, 3, 1])], opset=13)
        x = np.arange(27, dtype=np.float32).reshape(3, 3, 3, 1)
        y = hal.compile(model).to("ort:cpu", fallback=None).run({"x": x})["y"]
        assert y.shape == (3, 3, 3, 1)

    def test_symbolic_and_custom_domain_models_load(self):
        hal.load(_neg(out_shape=("n", 3)))
        graph = helper.make_graph([helper.make_node("Double", ["x"], ["y"], domain="com.acme")], "acme",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
        hal.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)],
                                   ir_version=9))


class TestBadPaths:
    def test_a_nul_byte_is_a_model_error(self):
        with pytest.raises(ModelError, match="contains a NUL byte"):
            hal.load("a\0.onnx")
