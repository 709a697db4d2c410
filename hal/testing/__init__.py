"""Testing helpers for onnx-hal and for plugin authors.

``hal.testing.models`` builds deterministic ONNX models in code (no downloads): the benchmark
models (an MLP, a ResNet-18-like CNN, a transformer encoder) at full or small size, and
``zoo()`` / ``random_feeds()`` for agreement tests between devices.

``hal.testing.conformance`` runs the ONNX node test cases defined in the onnx package through
the HAL, on each device (strict) and through ``to("auto")``, and compares outputs as onnx's own
backend runner does: a plugin author's first measure of how much of ONNX their device covers
(``python benchmarks/conformance.py``). A pytest plugin wrapping it for vendors' suites is future
work.
"""

from __future__ import annotations

__all__: list[str] = []
