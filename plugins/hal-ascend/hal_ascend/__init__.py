"""onnx-hal plugin for Huawei Ascend NPUs: backend ``ascend``, devices ``ascend:0``, ``ascend:1``, ...

Importing this module is cheap: onnxruntime is imported and libascendcl loaded only when the
backend discovers devices or prepares a model. See README.md beside this package.
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
    """Register the ``ascend`` backend."""
    from hal_ascend.backend import AscendBackend

    register(AscendBackend())
