"""What a device can do, as frozen records that round-trip through JSON.

A plugin describes each device it finds with a :class:`Capabilities`; the core reads it to decide
whether a model runs as is, runs after lowering, or cannot run. Nothing here imports a runtime:
numpy and ml_dtypes are imported only when a dtype is asked for.

Figures for real chips and their sources are in ``shared/reference/chips.md``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "Capabilities",
    "DeviceKind",
    "E8M0Encoding",
    "Health",
    "Interconnect",
    "InterconnectKind",
    "Maturity",
    "Memory",
    "NumberFormat",
    "OpsetRange",
    "ScaledFormat",
    "Stability",
    "Support",
    "ValueKind",
]


class Support(enum.Enum):
    """How well a device handles one number format, from best to worst.

    ``NATIVE``: compute kernels in the format. ``EMULATED``: runs, computed by up-casting.
    ``STORAGE``: can hold and convert (Cast, Quantize/DequantizeLinear) but not compute.
    ``NONE``: the format cannot appear in a model run on the device.
    """

    NATIVE = "native"
    EMULATED = "emulated"
    STORAGE = "storage"
    NONE = "none"

    @property
    def rank(self) -> int:
        """3 for native down to 0 for none, so levels compare with ``a.rank >= b.rank``."""
        return _SUPPORT_RANK[self]

    def at_least(self, other: Support) -> bool:
        return self.rank >= other.rank


_SUPPORT_RANK = {Support.NATIVE: 3, Support.EMULATED: 2, Support.STORAGE: 1, Support.NONE: 0}


class NumberFormat(enum.Enum):
    """Every ONNX tensor element type, named as numpy/ml_dtypes name them where they can.

    ``NumberFormat.FLOAT8_E4M3FN.onnx_type == 17``; ``NumberFormat.from_onnx(17)``;
    ``NumberFormat.from_dtype(ml_dtypes.float8_e4m3fn)``; ``fmt.dtype`` gives the numpy dtype.
    """

    FLOAT32 = "float32"
    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    STRING = "string"
    BOOL = "bool"
    FLOAT16 = "float16"
    FLOAT64 = "float64"
    UINT32 = "uint32"
    UINT64 = "uint64"
    COMPLEX64 = "complex64"
    COMPLEX128 = "complex128"
    BFLOAT16 = "bfloat16"
    FLOAT8_E4M3FN = "float8_e4m3fn"
    FLOAT8_E4M3FNUZ = "float8_e4m3fnuz"
    FLOAT8_E5M2 = "float8_e5m2"
    FLOAT8_E5M2FNUZ = "float8_e5m2fnuz"
    UINT4 = "uint4"
    INT4 = "int4"
    FLOAT4_E2M1 = "float4_e2m1"
    FLOAT8_E8M0 = "float8_e8m0"
    UINT2 = "uint2"
    INT2 = "int2"
    FLOAT6_E2M3 = "float6_e2m3"
    FLOAT6_E3M2 = "float6_e3m2"

    @property
    def onnx_type(self) -> int:
        """The ``onnx.TensorProto.DataType`` code."""
        return _ONNX_CODE[self]

    @property
    def bits(self) -> int:
        """Bits per element in ONNX's packed layout (4 for int4, 0 for string)."""
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_fp8(self) -> bool:
        return self in _FP8

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype arrays of this format have (ml_dtypes for bfloat16, FP8, int4, ...).

        Raises :class:`KeyError` for the float6 formats, which no numpy dtype represents yet.
        """
        return _dtypes()[self]

    @classmethod
    def from_onnx(cls, code: int) -> NumberFormat:
        try:
            return _FROM_ONNX[code]
        except KeyError:
            msg = f"ONNX element type code {code} is not a known tensor element type"
            raise ValueError(msg) from None

    @classmethod
    def from_dtype(cls, dtype: Any) -> NumberFormat:
        import numpy as np

        dt = np.dtype(dtype)
        for fmt, candidate in _dtypes().items():
            if candidate == dt and fmt is not NumberFormat.STRING:
                return fmt
        if dt.kind in "OUS":
            return NumberFormat.STRING
        msg = f"numpy dtype {dt} has no ONNX element type"
        raise ValueError(msg)


_ONNX_CODE = {fmt: code for code, fmt in enumerate(NumberFormat, start=1)}
_FROM_ONNX = {code: fmt for fmt, code in _ONNX_CODE.items()}
_FP8 = frozenset(
    {
        NumberFormat.FLOAT8_E4M3FN,
        NumberFormat.FLOAT8_E4M3FNUZ,
        NumberFormat.FLOAT8_E5M2,
        NumberFormat.FLOAT8_E5M2FNUZ,
        NumberFormat.FLOAT8_E8M0,
    }
)
_FLOATS = _FP8 | {
    NumberFormat.FLOAT32,
    NumberFormat.FLOAT16,
    NumberFormat.FLOAT64,
    NumberFormat.BFLOAT16,
    NumberFormat.FLOAT4_E2M1,
    NumberFormat.FLOAT6_E2M3,
    NumberFormat.FLOAT6_E3M2,
}
_BITS = {
    NumberFormat.FLOAT32: 32,
    NumberFormat.UINT8: 8,
    NumberFormat.INT8: 8,
    NumberFormat.UINT16: 16,
    NumberFormat.INT16: 16,
    NumberFormat.INT32: 32,
    NumberFormat.INT64: 64,
    NumberFormat.STRING: 0,
    NumberFormat.BOOL: 8,
    NumberFormat.FLOAT16: 16,
    NumberFormat.FLOAT64: 64,
    NumberFormat.UINT32: 32,
    NumberFormat.UINT64: 64,
    NumberFormat.COMPLEX64: 64,
    NumberFormat.COMPLEX128: 128,
    NumberFormat.BFLOAT16: 16,
    NumberFormat.FLOAT8_E4M3FN: 8,
    NumberFormat.FLOAT8_E4M3FNUZ: 8,
    NumberFormat.FLOAT8_E5M2: 8,
    NumberFormat.FLOAT8_E5M2FNUZ: 8,
    NumberFormat.UINT4: 4,
    NumberFormat.INT4: 4,
    NumberFormat.FLOAT4_E2M1: 4,
    NumberFormat.FLOAT8_E8M0: 8,
    NumberFormat.UINT2: 2,
    NumberFormat.INT2: 2,
    NumberFormat.FLOAT6_E2M3: 6,
    NumberFormat.FLOAT6_E3M2: 6,
}
_DTYPES: dict[NumberFormat, Any] = {}


def _dtypes() -> dict[NumberFormat, Any]:
    if not _DTYPES:
        import ml_dtypes
        import numpy as np

        names = {
            NumberFormat.BFLOAT16: "bfloat16",
            NumberFormat.FLOAT8_E4M3FN: "float8_e4m3fn",
            NumberFormat.FLOAT8_E4M3FNUZ: "float8_e4m3fnuz",
            NumberFormat.FLOAT8_E5M2: "float8_e5m2",
            NumberFormat.FLOAT8_E5M2FNUZ: "float8_e5m2fnuz",
            NumberFormat.FLOAT8_E8M0: "float8_e8m0fnu",
            NumberFormat.FLOAT4_E2M1: "float4_e2m1fn",
            NumberFormat.INT4: "int4",
            NumberFormat.UINT4: "uint4",
            NumberFormat.INT2: "int2",
            NumberFormat.UINT2: "uint2",
        }
        table = {}
        for fmt in NumberFormat:
            if fmt in names:
                if hasattr(ml_dtypes, names[fmt]):
                    table[fmt] = np.dtype(getattr(ml_dtypes, names[fmt]))
            elif fmt is NumberFormat.STRING:
                table[fmt] = np.dtype(object)
            elif fmt in (NumberFormat.FLOAT6_E2M3, NumberFormat.FLOAT6_E3M2):
                continue  # no numpy dtype represents them yet
            else:
                table[fmt] = np.dtype(fmt.value)
        _DTYPES.update(table)
    return _DTYPES


class ValueKind(str, enum.Enum):
    """What a graph input or output holds: a tensor, a sequence of tensors (a list of arrays in
    Python), an optional tensor (an array or None), or an optional sequence (a list or None).

    A ``str`` enum, so ``info.kind == "sequence"`` holds and JSON writes the value. The element's
    format and shape are the :class:`~hal.model.TensorInfo`'s own.
    """

    TENSOR = "tensor"
    SEQUENCE = "sequence"
    OPTIONAL = "optional"
    OPTIONAL_SEQUENCE = "optional-sequence"

    def __str__(self) -> str:
        return self.value

    @property
    def is_sequence(self) -> bool:
        return self in (ValueKind.SEQUENCE, ValueKind.OPTIONAL_SEQUENCE)

    @property
    def is_optional(self) -> bool:
        return self in (ValueKind.OPTIONAL, ValueKind.OPTIONAL_SEQUENCE)


class DeviceKind(enum.Enum):
    CPU = "cpu"
    GPU = "gpu"
    NPU = "npu"
    SIMULATED = "simulated"


class InterconnectKind(enum.Enum):
    NVLINK = "nvlink"
    HCCS = "hccs"
    PCIE = "pcie"
    INFINITY_FABRIC = "infinity-fabric"
    ROCE = "roce"
    MTLINK = "mtlink"
    NONE = "none"


class E8M0Encoding(enum.Enum):
    """How a byte of float8_e8m0 (UE8M0) scale is read.

    ``OCP``: OCP MX v1.0 and ONNX; 0x00 is 2^-127, 0xFF is NaN, there is no zero.
    ``CANN_ZERO``: Huawei CANN's ``float8_e8m0.h``; 0x00 is zero.
    """

    OCP = "ocp"
    CANN_ZERO = "cann-zero"


class Maturity(enum.Enum):
    """What the plugin author declares about the software stack for this device."""

    STABLE = "stable"
    BETA = "beta"
    EXPERIMENTAL = "experimental"
    SIMULATED = "simulated"


def _fmt(value: NumberFormat | str) -> NumberFormat:
    return value if isinstance(value, NumberFormat) else NumberFormat(value)


def _support(value: Support | str) -> Support:
    return value if isinstance(value, Support) else Support(value)


def _ints(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _strs(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@frozen
class ScaledFormat:
    """One block-scaled quantization scheme: element format x scale format x block shape.

    ``ScaledFormat("float8_e4m3fn", "float8_e8m0", (1, 32))`` is MXFP8;
    ``("float8_e4m3fn", "float32", (128, 128))`` is DeepSeek-V3's weight scaling.
    """

    element: NumberFormat = field(converter=_fmt)
    scale: NumberFormat = field(converter=_fmt)
    block: tuple[int, ...] = field(converter=_ints)
    support: Support = field(default=Support.NATIVE, converter=_support)

    @block.validator
    def _check_block(self, _attribute: Any, value: tuple[int, ...]) -> None:
        if not value or any(v <= 0 for v in value):
            msg = f"block shape must be positive integers, got {value}"
            raise ValueError(msg)


@frozen
class Interconnect:
    """How the device talks to its peers. Bandwidth in GB/s, latency in microseconds."""

    kind: InterconnectKind = field(default=InterconnectKind.NONE, converter=InterconnectKind)
    bandwidth_gbps: float | None = None
    links: int | None = None
    peers: tuple[str, ...] = field(default=(), converter=_strs)
    latency_us: float | None = None


@frozen
class Health:
    """Measured health; filled in by probes and by the runtime, never by the plugin's say-so.

    ``hal doctor`` (:mod:`hal.doctor`) measures it and keeps it between processes
    (:mod:`hal.health`); ``hal.devices()`` lists each device with its last record. ``checked_at``:
    when (seconds since the epoch); ``reason``: why the device is quarantined, or the last
    result in one line."""

    probes: int = 0
    failures: int = 0
    deterministic: bool | None = None
    latency_jitter: float | None = None  # p90/p50 of probe latencies
    quarantined: bool = False
    checked_at: float | None = None
    reason: str | None = None

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.probes if self.probes else None


@frozen
class Stability:
    """Declared maturity, declared reasons the device may not suit a model, and measured health.

    ``deterministic``: declared. False when the device may answer the same input with different
    bits (atomics in reductions); ``hal doctor`` then does not hold variation against it. True or
    None (not declared): a device whose answers vary is quarantined."""

    maturity: Maturity = field(default=Maturity.STABLE, converter=Maturity)
    incompatibilities: tuple[str, ...] = field(default=(), converter=_strs)
    health: Health = field(factory=Health)
    deterministic: bool | None = None


@frozen
class Memory:
    """Device memory: capacity in bytes, bandwidth in GB/s (None where unknown)."""

    capacity_bytes: int | None = None
    bandwidth_gbps: float | None = None

    @classmethod
    def host(cls, bandwidth_gbps: float | None = None) -> Memory:
        """This machine's physical memory, for a device that computes in host memory (a CPU);
        capacity None where the system does not say."""
        import os

        try:
            capacity: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            capacity = None
        return cls(capacity_bytes=capacity or None, bandwidth_gbps=bandwidth_gbps)


@frozen
class OpsetRange:
    """The default-domain ONNX opsets a backend accepts, inclusive, and the newest ONNX IR
    version its model loader reads (``None``: any). Lowering converts a model into the range and
    lowers its IR version when the model uses nothing the older IR lacks.

    ``max_loadable``: a newer opset the backend still reads though some kernels are missing there
    (onnxruntime 1.32 reads opset 28 but has no CPU QuantizeLinear-28): a model up to it is
    converted down to ``max`` when possible and otherwise tried as it is.

    ``domains``: operator domains besides ONNX's own (``ai.onnx``, ``ai.onnx.ml``,
    ``ai.onnx.preview.training``) whose operators the backend implements, e.g. ``com.microsoft``
    for onnxruntime. Lowering refuses a model using any other domain (unless the model defines
    the operator as a function), so a device never claims to run an operator nobody declared."""

    min: int = 7
    max: int = 25
    max_ir_version: int | None = None
    max_loadable: int | None = None
    domains: tuple[str, ...] = field(default=(), converter=_strs)

    def __attrs_post_init__(self) -> None:
        if self.min > self.max:
            msg = f"opset range is empty: min {self.min} > max {self.max}"
            raise ValueError(msg)
        if self.max_ir_version is not None and self.max_ir_version < 3:
            msg = f"max_ir_version {self.max_ir_version} is older than any opset-versioned ONNX (IR 3)"
            raise ValueError(msg)

    def __contains__(self, opset: object) -> bool:
        return isinstance(opset, int) and self.min <= opset <= self.max


class FormatTable(Mapping[NumberFormat, Support]):
    """An immutable, hashable map with a :class:`Support` level for every :class:`NumberFormat`."""

    __slots__ = ("_levels",)

    def __init__(self, levels: Mapping[NumberFormat | str, Support | str] | None = None) -> None:
        table = dict.fromkeys(NumberFormat, Support.NONE)
        for key, level in (levels or {}).items():
            table[_fmt(key)] = _support(level)
        self._levels = tuple(table[fmt] for fmt in NumberFormat)

    def __getitem__(self, key: NumberFormat | str) -> Support:
        return self._levels[_INDEX[_fmt(key)]]

    def __iter__(self) -> Iterator[NumberFormat]:
        return iter(NumberFormat)

    def __len__(self) -> int:
        return len(self._levels)

    def __hash__(self) -> int:
        return hash(self._levels)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FormatTable):
            return self._levels == other._levels
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        shown = {f.value: s.value for f, s in self.items() if s is not Support.NONE}
        return f"FormatTable({shown})"

    def at_least(self, level: Support) -> tuple[NumberFormat, ...]:
        return tuple(f for f, s in self.items() if s.at_least(level))


_INDEX = {fmt: i for i, fmt in enumerate(NumberFormat)}


def _format_table(value: Any) -> FormatTable:
    return value if isinstance(value, FormatTable) else FormatTable(value)


def _peaks(value: Mapping[NumberFormat | str, float]) -> tuple[tuple[NumberFormat, float], ...]:
    if isinstance(value, tuple):
        return value
    return tuple(sorted(((_fmt(k), float(v)) for k, v in value.items()), key=lambda kv: _INDEX[kv[0]]))


def _format_set(value: Iterable[NumberFormat | str]) -> frozenset[NumberFormat]:
    return frozenset(_fmt(v) for v in value)


def _io_kinds(value: Iterable[ValueKind | str]) -> frozenset[ValueKind]:
    kinds = frozenset(v if isinstance(v, ValueKind) else ValueKind(v) for v in value)
    return kinds - {ValueKind.TENSOR}  # every device passes tensors: not a declaration


def _op_set(value: Iterable[str]) -> frozenset[str]:
    ops = frozenset([value] if isinstance(value, str) else (str(v) for v in value))
    for op in ops:
        domain, _, name = op.rpartition(":")
        if not name or not name.isidentifier() or domain in ("ai.onnx",):
            msg = f"unsupported operator {op!r}: write 'Op' for ONNX's own domain, 'domain:Op' otherwise"
            raise ValueError(msg)
    return ops


def _scaled(value: Iterable[ScaledFormat | Mapping[str, Any]]) -> tuple[ScaledFormat, ...]:
    return tuple(v if isinstance(v, ScaledFormat) else ScaledFormat(**v) for v in value)


@frozen
class Capabilities:
    """Everything the core needs to know about a device before compiling for it.

    Build one with :meth:`from_levels` for readability::

        Capabilities.from_levels(
            native=["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"],
            storage=["float8_e4m3fnuz"],
            scaled=[ScaledFormat("float8_e4m3fn", "float32", (128, 128))],
        )
    """

    formats: FormatTable = field(factory=FormatTable, converter=_format_table)
    scaled: tuple[ScaledFormat, ...] = field(default=(), converter=_scaled)
    e8m0_encoding: E8M0Encoding | None = field(
        default=None, converter=lambda v: None if v is None else E8M0Encoding(v)
    )
    interconnect: Interconnect = field(factory=Interconnect)
    stability: Stability = field(factory=Stability)
    memory: Memory = field(factory=Memory)
    peak_tflops: tuple[tuple[NumberFormat, float], ...] = field(default=(), converter=_peaks)
    opsets: OpsetRange = field(factory=OpsetRange)
    dynamic_shapes: bool = True
    #: STORAGE formats in which data-movement operators (Reshape, Transpose, Slice, Gather, ...;
    #: ``hal.compiler.legalize.ELEMENT_MOVING_OPS``) have kernels, so lowering leaves them narrow
    #: instead of moving the elements through a wider format. Empty (the safe default) when unsure:
    #: onnxruntime CPU has no int4 Reshape, OpenVINO moves int4 and FP8 but cannot cast to int4.
    movable: frozenset[NumberFormat] = field(default=frozenset(), converter=_format_set)
    #: Graph inputs and outputs besides tensors that the device's runner passes (``sequence``,
    #: ``optional``, ``optional-sequence``; :class:`ValueKind`). Lowering refuses a model with any
    #: other kind of input or output for the device. Empty (tensors only) unless the runtime's API
    #: takes lists and None: onnxruntime's does, OpenVINO's and IREE's do not.
    io_kinds: frozenset[ValueKind] = field(default=frozenset(), converter=_io_kinds)
    #: Operators the device cannot run although its opsets include them: ``"Op"`` for ONNX's
    #: own domain, ``"domain:Op"`` otherwise. Lowering refuses a model that uses any (naming
    #: them), so ``to()`` falls back to another device or, with ``strict=True``, says why.
    unsupported_ops: frozenset[str] = field(default=frozenset(), converter=_op_set)
    #: Fixed cost of launching one operator's kernel, in microseconds, for :mod:`hal.estimate`'s
    #: roofline (None: not declared; the estimate then counts none and says so).
    launch_overhead_us: float | None = None

    @classmethod
    def from_levels(
        cls,
        *,
        native: Iterable[NumberFormat | str] = (),
        emulated: Iterable[NumberFormat | str] = (),
        storage: Iterable[NumberFormat | str] = (),
        **rest: Any,
    ) -> Capabilities:
        levels: dict[NumberFormat | str, Support] = {}
        for names, level in ((storage, Support.STORAGE), (emulated, Support.EMULATED), (native, Support.NATIVE)):
            levels.update(dict.fromkeys(names, level))
        return cls(formats=FormatTable(levels), **rest)

    def support(self, fmt: NumberFormat | str) -> Support:
        return self.formats[fmt]

    def peak(self, fmt: NumberFormat | str) -> float | None:
        """Peak dense throughput in TFLOPS (TOPS for integers) for a format, if declared."""
        return dict(self.peak_tflops).get(_fmt(fmt))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capabilities:
        data = dict(data)
        ic = data.get("interconnect") or {}
        st = dict(data.get("stability") or {})
        st["health"] = Health(**(st.get("health") or {}))
        return cls(
            formats=FormatTable(data.get("formats") or {}),
            scaled=data.get("scaled") or (),
            e8m0_encoding=data.get("e8m0_encoding"),
            interconnect=Interconnect(**ic),
            stability=Stability(**st),
            memory=Memory(**(data.get("memory") or {})),
            peak_tflops=data.get("peak_tflops") or {},
            opsets=OpsetRange(**(data.get("opsets") or {})),
            dynamic_shapes=bool(data.get("dynamic_shapes", True)),
            movable=data.get("movable") or (),
            io_kinds=data.get("io_kinds") or (),
            unsupported_ops=data.get("unsupported_ops") or (),
            launch_overhead_us=data.get("launch_overhead_us"),
        )

    @classmethod
    def from_json(cls, text: str) -> Capabilities:
        return cls.from_dict(json.loads(text))


def _jsonable(value: Any) -> Any:
    """attrs records, enums, tables and tuples as plain JSON values (enums by their value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, FormatTable):
        return {f.value: s.value for f, s in value.items()}
    if hasattr(type(value), "__attrs_attrs__"):
        out = {}
        for a in type(value).__attrs_attrs__:
            v = getattr(value, a.name)
            if a.name == "peak_tflops":
                out[a.name] = {f.value: t for f, t in v}
            else:
                out[a.name] = _jsonable(v)
        return out
    if isinstance(value, Mapping):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, frozenset):  # enum members (formats, kinds) in declaration order; names sorted
        if all(isinstance(v, str) and not isinstance(v, enum.Enum) for v in value):
            return sorted(value)
        return [v.value for v in sorted(value, key=lambda v: list(type(v)).index(v))]
    return value
