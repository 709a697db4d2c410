"""A minimal onnx-hal plugin: one device, ``example:reference``, that runs models on ONNX's
pure-Python reference evaluator. Slow, exact, and short enough to read in one sitting.

The whole contract is one hook, ``hal_register_backends``, and one class with two methods. A
plugin imports ``hal`` and the SDK module ``hal.plugin``, nothing else from onnx-hal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hal.plugin import (
    Backend, Capabilities, CompileError, CompileOptions, Device, DeviceKind, LoweredModel, OpsetRange,
    hookimpl,
)


class ReferenceRunner:
    """What ``prepare`` returns: ``run(feeds, output_names) -> list of arrays``.

    ``run`` may be called from many threads at once (the evaluator keeps no state between runs),
    and each output it returns must belong to the caller alone.
    """

    def __init__(self, model: Any) -> None:
        from onnx.reference import ReferenceEvaluator  # the "vendor runtime", imported lazily

        self._session = ReferenceEvaluator(model)

    def run(self, feeds: dict[str, Any], output_names: Sequence[str]) -> list[Any]:
        # The evaluator may return views of its constants or of the caller's inputs (Reshape
        # does): a copy keeps a caller's writes out of the model and out of its own inputs.
        return [np.array(value, copy=True) for value in self._session.run(list(output_names), feeds)]


class ReferenceBackend(Backend):
    name = "example"  # device ids start with "example:"

    @property
    def version(self) -> str:
        import onnx

        return onnx.__version__

    def discover(self) -> list[Device]:
        capabilities = Capabilities.from_levels(
            native=["float32", "float64", "int32", "int64", "bool"],
            emulated=["float16"],
            opsets=OpsetRange(7, 25),
        )
        return [
            Device(
                id="example:reference",
                backend=self.name,
                vendor="ONNX",
                name="reference evaluator",
                kind=DeviceKind.CPU,
                capabilities=capabilities,
            )
        ]

    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> ReferenceRunner:
        # The core has already converted model.proto into opsets 7-25 and refused formats the
        # capabilities above do not declare; it verifies this device's answers after prepare.
        try:
            return ReferenceRunner(model.self_contained())  # external data read into the model
        except Exception as exc:
            msg = f"the reference evaluator cannot load the model for {device.id}: {exc}"
            raise CompileError(msg) from exc


@hookimpl
def hal_register_backends(register):  # type: ignore[no-untyped-def]
    register(ReferenceBackend())
