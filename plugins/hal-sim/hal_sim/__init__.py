"""onnx-hal plugin: simulated chips. Backend ``sim``, devices ``sim:<profile>:<n>``.

Each simulated device is built from a chip profile (a TOML data file, :mod:`hal_sim.profile`),
chosen with ``HAL_SIM_DEVICES=h100,ascend-910c:2``; the core enforces what the profile declares,
onnxruntime computes on the CPU, and :mod:`hal_sim.faults` injects reproducible faults and paces
runs to a roofline estimate. Importing this module is cheap: onnxruntime is imported only when a
device is discovered or a model prepared. See README.md beside this package.
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
    """Register the ``sim`` backend."""
    from hal_sim.backend import SimBackend

    register(SimBackend())
