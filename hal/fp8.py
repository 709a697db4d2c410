"""FP8 and UE8M0 numerics: exact conversions, pure numpy (with ml_dtypes' element types).

Used by :mod:`hal.quantize` and meant for lowering too (converting a model's scales or FP8
values for a device); nothing here reads a model. Every function takes and returns numpy arrays
and never writes to its arguments, so read-only, strided and Fortran-order arrays are fine.

Element formats are named ``"e4m3fn"``, ``"e4m3fnuz"``, ``"e5m2"``, ``"e5m2fnuz"`` (or
``"float8_e4m3fn"`` and so on, or the ml_dtypes dtype). ONNX semantics throughout:

- :func:`saturate_cast` is ONNX ``Cast(saturate=1)`` and what ``QuantizeLinear`` does to FP8:
  round to nearest even, finite values beyond the format's largest clipped to it, ``±inf``
  to ``±max``, NaN stays NaN, ``-0`` stays ``-0`` (``+0`` in the FNUZ formats, which have no
  negative zero). :func:`cast` with ``saturate=False`` is ml_dtypes' (and ONNX's) plain cast:
  overflow gives NaN (E4M3FN, FNUZ) or infinity (E5M2).
- :func:`e8m0_from_float32` is ONNX ``Cast-24`` to ``FLOAT8E8M0`` bit for bit, including its
  ``round_mode`` (``"up"`` by default, ``"down"``, ``"nearest"``) and ``saturate``: NaN and
  ±inf give 0xFF (NaN); zero gives 0x00; the sign is ignored (ONNX leaves negative inputs
  undefined; its reference reads the magnitude, and so does this).
- UE8M0 bytes have two readings (:func:`e8m0_to_float32`): OCP MX / ONNX (``"ocp"``: 0x00 is
  2^-127, there is no zero, 0xFF is NaN) and Huawei CANN's ``float8_e8m0.h`` (``"cann-zero"``:
  0x00 is 0). :func:`e8m0_reencode` converts bytes between them and refuses, rather than
  changes, a value the other reading cannot hold.

Block scales (:func:`block_amax`, :func:`expand_scale`, :func:`requantize_blocks`) follow
``DequantizeLinear``'s layout: ``scale`` has ``x``'s rank, and along ``axis`` each scale covers
``block_size`` consecutive elements (the last block may be partial).
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "E8M0_NAN",
    "FORMATS",
    "block_amax",
    "cast",
    "dtype_of",
    "e4m3fn_to_e4m3fnuz",
    "e8m0_from_float32",
    "e8m0_reencode",
    "e8m0_to_float32",
    "expand_scale",
    "max_value",
    "power_of_two_scale",
    "requantize_blocks",
    "saturate_cast",
    "scale_for",
    "sqnr_db",
    "to_float32",
]

#: The FP8 element formats by short name.
FORMATS: dict[str, Any] = {
    "e4m3fn": ml_dtypes.float8_e4m3fn,
    "e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "e5m2": ml_dtypes.float8_e5m2,
    "e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}

#: The UE8M0 NaN byte (both readings).
E8M0_NAN = 0xFF
_ROUND_MODES = ("up", "down", "nearest")
_ENCODINGS = ("ocp", "cann-zero")


def dtype_of(fmt: Any) -> np.dtype:
    """The ml_dtypes dtype of an FP8 element format given by short name, ONNX-style name
    (``"float8_e4m3fn"``) or dtype. Raises ValueError for anything else."""
    if isinstance(fmt, str):
        key = fmt.lower().removeprefix("float8_")
        if key in FORMATS:
            return np.dtype(FORMATS[key])
    else:
        try:
            dtype = np.dtype(fmt)
        except TypeError:
            dtype = None
        if dtype is not None and any(dtype == np.dtype(d) for d in FORMATS.values()):
            return dtype
    msg = f"{fmt!r} is not an FP8 element format; use one of {', '.join(FORMATS)}"
    raise ValueError(msg)


def max_value(fmt: Any) -> float:
    """The largest finite value of an FP8 format (448 for E4M3FN, 240 for E4M3FNUZ, 57344 for
    both E5M2 formats)."""
    return float(ml_dtypes.finfo(dtype_of(fmt)).max)


def _as_float(x: Any) -> np.ndarray:
    """``x`` as float32, or float64 when it is float64 already (no rounding twice)."""
    array = np.asarray(x)
    if array.dtype == np.float64:
        return array
    return array.astype(np.float32)


def cast(x: Any, fmt: Any, *, saturate: bool = True) -> np.ndarray:
    """``x`` (any float array) to an FP8 format, rounding once to nearest even, as ONNX ``Cast``
    with ``saturate`` does (see the module docstring). Float64 input is rounded from float64
    directly, never through float32."""
    dtype = dtype_of(fmt)
    values = _as_float(x)
    if saturate:
        top = max_value(dtype)
        # np.clip keeps NaN and sends ±inf to ±top, which is Cast(saturate=1).
        values = np.clip(values, -top, top)
    if values.dtype == np.float64:
        values = _round_to_odd_float32(values)
    return values.astype(dtype)


def _round_to_odd_float32(x: np.ndarray) -> np.ndarray:
    """``x`` (float64) as float32 rounded to odd: truncated toward zero, with the last mantissa
    bit set when anything was cut. Rounding that once more to a format with at least two fewer
    mantissa bits (every FP8 format) gives what rounding ``x`` directly would: so the result does
    not depend on whether ml_dtypes converts float64 directly (0.6 and later) or through float32
    (0.5, which rounded twice)."""
    nearest = x.astype(np.float32)
    finite = np.isfinite(x) & np.isfinite(nearest)
    wide = nearest.astype(np.float64)
    over = finite & (np.abs(wide) > np.abs(x))
    truncated = np.where(over, np.nextafter(nearest, np.float32(0)), nearest)
    inexact = finite & (truncated.astype(np.float64) != x)
    bits = truncated.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32)


def saturate_cast(x: Any, fmt: Any) -> np.ndarray:
    """ONNX ``Cast(saturate=1)`` / ``QuantizeLinear``'s conversion to an FP8 format."""
    return cast(x, fmt, saturate=True)


def to_float32(q: Any, fmt: Any | None = None) -> np.ndarray:
    """FP8 values as float32, exactly (every FP8 value is a float32). ``q`` is an ml_dtypes FP8
    array, or its bytes (uint8) with ``fmt`` naming the format."""
    array = np.asarray(q)
    if array.dtype == np.uint8:
        if fmt is None:
            msg = "to_float32 got raw bytes (uint8): name their format with fmt="
            raise ValueError(msg)
        array = array.view(dtype_of(fmt))
    elif fmt is not None and array.dtype != dtype_of(fmt):
        msg = f"to_float32: the array is {array.dtype}, not {dtype_of(fmt)}"
        raise ValueError(msg)
    else:
        dtype_of(array.dtype)  # refuses a non-FP8 array
    return array.astype(np.float32)


# -- UE8M0 -------------------------------------------------------------------------------------


def e8m0_from_float32(x: Any, round_mode: str = "up", *, saturate: bool = True) -> np.ndarray:
    """UE8M0 bytes (uint8, OCP reading) of ``x`` (converted to float32 first), as ONNX
    ``Cast-24(to=FLOAT8E8M0, round_mode, saturate)`` computes them, bit for bit.

    The byte is float32's biased exponent field, adjusted by ``round_mode``: ``"down"`` keeps
    it (truncates the mantissa), ``"up"`` adds one when any mantissa bit is set, ``"nearest"``
    adds one when the mantissa's top (guard) bit is set and a lower bit is set or the exponent
    field is nonzero. ``saturate`` stops rounding from carrying 2^127 into 0xFF (NaN).
    NaN and ±inf give 0xFF, ±0 gives 0x00 (2^-127 in the OCP reading), float32 subnormals give
    0x00 or 0x01 by the mode; the sign is ignored. One consequence, ONNX's too: 2^-127 itself
    is a float32 subnormal with a mantissa bit set, so ``"up"`` gives 0x01 (2^-126) for it;
    ``"down"`` converts every power of two UE8M0 holds back to its own byte.
    """
    if round_mode not in _ROUND_MODES:
        msg = f"round_mode {round_mode!r} is not one of {', '.join(_ROUND_MODES)}"
        raise ValueError(msg)
    bits = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint16)
    special = exponent == 0xFF
    if round_mode == "up":
        carry = ((bits & 0x7FFFFF) != 0) & ~special
    elif round_mode == "nearest":
        guard = (bits & 0x400000) != 0
        lower = (bits & 0x3FFFFF) != 0  # round or sticky bits
        carry = guard & (lower | (exponent > 0)) & ~special
    else:
        carry = np.zeros(exponent.shape, dtype=bool)
    if saturate:
        carry &= exponent != 0xFE
    exponent = exponent + carry
    out = np.where(special, np.uint16(E8M0_NAN), exponent).astype(np.uint8)
    return out


def _check_encoding(encoding: Any) -> str:
    value = getattr(encoding, "value", encoding)
    if value not in _ENCODINGS:
        msg = f"E8M0 encoding {encoding!r} is not one of {', '.join(_ENCODINGS)}"
        raise ValueError(msg)
    return str(value)


def e8m0_to_float32(bits: Any, encoding: Any = "ocp") -> np.ndarray:
    """UE8M0 bytes (uint8, or an ml_dtypes ``float8_e8m0fnu`` array) as float32, exactly:
    ``2^(b - 127)``, 0xFF NaN; 0x00 is 2^-127 (a float32 subnormal) in the ``"ocp"`` reading
    and 0 in ``"cann-zero"`` (:class:`hal.E8M0Encoding` values are accepted)."""
    encoding = _check_encoding(encoding)
    raw = np.asarray(bits)
    if raw.dtype == np.dtype(ml_dtypes.float8_e8m0fnu):
        raw = raw.view(np.uint8)
    if raw.dtype != np.uint8:
        msg = f"e8m0_to_float32 takes UE8M0 bytes (uint8 or float8_e8m0fnu), not {raw.dtype}"
        raise ValueError(msg)
    wide = np.ascontiguousarray(raw, dtype=np.uint32)
    # 0x01..0xFE are float32 normals: the byte is the exponent field as it is.
    result = (wide << np.uint32(23)).view(np.float32)
    zero = wide == 0
    result[zero] = 0.0 if encoding == "cann-zero" else np.float32(2.0**-127)
    result[wide == E8M0_NAN] = np.nan
    return result


def e8m0_reencode(bits: Any, source: Any, target: Any) -> np.ndarray:
    """UE8M0 bytes read as ``source`` rewritten so ``target`` reads the same values.

    The two readings differ only at 0x00, so every byte is kept, but: ``"ocp"`` to
    ``"cann-zero"`` refuses 0x00 (2^-127, which CANN cannot hold: its 0x00 is zero), and
    ``"cann-zero"`` to ``"ocp"`` refuses 0x00 (zero, which OCP cannot hold). Both raise
    ValueError with the count; requantize such blocks with a larger scale instead.
    """
    source, target = _check_encoding(source), _check_encoding(target)
    raw = np.asarray(bits)
    if raw.dtype == np.dtype(ml_dtypes.float8_e8m0fnu):
        raw = raw.view(np.uint8)
    out = np.array(raw, dtype=np.uint8, copy=True)
    if source == target:
        return out
    zeros = int(np.count_nonzero(out == 0))
    if zeros:
        held = "2^-127" if source == "ocp" else "zero"
        msg = (
            f"{zeros} UE8M0 byte(s) 0x00 mean {held} in the {source} reading, which the {target} reading "
            "cannot hold; requantize those blocks with a scale of at least 2^-126"
        )
        raise ValueError(msg)
    return out


def power_of_two_scale(scale: Any, round_mode: str = "up", *, encoding: Any = "ocp") -> tuple[np.ndarray, np.ndarray]:
    """The power of two nearest ``scale`` (float32) by ``round_mode``, as UE8M0 bytes and as
    float32 (exact): ``(bytes, values)``. ONNX Cast-24 semantics (:func:`e8m0_from_float32`,
    saturating). Non-finite or zero scales are refused (ValueError): a block scale is positive."""
    scale = np.asarray(scale, dtype=np.float32)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        msg = "power_of_two_scale takes positive finite scales"
        raise ValueError(msg)
    bits = e8m0_from_float32(scale, round_mode)
    return bits, e8m0_to_float32(bits, encoding)


# -- block scales ------------------------------------------------------------------------------


def _scale_shape(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] = -(-shape[axis] // block_size)
    return tuple(out)


def block_amax(x: Any, axis: int, block_size: int, *, expand: tuple[int, int] | None = None) -> np.ndarray:
    """The largest ``|x|`` of every block, in ``DequantizeLinear``'s scale layout: blocks of
    ``block_size`` along ``axis`` (the last one partial when the dimension is not a multiple).

    ``expand=(other_axis, rows)`` makes the blocks two-dimensional: ``rows`` consecutive indices
    along ``other_axis`` share one value (the largest over all of them), repeated for each of
    them, so the result still has ``DequantizeLinear``'s layout and one value per logical
    ``rows x block_size`` block. NaN propagates (callers refuse non-finite weights first).
    """
    values = np.abs(_as_float(x))
    axis %= values.ndim
    n = values.shape[axis]
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    if pad:
        widths = [(0, 0)] * values.ndim
        widths[axis] = (0, pad)
        values = np.pad(values, widths)  # zeros never raise an absolute maximum
    shape = values.shape[:axis] + (blocks, block_size) + values.shape[axis + 1 :]
    amax = values.reshape(shape).max(axis=axis + 1)
    if expand is not None:
        other, rows = expand
        other %= values.ndim
        if other == axis:
            msg = "block_amax: expand's axis must differ from the blocked axis"
            raise ValueError(msg)
        m = amax.shape[other]
        groups = -(-m // rows)
        pad = groups * rows - m
        if pad:
            widths = [(0, 0)] * amax.ndim
            widths[other] = (0, pad)
            amax = np.pad(amax, widths)
        grouped = amax.reshape(amax.shape[:other] + (groups, rows) + amax.shape[other + 1 :]).max(axis=other + 1, keepdims=True)
        amax = np.repeat(grouped, rows, axis=other + 1).reshape(amax.shape)
        amax = np.take(amax, np.arange(m), axis=other)
    return amax


def expand_scale(scale: Any, shape: tuple[int, ...], axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    """``scale`` broadcast to ``shape`` as ``DequantizeLinear`` applies it: per tensor (a
    scalar), per axis (1-D along ``axis``) or blocked (``x``'s rank, ``block_size`` along
    ``axis``). A view where numpy can make one."""
    scale = np.asarray(scale)
    if scale.ndim == 0 or scale.size == 1 and block_size is None and scale.ndim <= 1:
        return np.broadcast_to(scale.reshape(()), shape)
    if axis is None:
        axis = 1
    axis %= len(shape)
    if block_size is None or scale.ndim == 1:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(scale.reshape(view), shape)
    if scale.shape != _scale_shape(shape, axis, block_size):
        msg = f"scale shape {scale.shape} does not fit x {shape} with block_size {block_size} on axis {axis}"
        raise ValueError(msg)
    return np.take(np.repeat(scale, block_size, axis=axis), np.arange(shape[axis]), axis=axis)


def scale_for(amax: Any, fmt: Any, scale: str = "float32", round_mode: str = "up") -> np.ndarray:
    """The float32 block scales (``DequantizeLinear``'s multiplier) for blocks whose largest
    magnitude is ``amax``: ``amax / max_value(fmt)`` in float32 for ``scale="float32"``; that
    value rounded to a power of two by ``round_mode`` (:func:`e8m0_from_float32`) for
    ``"ue8m0"``. An all-zero block (amax 0) gets scale 1 (its values quantize to 0, exactly);
    a block so small that ``amax / max`` underflows float32 gets the smallest positive float32
    (2^-149), so no scale is 0, inf or NaN."""
    amax = np.asarray(amax, dtype=np.float32)
    s = amax / np.float32(max_value(fmt))
    s = np.where(amax == 0, np.float32(1.0), s)
    s = np.where(s == 0, np.float32(2.0**-149), s).astype(np.float32)
    if scale == "float32":
        return s
    if scale == "ue8m0":
        return power_of_two_scale(s, round_mode)[1]
    msg = f"scale format {scale!r} is not float32 or ue8m0"
    raise ValueError(msg)


def requantize_blocks(
    q: Any, scale: Any, *, axis: int | None = None, block_size: int | None = None, round_mode: str = "up"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP8 values ``q`` with float32 scales ``scale`` (``DequantizeLinear``'s layout) moved to
    power-of-two (UE8M0) scales: ``(q_new, scale_bytes, scale_values)``.

    Each scale becomes the power of two ``round_mode`` picks from it (:func:`power_of_two_scale`;
    ``"up"`` never makes a value overflow), so scales that were equal stay equal and a 128x128
    block layout stays one. The values are dequantized exactly (``q * scale`` in float64: a
    4-bit by 24-bit product) and rounded once to ``q``'s format with saturation. Scales must be
    positive and finite (ValueError otherwise).
    """
    q = np.asarray(q)
    dtype = dtype_of(q.dtype)
    scale = np.asarray(scale, dtype=np.float32)
    scale_bytes, scale_values = power_of_two_scale(scale, round_mode)
    old = expand_scale(scale, q.shape, axis, block_size).astype(np.float64)
    new = expand_scale(scale_values, q.shape, axis, block_size).astype(np.float64)
    exact = q.astype(np.float64) * old
    return saturate_cast(exact / new, dtype), scale_bytes, scale_values


# -- FN to FNUZ --------------------------------------------------------------------------------


def e4m3fn_to_e4m3fnuz(q: Any, *, out_of_range: str = "rescale") -> tuple[np.ndarray, float]:
    """E4M3FN values as E4M3FNUZ, with the factor their scale must be multiplied by:
    ``(q_fnuz, factor)``, so that ``q_fnuz * factor == q`` for every finite value.

    E4M3FNUZ's range is [2^-10, 240], E4M3FN's [2^-9, 448]. ``out_of_range``:

    - ``"rescale"`` (exact, the default): every value is halved (factor 2.0); halving is exact
      for every E4M3FN value, and 448 / 2 = 224 fits;
    - ``"saturate"``: values kept (factor 1.0), magnitudes above 240 clipped to 240 (lossy);
    - ``"raise"``: values kept (factor 1.0); ValueError when any magnitude exceeds 240.

    Never wraps: -0 (0x80 in E4M3FN, which is NaN in E4M3FNUZ) becomes +0, and NaN becomes
    E4M3FNUZ's only NaN, 0x80.
    """
    q = np.asarray(q)
    if q.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
        msg = f"e4m3fn_to_e4m3fnuz takes a float8_e4m3fn array, not {q.dtype}"
        raise ValueError(msg)
    values = q.astype(np.float32)  # exact; -0.0 and NaN carried
    if out_of_range == "rescale":
        return (values / np.float32(2.0)).astype(ml_dtypes.float8_e4m3fnuz), 2.0
    top = max_value("e4m3fnuz")
    if out_of_range == "raise":
        over = int(np.count_nonzero(np.abs(values) > top))
        if over:
            msg = (
                f"{over} E4M3FN value(s) exceed E4M3FNUZ's largest, {top:g}; use out_of_range='rescale' "
                "(exact, doubles the scale) or 'saturate' (clips)"
            )
            raise ValueError(msg)
        return values.astype(ml_dtypes.float8_e4m3fnuz), 1.0
    if out_of_range == "saturate":
        return saturate_cast(values, "e4m3fnuz"), 1.0
    msg = f"out_of_range {out_of_range!r} is not rescale, saturate or raise"
    raise ValueError(msg)


def sqnr_db(reference: Any, approximation: Any) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(sum ref^2 / sum (ref - approx)^2)``
    in float64: inf when the two are equal, -inf for an all-zero reference with any error."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(approximation, dtype=np.float64)
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
