"""Records of what placement did to a model: lowering steps, placements, and the lowered model a
backend's ``prepare`` receives.

They sit below the compiler and the runtime, which both read them (the compiler writes steps,
the executable shows them, the ranking reads their kinds).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

if TYPE_CHECKING:
    import onnx

    from hal.model import TensorInfo
    from hal.weights import Weights

__all__ = ["LoweredModel", "LoweringStep", "Placement", "StepKind"]


class StepKind(str, enum.Enum):
    """What a :class:`LoweringStep` did. A ``str`` enum: ``step.kind == "fallback"`` holds, and
    JSON writes the value."""

    # hardware-independent optimization, once at compile
    INFER_SHAPES = "infer-shapes"
    FOLD_CONSTANTS = "fold-constants"
    ELIMINATE_IDENTITY = "eliminate-identity"
    REMOVE_DEAD_NODES = "remove-dead-nodes"
    REMOVE_UNUSED_INITIALIZERS = "remove-unused-initializers"
    # lowering for one device: these keep every operator's meaning ...
    CONVERT_OPSET = "convert-opset"
    IR_VERSION = "ir-version"
    # ... these change how the model computes
    LEGALIZE_FORMAT = "legalize-format"
    LEGALIZE_FORMAT_SKIPPED = "legalize-format-skipped"
    #: FP8 weights fitted exactly: dequantized at compile time, FN to FNUZ, scales converted
    LEGALIZE_SCALED = "legalize-scaled"
    #: FP8 weights requantized for the device's scale format: lossy, its error in the detail
    REQUANTIZE = "requantize"
    # placement
    FALLBACK = "fallback"
    VERIFIED = "verified"
    UNVERIFIED = "unverified"
    #: why ``to("auto", policy=...)`` chose the device (its measured figure against the others)
    SELECTED = "selected"

    def __str__(self) -> str:
        return self.value

    @property
    def keeps_meaning(self) -> bool:
        """True for steps after which every operator means what it meant (the ranking does not
        count them against a device)."""
        return self in _MEANING_KEEPING


_MEANING_KEEPING = frozenset({StepKind.CONVERT_OPSET, StepKind.IR_VERSION})


@frozen
class Placement:
    """Which device ran which nodes (node names, or ``op_type#index`` for unnamed nodes)."""

    device: str
    nodes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "nodes": list(self.nodes)}


@frozen
class LoweringStep:
    """One change made to fit the model to a device, and why."""

    kind: StepKind = field(converter=StepKind)
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "detail": self.detail}


@frozen
class LoweredModel:
    """The model as :meth:`hal.Backend.prepare` receives it: lowered for the device, with what the
    core already knows, so no plugin re-reads the graph or re-hashes it.

    ``proto`` has its opsets in the device's declared range and its element types legalized for
    the device's declared formats. Tensors the model stores as external data stay external in
    ``proto``; their bytes are in ``weights`` (:class:`hal.weights.Weights`: the checked files,
    open and mapped read-only; None when the model holds every tensor itself). Never resolve an
    external data location yourself (nor let onnx do it: ``numpy_helper.to_array`` opens the path
    relative to the current directory): read ``weights.array(tensor)``, or call
    :meth:`self_contained` for one protobuf with the bytes inside (up to 2 GiB).

    ``inputs`` and ``outputs`` are the graph's (initializers excluded), ``digest`` a sha256 (hex)
    over ``proto.SerializeToString(deterministic=True)`` and the external data's bytes — name
    artifacts by it — and ``steps`` what lowering changed. Do not modify ``proto``: it may be
    shared with the caller's model.
    """

    proto: onnx.ModelProto = field(eq=False, repr=False)
    inputs: tuple[TensorInfo, ...] = field(converter=tuple)
    outputs: tuple[TensorInfo, ...] = field(converter=tuple)
    digest: str
    steps: tuple[LoweringStep, ...] = field(default=(), converter=tuple)
    weights: Weights | None = field(default=None, eq=False, repr=False)

    def self_contained(self) -> onnx.ModelProto:
        """``proto`` with the external data's bytes inside it, for a runtime that takes one
        message: ``proto`` itself when nothing is external. Raises
        :class:`~hal.errors.ModelError` past protobuf's 2 GiB: take ``weights`` instead."""
        return self.proto if self.weights is None else self.weights.inline(self.proto)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, steps: tuple[LoweringStep, ...] = ()) -> LoweredModel:
        """The record for ``proto`` as it is, its inputs, outputs and digest read from it: for a
        backend's own tests, which call ``prepare`` without the core. (The core builds the record
        from what it already knows.)"""
        from hal.model import Model

        model = Model(proto)
        return cls(proto, model.inputs, model.outputs, model.digest, steps)
