"""Hardware-independent graph passes: ModelProto in, a new ModelProto and what changed out.

``hal.compile`` runs :func:`optimize` once; ``compiled.to(device)`` runs :func:`lower_for` with
the device's :class:`~hal.capabilities.Capabilities`. Every function returns
``(proto, steps)`` where ``steps`` is a list of :class:`~hal.executable.LoweringStep` (empty when
nothing changed) and never modifies the proto it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hal.compiler.graph_io import check_io
from hal.compiler.legalize import legalize_formats
from hal.compiler.limits import check_memory, check_operators, check_shapes
from hal.compiler.scaled import legalize_scaled
from hal.compiler.opset import check_domains, convert_opset
from hal.compiler.optimize import optimize

if TYPE_CHECKING:
    import onnx

    from hal.capabilities import Capabilities
    from hal.lowering import LoweringStep

__all__ = [
    "check_domains", "check_io", "check_memory", "check_operators", "check_shapes", "convert_opset",
    "legalize_formats", "legalize_scaled", "lower_for", "optimize",
]


def lower_for(
    proto: onnx.ModelProto, capabilities: Capabilities, *, reduced_precision: bool = False
) -> tuple[onnx.ModelProto, list[LoweringStep]]:
    """Fit ``proto`` to a device: refuse graph inputs and outputs it cannot pass (:func:`check_io`),
    operator domains it does not declare (:func:`check_domains`) and symbolic input dimensions it
    cannot compile (:func:`check_shapes`); :func:`convert_opset` into ``capabilities.opsets``, then
    :func:`legalize_scaled` (FP8 weights) and :func:`legalize_formats`; then refuse operators it declares unsupported
    (:func:`check_operators`) and a result larger than its memory (:func:`check_memory`). Raises
    :class:`~hal.errors.LoweringError` when any cannot. ``reduced_precision`` allows changing
    values for the device's native path (FP8 requantized to its scale format); never otherwise."""
    check_io(proto, capabilities)
    check_domains(proto, capabilities.opsets)
    check_shapes(proto, capabilities)
    proto, steps = convert_opset(proto, capabilities.opsets)
    proto, scaled = legalize_scaled(proto, capabilities, reduced_precision=reduced_precision)
    proto, more = legalize_formats(proto, capabilities)
    check_operators(proto, capabilities)
    check_memory(proto, capabilities)
    return proto, [*steps, *scaled, *more]
