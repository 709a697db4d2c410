"""onnx-hal plugin for the OpenVINO runtime: devices ``openvino:CPU``, ``openvino:GPU``, ``openvino:NPU``...

Installed with ``pip install hal-openvino``; the ``hal`` entry point ``openvino = hal_openvino``
registers :class:`hal_openvino.backend.OpenVinoBackend`. Importing this module does not import
``openvino``: that happens on discovery and compilation only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hal.plugin import hookimpl
from hal_openvino.backend import OpenVinoBackend

if TYPE_CHECKING:
    from hal.plugin import Backend

__version__ = "0.1.0"

__all__ = ["OpenVinoBackend", "__version__", "hal_register_backends"]


@hookimpl
def hal_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the OpenVINO backend (device discovery happens later, when the host asks)."""
    register(OpenVinoBackend())
