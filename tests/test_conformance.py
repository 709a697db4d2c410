"""ONNX node conformance through the HAL: ``to("auto")`` does at least as well as any device alone.

Every node test case of the installed onnx package (``hal.testing.conformance``) runs on each
available device alone (``strict=True``) and through ``to("auto")``; outputs are compared as
onnx's backend test runner compares them. The devices are whatever ``hal.devices()`` finds, so
the same file serves the core tox environment (only ``ort:cpu``) and each plugin's.

Slow compilers run a deterministic sample: every N-th case by sorted name, N per backend in
``STRIDE``; ``auto`` runs every case any device runs, and is compared with each device on that
device's own sample. ``HAL_CONFORMANCE_FULL=1`` runs every case on every device.
"""

from __future__ import annotations

import functools
import os

import pytest

import hal
from hal.testing import conformance

# Every N-th case by sorted name, per backend, so that this file stays within ~3 minutes per tox
# environment on a 2-core machine. Measured there over all 1884 cases (to() plus run() per case):
# onnxruntime ~10 ms (ort:cpu and auto on every case: ~60 s with collection), OpenVINO ~40 ms,
# IREE ~0.7 s (0.1-5.4 s each; every case would take ~23 minutes). With these strides the file
# took 64 s in py311-openvino's setting and 136 s in py311-iree's. Backends not listed run every
# STRIDE_DEFAULT-th case.
STRIDE = {"ort": 1, "openvino": 2, "iree": 20}
STRIDE_DEFAULT = 10
FULL = os.environ.get("HAL_CONFORMANCE_FULL", "") not in ("", "0")

# onnx 1.23.2 defines 1884 node cases. ort:cpu through the HAL passes 1673 of them with
# onnxruntime 1.32 (py311-core, -openvino, -iree), 1660 with onnxruntime-gpu 1.31.1 (py311-nvidia)
# and 1584 with onnxruntime-cann 1.24.4 (py311-ascend). onnxruntime 1.32 called directly passes
# 1740: the HAL refuses 61 cases at opsets 26-28, beyond the opsets it declares for onnxruntime,
# and 34 with sequence or optional inputs or outputs, which its API does not pass. The floor sits
# below the oldest onnxruntime here, yet fails if the HAL's loading, lowering, feeding or output
# handling breaks for any sizeable group of operators or element types.
MIN_CASES = 1500
REFERENCE_DEVICE = "ort:cpu"
REFERENCE_FLOOR = 1500


def _devices() -> list[hal.Device]:
    return sorted((d for d in hal.devices() if d.available), key=lambda d: d.id)


def _stride(device: hal.Device) -> int:
    return 1 if FULL else STRIDE.get(device.backend, STRIDE_DEFAULT)


@functools.cache
def _cases() -> tuple:
    return tuple(conformance.collect_cases())


@functools.cache
def _result() -> tuple[conformance.ConformanceResult, dict[str, frozenset[str]]]:
    """Run once per session: every device on its sample, auto on every case any device runs."""
    cases = _cases()
    samples = {d.id: frozenset(c.name for c in conformance.sample(cases, every=_stride(d))) for d in _devices()}
    targets: dict[str, frozenset[str] | None] = dict(samples)
    targets["auto"] = frozenset().union(*samples.values())
    # A fresh cache: a few thousand small entries are not worth keeping in anyone's cache dir.
    with conformance.isolated_cache():
        result = conformance.run(cases, targets)
    return result, samples


def _device_params() -> list[object]:
    return [pytest.param(d.id, id=d.id) for d in _devices()]


class TestConformance:
    def test_cases_are_collected(self):
        assert len(_cases()) >= MIN_CASES, "onnx's node test cases were not found; the comparison would be empty"

    @pytest.mark.parametrize("device", _device_params())
    def test_auto_passes_at_least_as_many_as_the_device(self, device):
        result, samples = _result()
        sample = samples[device]
        assert len(sample) >= 50, f"the sample for {device} is too small to compare anything"
        alone = result.counts(device, sample)
        auto = result.counts("auto", sample)
        assert sum(alone.values()) == sum(auto.values()) == len(sample)
        missed = sorted(result.passed(device) - result.passed("auto"))
        assert auto["pass"] >= alone["pass"], (
            f"on {len(sample)} cases, to('auto') passes {auto} and {device} alone {alone}; "
            f"auto misses {len(missed)} that {device} passes: {missed[:20]}"
        )

    def test_reference_device_passes_the_floor(self):
        if REFERENCE_DEVICE not in {d.id for d in _devices()}:
            pytest.skip(f"{REFERENCE_DEVICE} is not available here")
        result, samples = _result()
        assert len(samples[REFERENCE_DEVICE]) == len(_cases())
        counts = result.counts(REFERENCE_DEVICE)
        assert counts["pass"] >= REFERENCE_FLOOR, f"{REFERENCE_DEVICE} through the HAL: {counts}"
        assert result.counts("auto")["pass"] >= REFERENCE_FLOOR, f"to('auto'): {result.counts('auto')}"
