"""Deterministic ONNX models generated in code, for tests and benchmarks.

Every builder returns an :class:`onnx.ModelProto` (opset 17, IR version 8, float32, static shapes)
whose weights are float32 initializers drawn from a fixed seed, so the same arguments always give
byte-identical models. Defaults are the benchmark sizes of ``benchmarks/backends.py``:

- :func:`mlp` — 4 Linear layers 1024x1024 (MatMul + Add) with GELU between, batch 32;
- :func:`resnet18_like` — the ResNet-18 topology with BatchNormalization kept as separate
  inference-form ops (as exported models have them), input 1x3x224x224, 1000 classes;
- :func:`transformer_encoder` — post-norm encoder layers: multi-head self-attention, LayerNorm,
  GELU feed-forward, residuals; batch 8, sequence 128, d_model 256, 4 heads, 4 layers;
- :func:`add` — one Add, the smallest useful model;
- :func:`fp8_block_scaled_mlp` — an MLP already in FP8 with float32 128x128 block scales, the
  DeepSeek-V3 layout in standard ONNX (opset 21), for UE8M0 requantization.

GELU is written with Erf/Mul/Add because the Gelu operator only exists from opset 20.
:func:`zoo` returns small versions of all of them with feeds, sized so that a test running each
model on several devices stays within seconds; :func:`random_feeds` makes inputs for any model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "IR_VERSION",
    "OPSET",
    "add",
    "fp8_block_scaled_mlp",
    "mlp",
    "random_feeds",
    "resnet18_like",
    "transformer_encoder",
    "zoo",
]

#: Opset 17 has LayerNormalization and is accepted by onnxruntime, OpenVINO and IREE's importer.
OPSET = 17
#: IR 8 is what opset 17 needs at least; newer IR versions are refused by older runtimes.
IR_VERSION = 8


class _GraphBuilder:
    """Accumulates nodes and float32 initializers with unique names; ``model()`` finishes it."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def normal(self, hint: str, shape: Sequence[int], std: float) -> str:
        return self.const(hint, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def uniform(self, hint: str, shape: Sequence[int], low: float, high: float) -> str:
        return self.const(hint, self.rng.uniform(low, high, shape).astype(np.float32))

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs: object) -> str:
        out = output or self.fresh(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=self.fresh(op_type), **attrs)  # type: ignore[arg-type]
        )
        return out

    def model(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, list(inputs), list(outputs), self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="hal.testing.models",
        )
        onnx.checker.check_model(model)
        return model

    # -- layers shared by the models ----------------------------------------------------------

    def linear(self, x: str, fan_in: int, fan_out: int) -> str:
        """``x @ W + b`` with W [fan_in, fan_out]; MatMul + Add is what exporters emit for 3-D input."""
        w = self.normal("weight", (fan_in, fan_out), 1.0 / math.sqrt(fan_in))
        b = self.normal("bias", (fan_out,), 0.02)
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def gelu(self, x: str) -> str:
        """Exact GELU, ``0.5 * x * (1 + erf(x / sqrt(2)))``, in opset-17 operators."""
        inv_sqrt2 = self.const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))
        one = self.const("one", np.array(1.0, dtype=np.float32))
        half = self.const("half", np.array(0.5, dtype=np.float32))
        erf = self.op("Erf", [self.op("Mul", [x, inv_sqrt2])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, one])]), half])


def _input(name: str, shape: Sequence[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


# -- the models ------------------------------------------------------------------------------------


def add(shape: Sequence[int] = (4,)) -> onnx.ModelProto:
    """``y = a + b`` for two float32 inputs of ``shape``."""
    g = _GraphBuilder("add", seed=0)
    g.op("Add", ["a", "b"], output="y")
    return g.model([_input("a", shape), _input("b", shape)], [_input("y", shape)])


def mlp(batch: int = 32, width: int = 1024, layers: int = 4, *, seed: int = 0) -> onnx.ModelProto:
    """``layers`` Linear layers ``width x width`` (MatMul + Add) with GELU between them.

    Input ``x`` [batch, width], output ``y`` [batch, width]. Weights are N(0, 1/width) so that
    activations stay of order one through the stack. Layer ``i`` has initializers named
    ``weight_*``/``bias_*`` in order, which is how a reference implementation finds them.
    """
    g = _GraphBuilder("mlp", seed)
    h = "x"
    for i in range(layers):
        h = g.linear(h, width, width)
        if i < layers - 1:
            h = g.gelu(h)
    g.op("Identity", [h], output="y")
    return g.model([_input("x", (batch, width))], [_input("y", (batch, width))])


def _batch_norm(g: _GraphBuilder, x: str, channels: int) -> str:
    # Inference-form statistics, as a trained and exported model has them; gamma below one keeps
    # the residual stream from growing through the eight blocks.
    scale = g.uniform("bn_scale", (channels,), 0.3, 0.7)
    bias = g.normal("bn_bias", (channels,), 0.05)
    mean = g.normal("bn_mean", (channels,), 0.05)
    var = g.uniform("bn_var", (channels,), 0.5, 1.5)
    return g.op("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5)


def _conv(g: _GraphBuilder, x: str, c_in: int, c_out: int, kernel: int, stride: int) -> str:
    # He initialisation; no bias, as in torchvision (the following BatchNormalization has one).
    w = g.normal("conv_weight", (c_out, c_in, kernel, kernel), math.sqrt(2.0 / (c_in * kernel * kernel)))
    pad = kernel // 2
    return g.op(
        "Conv", [x, w], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad, pad, pad, pad]
    )


def _basic_block(g: _GraphBuilder, x: str, c_in: int, c_out: int, stride: int) -> str:
    h = g.op("Relu", [_batch_norm(g, _conv(g, x, c_in, c_out, 3, stride), c_out)])
    h = _batch_norm(g, _conv(g, h, c_out, c_out, 3, 1), c_out)
    shortcut = x
    if stride != 1 or c_in != c_out:
        shortcut = _batch_norm(g, _conv(g, x, c_in, c_out, 1, stride), c_out)
    return g.op("Relu", [g.op("Add", [h, shortcut])])


def resnet18_like(
    batch: int = 1, size: int = 224, *, width: int = 64, classes: int = 1000, seed: int = 0
) -> onnx.ModelProto:
    """The ResNet-18 topology: conv 7x7 stride 2, max-pool, four stages of two BasicBlocks with
    ``width`` x 1/2/4/8 channels (1x1 downsample convs where the shape changes), global average
    pool and a Gemm to ``classes`` logits.

    Input ``x`` [batch, 3, size, size], output ``logits`` [batch, classes]. ``size`` must be a
    multiple of 32; ``width`` below 64 makes a cheaper model with the same structure.
    """
    if size % 32:
        msg = f"size must be a multiple of 32 (five stride-2 steps), got {size}"
        raise ValueError(msg)
    g = _GraphBuilder("resnet18_like", seed)
    h = g.op("Relu", [_batch_norm(g, _conv(g, "x", 3, width, 7, 2), width)])
    h = g.op("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        c_out = width * mult
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h = _basic_block(g, h, c_in, c_out, stride)
            c_in = c_out
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h])], axis=1)
    w = g.normal("fc_weight", (classes, c_in), 1.0 / math.sqrt(c_in))
    b = g.normal("fc_bias", (classes,), 0.02)
    g.op("Gemm", [h, w, b], output="logits", transB=1)
    return g.model([_input("x", (batch, 3, size, size))], [_input("logits", (batch, classes))])


def _layer_norm(g: _GraphBuilder, x: str, d_model: int) -> str:
    scale = g.uniform("ln_scale", (d_model,), 0.8, 1.2)
    bias = g.normal("ln_bias", (d_model,), 0.02)
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)


def _attention(g: _GraphBuilder, x: str, batch: int, seq: int, d_model: int, heads: int) -> str:
    head_dim = d_model // heads
    split = g.const("split_heads", np.array([batch, seq, heads, head_dim], dtype=np.int64))
    merge = g.const("merge_heads", np.array([batch, seq, d_model], dtype=np.int64))

    def project(perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [g.linear(x, d_model, d_model), split])], perm=perm)

    q = project([0, 2, 1, 3])  # [B, H, S, Dh]
    k_t = project([0, 2, 3, 1])  # [B, H, Dh, S]
    v = project([0, 2, 1, 3])
    scale = g.const("attn_scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))
    scores = g.op("Mul", [g.op("MatMul", [q, k_t]), scale])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])  # [B, H, S, Dh]
    merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
    return g.linear(merged, d_model, d_model)


def transformer_encoder(
    batch: int = 8,
    seq: int = 128,
    d_model: int = 256,
    heads: int = 4,
    layers: int = 4,
    ff: int = 1024,
    *,
    seed: int = 0,
) -> onnx.ModelProto:
    """``layers`` post-norm transformer encoder layers (as ``torch.nn.TransformerEncoderLayer``
    with ``norm_first=False``, GELU): ``x = LN(x + MHA(x)); x = LN(x + FFN(x))``.

    Attention is spelled out as exporters emit it: Q/K/V projections, Reshape/Transpose into
    heads, MatMul, scale by 1/sqrt(head_dim), Softmax, MatMul, merge heads, output projection.
    Input ``x`` [batch, seq, d_model], output ``y`` of the same shape. No mask, no embedding.
    """
    if d_model % heads:
        msg = f"d_model ({d_model}) must be divisible by heads ({heads})"
        raise ValueError(msg)
    g = _GraphBuilder("transformer_encoder", seed)
    h = "x"
    for _ in range(layers):
        h = _layer_norm(g, g.op("Add", [h, _attention(g, h, batch, seq, d_model, heads)]), d_model)
        ffn = g.linear(g.gelu(g.linear(h, d_model, ff)), ff, d_model)
        h = _layer_norm(g, g.op("Add", [h, ffn]), d_model)
    g.op("Identity", [h], output="y")
    shape = (batch, seq, d_model)
    return g.model([_input("x", shape)], [_input("y", shape)])


# -- feeds and the zoo ---------------------------------------------------------------------------


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One array per graph input of ``model`` (initializers excluded), drawn from ``seed``.

    Floats are standard normal, integers in [0, 10), booleans fair coin flips. Dynamic or unknown
    dimensions are given size 1.
    """
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor_type.shape.dim)
        if dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 10, shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def fp8_block_scaled_mlp(
    batch: int = 4, width: int = 256, layers: int = 2, *, block: int = 128, seed: int = 0
) -> onnx.ModelProto:
    """An MLP whose weights are already FP8 with float32 block scales, as DeepSeek-V3 ships them.

    Each layer is ``Gemm(x, W, bias, transB=1)`` with ``W`` [out, in] = ``width x width``
    (``width`` need not be a multiple of ``block``) coming from ``DequantizeLinear(W_fp8,
    W_scale_inv, axis=1, block_size=block)``: float8_e4m3fn values and one float32 scale per
    ``block x block`` block (``amax / 448``), stored expanded to [out, ceil(in / block)] (each
    block's scale repeated for its ``block`` rows), which is how a 2-D block scale is written in
    standard ONNX. Opset 21, IR 10; Relu between layers; input ``x`` [batch, width], output ``y``.
    """
    import ml_dtypes

    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []
    h = "x"
    blocks = -(-width // block)
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / math.sqrt(width)).astype(np.float32)
        padded = np.zeros((blocks * block, blocks * block), np.float32)
        padded[:width, :width] = np.abs(w)
        amax = padded.reshape(blocks, block, blocks, block).max(axis=(1, 3))
        scale = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
        expanded = np.repeat(scale, block, axis=0)[:width]  # [out, ceil(in / block)]
        full = np.repeat(expanded, block, axis=1)[:, :width]
        q = np.clip(w / full, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
        q_tensor = TensorProto(name=f"layer{i}.weight", data_type=TensorProto.FLOAT8E4M3FN, dims=[width, width])
        q_tensor.raw_data = q.view(np.uint8).tobytes()
        initializers += [
            q_tensor,
            numpy_helper.from_array(expanded, f"layer{i}.weight_scale_inv"),
            numpy_helper.from_array((rng.standard_normal(width) * 0.02).astype(np.float32), f"layer{i}.bias"),
        ]
        nodes.append(helper.make_node(
            "DequantizeLinear", [f"layer{i}.weight", f"layer{i}.weight_scale_inv"], [f"layer{i}.w"],
            name=f"layer{i}.dequantize", axis=1, block_size=block,
        ))
        out = "y" if i == layers - 1 else f"layer{i}.out"
        nodes.append(helper.make_node("Gemm", [h, f"layer{i}.w", f"layer{i}.bias"], [f"layer{i}.gemm" if out != "y" else "y"],
                                      name=f"layer{i}.gemm", transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"layer{i}.gemm"], [out], name=f"layer{i}.relu"))
            h = out
    graph = helper.make_graph(nodes, "fp8_block_scaled_mlp", [_input("x", (batch, width))], [_input("y", (batch, width))], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10, producer_name="hal.testing.models")
    onnx.checker.check_model(model)
    return model


#: Small sizes: the same structure as the benchmark models at a fraction of the cost.
_SMALL = {
    "add": lambda: add((4,)),
    "mlp": lambda: mlp(batch=4, width=64, layers=4),
    # 64x64 leaves a 4x4 map entering the last stage (224x224: 14x14). At 32x32 that stage's
    # stride-2 3x3 conv would see 2x2, an edge case the benchmark model never has and that IREE
    # fails to compile ("'linalg.generic' op inferred ... dimension #2 to be 4, but found 3").
    "resnet18_like": lambda: resnet18_like(batch=1, size=64, width=8, classes=10),
    "transformer_encoder": lambda: transformer_encoder(batch=2, seq=16, d_model=32, heads=4, layers=2, ff=64),
}

#: Benchmark sizes (the builders' defaults).
_FULL = {
    "add": lambda: add((1024,)),
    "mlp": mlp,
    "resnet18_like": resnet18_like,
    "transformer_encoder": transformer_encoder,
}


def zoo(small: bool = True, seed: int = 0) -> dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    """``{name: (model, feeds)}`` for every model here: small sizes for tests (the default, a few
    milliseconds per run on a CPU) or the benchmark sizes with ``small=False``. Feeds come from
    :func:`random_feeds` with ``seed``."""
    builders = _SMALL if small else _FULL
    out = {}
    for name, build in builders.items():
        model = build()
        out[name] = (model, random_feeds(model, seed))
    return out
