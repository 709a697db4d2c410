"""Models generated with onnx.helper for hal-iree's tests, and helpers they share.

Each model is compiled once per module through module-scoped fixtures to keep the suite quick on
2 cores.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import hal
import hal.plugin


def to_strict(compiled: hal.CompiledModel, device: str, **extra: object) -> hal.Executable:
    """``compiled.to(device)`` with the core's model-level fallback off where the core has one,
    so a CompileError from IREE reaches the test instead of a fallback to ort:cpu."""
    if "strict" in inspect.signature(compiled.to).parameters:
        extra["strict"] = True
    return compiled.to(device, **extra)  # type: ignore[arg-type]


def iree_backend():  # type: ignore[no-untyped-def]
    """The registered IreeBackend instance (its compile_count / cache_hits counters)."""
    return hal.plugin.backend("iree")


def make(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence[int | str]]],
    outputs: Sequence[tuple[str, int, Sequence[int | str] | None]],
    initializers: Sequence[np.ndarray | onnx.TensorProto] | dict[str, np.ndarray] = (),
    opset: int = 17,
    name: str = "model",
) -> onnx.ModelProto:
    """A checked model from nodes, (name, type, shape) inputs/outputs and initializers."""
    inits = (
        [numpy_helper.from_array(v, k) for k, v in initializers.items()]
        if isinstance(initializers, dict)
        else list(initializers)
    )
    graph = helper.make_graph(
        list(nodes),
        name,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model


def _w(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    scale = scale if scale is not None else 1.0 / math.sqrt(shape[0] if len(shape) == 2 else np.prod(shape[1:]))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def mlp_model(batch: int = 8, width: int = 64, hidden: int = 128, out: int = 32, layers: int = 1) -> onnx.ModelProto:
    """Gemm -> GELU (Erf form) -> MatMul + Add -> Tanh; ``layers`` repeats the first block."""
    rng = np.random.default_rng(0)
    nodes, inits = [], {}
    cur = "x"
    dim = width
    for i in range(layers):
        inits[f"w{i}"], inits[f"b{i}"] = _w(rng, dim, hidden), _w(rng, hidden, scale=0.1)
        nodes += [
            helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"g{i}"]),
            helper.make_node("Div", [f"g{i}", "sqrt2"], [f"d{i}"]),
            helper.make_node("Erf", [f"d{i}"], [f"e{i}"]),
            helper.make_node("Add", [f"e{i}", "one"], [f"a{i}"]),
            helper.make_node("Mul", [f"g{i}", f"a{i}"], [f"m{i}"]),
            helper.make_node("Mul", [f"m{i}", "half"], [f"h{i}"]),
        ]
        cur, dim = f"h{i}", hidden
    inits["sqrt2"] = np.array(math.sqrt(2.0), np.float32)
    inits["one"] = np.array(1.0, np.float32)
    inits["half"] = np.array(0.5, np.float32)
    inits["wo"], inits["bo"] = _w(rng, dim, out), _w(rng, out, scale=0.1)
    nodes += [
        helper.make_node("MatMul", [cur, "wo"], ["mo"]),
        helper.make_node("Add", ["mo", "bo"], ["logits"]),
        helper.make_node("Tanh", ["logits"], ["y"]),
    ]
    return make(
        nodes,
        [("x", TensorProto.FLOAT, [batch, width])],
        [("y", TensorProto.FLOAT, [batch, out]), ("logits", TensorProto.FLOAT, [batch, out])],
        inits,
        name="mlp",
    )


def conv_model(opset: int = 17, batchnorm: bool = False) -> onnx.ModelProto:
    """Conv-(BatchNorm)-Relu-MaxPool-Conv-Relu-GlobalAveragePool-Flatten-Gemm on 1x3x32x32."""
    rng = np.random.default_rng(1)
    inits = {
        "c1": _w(rng, 8, 3, 3, 3), "c1b": _w(rng, 8, scale=0.1),
        "c2": _w(rng, 16, 8, 3, 3), "c2b": _w(rng, 16, scale=0.1),
        "fc": _w(rng, 16, 10), "fcb": _w(rng, 10, scale=0.1),
    }
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["h1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
    first = "h1"
    if batchnorm:
        inits.update(
            bn_s=(1 + 0.1 * rng.standard_normal(8)).astype(np.float32), bn_b=_w(rng, 8, scale=0.1),
            bn_m=_w(rng, 8, scale=0.1), bn_v=(1 + rng.random(8)).astype(np.float32),
        )
        nodes.append(helper.make_node("BatchNormalization", ["h1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]))
        first = "bn"
    nodes += [
        helper.make_node("Relu", [first], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2", "c2b"], ["h2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"]),
    ]
    return make(
        nodes, [("x", TensorProto.FLOAT, [1, 3, 32, 32])], [("y", TensorProto.FLOAT, [1, 10])], inits,
        opset=opset, name="convnet",
    )


def attention_model(batch: int = 2, seq: int = 16, d: int = 32) -> onnx.ModelProto:
    """Single-head self-attention with residual and LayerNormalization on (batch, seq, d)."""
    rng = np.random.default_rng(2)
    inits = {k: _w(rng, d, d) for k in ("wq", "wk", "wv", "wo")}
    inits["scale"] = np.array(1.0 / math.sqrt(d), np.float32)
    inits["ln_s"] = np.ones(d, np.float32)
    inits["ln_b"] = np.zeros(d, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "ln_s", "ln_b"], ["y"], axis=-1),
    ]
    return make(
        nodes, [("x", TensorProto.FLOAT, [batch, seq, d])], [("y", TensorProto.FLOAT, [batch, seq, d])], inits,
        name="attention",
    )


def feeds_for(compiled: hal.CompiledModel, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 feeds matching a compiled model's (static) inputs."""
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in compiled.inputs}
