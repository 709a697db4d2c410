"""onnx-hal plugin for IREE: ONNX models compiled to a ``.vmfb`` and run by the IREE runtime.

Devices: ``iree:local-task`` (llvm-cpu, host CPU features) and ``iree:cuda``, ``iree:hip``,
``iree:vulkan`` (available when their driver can create a device). Installing the distribution
(``pip install hal-iree``) is all it takes: the ``hal`` entry point ``iree = hal_iree`` registers
the backend. Importing this module is cheap; IREE itself is imported only when a device is
discovered or a model is prepared.

Backend options, passed as ``compiled.to("iree:local-task", **extra)``, are documented on
:class:`hal_iree.backend.IreeBackend` and in the README.
"""

from __future__ import annotations

from typing import Any

from hal.plugin import hookimpl
from hal_iree.backend import IREE_CPU_CAPABILITIES, IreeBackend

__version__ = "0.1.0"
__all__ = ["IREE_CPU_CAPABILITIES", "IreeBackend", "__version__"]


@hookimpl
def hal_register_backends(register: Any) -> None:
    """Register the one IREE backend (device ids ``iree:<driver>``)."""
    register(IreeBackend())
