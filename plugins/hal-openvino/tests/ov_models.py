"""Small ONNX models generated with onnx.helper for the plugin's tests (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_IR = {19: 9, 21: 10, 23: 11, 24: 11, 25: 12, 26: 13, 28: 13}


def make(nodes, inputs, outputs, initializers=(), opset: int = 21) -> onnx.ModelProto:
    """A checked model at ``opset`` with the lowest IR version that allows it."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _IR.get(opset, 10)
    onnx.checker.check_model(model)
    return model


def vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def mlp(batch: int = 4, width: int = 64, layers: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Gemm + GELU (erf form) layers; a dynamic batch dimension."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = rng.standard_normal(width).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Gelu", [f"h{i}"], [f"g{i}"]))
        x = f"g{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return make(nodes, [vi("x", TensorProto.FLOAT, ["batch", width])], [vi("y", TensorProto.FLOAT, ["batch", width])], inits, 21)


def conv(seed: int = 1) -> onnx.ModelProto:
    """Conv 3->8 (3x3, pad 1) + Relu + MaxPool + GlobalAveragePool on 1x3x16x16."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(8) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    return make(nodes, [vi("x", TensorProto.FLOAT, [1, 3, 16, 16])], [vi("y", TensorProto.FLOAT, [1, 8, 1, 1])], inits)


def attention(seq: int = 16, dim: int = 32, seed: int = 2) -> onnx.ModelProto:
    """Single-head self-attention: softmax(Q K^T / sqrt(d)) V with projections, then a residual."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for name in ("wq", "wk", "wv"):
        inits.append(numpy_helper.from_array((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32), name))
    inits.append(numpy_helper.from_array(np.array(1 / np.sqrt(dim), np.float32), "scale"))
    nodes += [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["a"], axis=-1),
        helper.make_node("MatMul", ["a", "v"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["y"]),
    ]
    return make(nodes, [vi("x", TensorProto.FLOAT, [2, seq, dim])], [vi("y", TensorProto.FLOAT, [2, seq, dim])], inits)


def long_dot(k: int = 1024) -> onnx.ModelProto:
    """x[1,k] @ w[k,1] with w = 1 + tiny offsets: bf16 compute loses the offsets, f32 keeps them."""
    w = (1.0 + np.arange(k, dtype=np.float32) * 1e-5).reshape(k, 1)
    return make(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [vi("x", TensorProto.FLOAT, [1, k])],
        [vi("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(w, "w")],
    )
