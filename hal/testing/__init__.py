"""Testing for onnx-hal and for plugin authors; also the backend contract kit, a pytest plugin.

The contract kit
================

A vendor proves a plugin right by running the kit on its devices, from its own test suite::

    pytest -p hal.testing --hal-device acme:0                 # one device
    pytest -p hal.testing --hal-device acme:0 --hal-device acme:1
    pytest -p hal.testing --hal-device all-available          # every device hal.devices() finds

``-p hal.testing`` works from any directory (the plugin is also registered as the ``pytest11``
entry point ``hal.testing``, so ``-p no:hal.testing`` turns it off); without ``--hal-device`` it
does nothing. The kit's tests (:mod:`hal.testing.contract`) are added to the session after the
vendor's own and parametrized by device id; ``-k``, ``-m`` and ``--lf`` select among them as
usual. A vendor's own tests may ask for the ``hal_device`` fixture (the :class:`hal.Device` under
test) and run once per ``--hal-device``. ``--hal-node-every N`` chooses how many ONNX node test
cases run (every N-th by name; default 10, 1 runs all 1884 of onnx 1.23).

What it checks, for each device, from what the device reports (never from the machine it runs
on):

- **discovery** — every field of the :class:`hal.Device` is filled and round-trips through JSON;
  the capabilities are consistent (movable and block-scaled formats are storable, the opset range
  is sane); discovery is repeatable; every unavailable device of the backend says why;
- **errors** — unknown devices, bad feeds, caller mistakes, models the device cannot compile and
  models that fail at run time all raise a :class:`hal.errors.HalError`;
- **feeds as users have them** — read-only (``np.frombuffer``, ``flags.writeable = False``),
  strided and reversed views, Fortran order, zero-stride broadcast views, memory-mapped ``.npy``,
  zero-size arrays, a mix of kinds in one call, and arrays deleted right after ``run``, on a model
  with two inputs; outputs never alias the backend's buffers or the feeds (a second run does not
  change the first result; writing to a result does not change the next);
- **threads** — 8 threads x 200 runs of one :class:`hal.Executable` with distinct inputs: every
  answer right, no error;
- **declared capabilities hold** — each ``native``/``emulated`` format computes (Add, and MatMul
  where ONNX defines it for the format), each ``storage`` format converts and moves exactly
  (``Cast`` to the format the device computes it in; ``Reshape``/``Transpose``/``Identity`` where
  it is ``movable``), each ``none`` format is refused with a ``HalError`` or, if lowered, answers
  exactly; never a crash or a wrong answer; each declared ``io_kinds`` kind (sequences,
  optionals) passes in and out unchanged, fed read-only, strided and Fortran-ordered arrays, empty
  and absent;
- **the precision contract** — at the default precision, float32 models with Conv (a ResNet-like
  CNN), MatMul (an MLP), attention (a transformer encoder), and int8 and float8 block-dequantized
  weights (DequantizeLinear with ``block_size`` + MatMul; plus every block-scaled format the device
  declares) match the ONNX reference evaluator or numpy within the float32 tolerance of placement
  verification (:data:`hal.testing.contract.FLOAT32`): ``max|got - want| <= 1e-6 + 1e-4 *
  max|want|`` per output (runtimes differ by about 5e-7 of the largest output on these models,
  computing in bfloat16 by about 4e-3);
- **external weights** — a model whose every tensor is in a data file (``size_threshold=0``),
  including those a runtime's graph optimizer reads (a Transpose of a weight, GELU's constants, a
  Reshape's shape), answers as the reference within that tolerance, placed cold and again warm;
- **ONNX node test cases** — the cases onnx defines in code, with inputs fed as read from their
  ``.pb`` files and read-only: every failure must be a ``HalError``; pass / wrong / error counts
  are reported after the run, and asserted only where the device declares a floor (the
  ``Device.details`` key ``onnx_node_floor``: the fraction of cases it passes at least).

Devices are prepared with ``strict=True``: a model the device cannot run is never moved to another
device, so every answer is the device's own. The kit compiles into a temporary ``HAL_CACHE_DIR``.

The rest of the package
=======================

``hal.testing.models`` builds deterministic ONNX models in code (no downloads): the benchmark
models (an MLP, a ResNet-18-like CNN, a transformer encoder) at full or small size, and
``zoo()`` / ``random_feeds()`` for agreement tests between devices.

``hal.testing.conformance`` runs the ONNX node test cases defined in the onnx package through
the HAL, on each device (strict) and through ``to("auto")``, and compares outputs as onnx's own
backend runner does; ``hal conformance`` prints its table. ``hal.testing.probes`` builds the
kit's models from a device's declared capabilities; ``hal.testing.build`` has small builders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

__all__: list[str] = []


# The two hooks pytest finds when this package is loaded as a plugin (``-p hal.testing`` or the
# ``pytest11`` entry point). They import pytest-only code lazily: ``import hal.testing`` outside
# pytest stays as cheap as before.


def pytest_addoption(parser: pytest.Parser) -> None:
    from hal.testing.kit import add_options

    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    from hal.testing.kit import configure

    configure(config)
