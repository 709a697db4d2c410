"""Testing helpers for onnx-hal and for plugin authors.

``hal.testing.models`` builds deterministic ONNX models in code (no downloads): the benchmark
models (an MLP, a ResNet-18-like CNN, a transformer encoder) at full or small size, and
``zoo()`` / ``random_feeds()`` for agreement tests between devices.

The conformance kit (a pytest plugin a vendor's test suite enables) will live here too; it has
no public API yet.
"""

from __future__ import annotations

__all__: list[str] = []
