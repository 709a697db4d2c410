"""What a device declares it cannot take, refused before any backend sees the model.

Each check raises :class:`~hal.errors.LoweringError` naming what the model needs, what the device
declares and what to do, so ``to()`` falls back to another device (or, with ``strict=True``, says
why) instead of a backend failing later with a runtime's message:

- :func:`check_operators`: operators in :attr:`Capabilities.unsupported_ops`;
- :func:`check_shapes`: symbolic input dimensions on a device without dynamic shapes;
- :func:`check_memory`: a model whose estimated memory (weights plus the largest set of live
  activations, :func:`hal.model.analyze`) exceeds the device's declared capacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hal.compiler._graph import all_nodes
from hal.errors import LoweringError

if TYPE_CHECKING:
    import onnx

    from hal.capabilities import Capabilities

__all__ = ["check_memory", "check_operators", "check_shapes"]

_ONNX_DOMAINS = ("", "ai.onnx")


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _ONNX_DOMAINS else f"{node.domain}:{node.op_type}"


def check_operators(proto: onnx.ModelProto, capabilities: Capabilities) -> None:
    """Refuse operators (subgraphs included) the device lists as unsupported."""
    if not capabilities.unsupported_ops:
        return
    used = sorted({_op_name(n) for n in all_nodes(proto.graph)} & capabilities.unsupported_ops)
    if used:
        msg = (
            f"the device does not run operator{'s' if len(used) > 1 else ''} {', '.join(used)} (declared "
            "unsupported); let to() fall back to another device, or choose one that runs them"
        )
        raise LoweringError(msg, operators=tuple(used))


def check_shapes(proto: onnx.ModelProto, capabilities: Capabilities) -> None:
    """Refuse symbolic or unknown input dimensions for a device that compiles static shapes only."""
    if capabilities.dynamic_shapes:
        return
    initializers = {t.name for t in proto.graph.initializer}
    dynamic = []
    for value in proto.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            dynamic.append(f"{value.name} (rank unknown)")
            continue
        for axis, dim in enumerate(tensor.shape.dim):
            if not dim.HasField("dim_value"):
                dynamic.append(f"{value.name}[{axis}]={dim.dim_param or '?'}")
    if dynamic:
        msg = (
            f"the device compiles static shapes only, and input dimension{'s' if len(dynamic) > 1 else ''} "
            f"{', '.join(dynamic)} {'are' if len(dynamic) > 1 else 'is'} not fixed; fix them in the model "
            "(onnxruntime.tools.make_dynamic_shape_fixed, or re-export with static shapes) or choose a "
            "device with dynamic shapes"
        )
        raise LoweringError(msg)


def _size(n: int) -> str:
    if n >= 2**27:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 // 8 else f"{n / 2**10:.2f} KiB"


def check_memory(proto: onnx.ModelProto, capabilities: Capabilities) -> None:
    """Refuse a model whose estimated memory exceeds the device's declared capacity (both figures in
    the message). Dynamic dimensions count as 1, so a refusal is never a guess on the high side."""
    capacity = capabilities.memory.capacity_bytes
    if capacity is None:
        return
    from hal.model import analyze

    need = analyze(proto).estimated_memory_bytes
    if need > capacity:
        needs, has = _size(need), _size(capacity)
        if needs == has:
            needs, has = f"{need:,} bytes", f"{capacity:,} bytes"
        msg = (
            f"the model needs about {needs} (weights and the largest set of live activations, "
            f"as lowered for this device) and the device has {has}; choose a device with more "
            "memory, or quantize the weights (hal quantize)"
        )
        raise LoweringError(msg)
