"""onnx-hal plugin for NVIDIA GPUs: backend ``cuda``, devices ``cuda:0``, ``cuda:1``, ...

Importing this module is cheap: pynvml and onnxruntime are imported, and CUDA libraries loaded,
only when the backend discovers devices or prepares a model. See README.md beside this package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import hal

if TYPE_CHECKING:
    from hal.plugin import Backend

__version__ = "0.1.0"


@hal.hookimpl
def hal_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the ``cuda`` backend."""
    from hal_nvidia.backend import CudaBackend

    register(CudaBackend())
