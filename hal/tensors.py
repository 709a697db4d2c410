"""Raw-bit views of tensors, for backends whose APIs refuse ml_dtypes arrays.

ONNX packs sub-byte types (int4, uint4, float4_e2m1, int2, uint2) several to a byte, first
element in the lowest bits; ml_dtypes keeps one element per byte. These helpers convert between
the two and between ml_dtypes arrays and same-width unsigned integer arrays.
"""

from __future__ import annotations

import numpy as np

from hal.capabilities import NumberFormat

__all__ = ["bits_view", "from_bits", "pack", "unpack"]

_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def bits_view(array: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers of the element width (no copy when contiguous)."""
    array = np.ascontiguousarray(array)
    return array.view(_UINT[array.dtype.itemsize * 8])


def pack(array: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """Pack a sub-byte ml_dtypes array into ONNX's layout: a flat uint8 array."""
    bits = fmt.bits
    per = 8 // bits
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8) & np.uint8((1 << bits) - 1)
    pad = (-raw.size) % per
    if pad:
        raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
    raw = raw.reshape(-1, per)
    packed = raw[:, 0].copy()
    for i in range(1, per):
        packed |= raw[:, i] << np.uint8(i * bits)
    return packed


def unpack(packed: np.ndarray, fmt: NumberFormat, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack`: an ml_dtypes array of ``shape``."""
    bits = fmt.bits
    per = 8 // bits
    count = int(np.prod(shape, dtype=np.int64))
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    raw = (packed.reshape(-1, 1) >> shifts) & np.uint8((1 << bits) - 1)
    return raw.reshape(-1)[:count].view(fmt.dtype).reshape(shape)


def from_bits(raw: np.ndarray, fmt: NumberFormat, shape: tuple[int, ...]) -> np.ndarray:
    """An array of ``fmt`` from its raw bytes in ONNX layout (packed for sub-byte types)."""
    raw = raw.view(np.uint8)
    if fmt.bits < 8:
        return unpack(raw, fmt, shape)
    return raw.view(fmt.dtype).reshape(shape)
