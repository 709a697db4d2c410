"""Small models, inputs and expected answers for the contract kit, built from what a device declares.

Everything here is derived from a device's :class:`~hal.Capabilities` and from the operator
schemas of the installed ``onnx`` package, never from the machine the kit runs on:

- :func:`formats_at` — the formats a device rates at given support levels;
- :func:`compute_probes`, :func:`storage_probes`, :func:`none_probes` — one :class:`Probe` (model,
  feeds, expected outputs) per check that a declared level holds;
- :func:`io_model` and :func:`user_feeds` — a two-input model and feeds as users have them
  (read-only, strided, Fortran-order, broadcast, memory-mapped, zero-size);
- :func:`block_dequantized_matmul` — weights in a narrow format with block scales
  (DequantizeLinear with ``block_size``) times a float32 input, with a float64 numpy answer.

Values are chosen so that every correct implementation gives the same bits: small integers,
halves and powers of two that every format in question represents, sums that stay representable.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from attrs import field, frozen
from onnx import TensorProto, helper, numpy_helper

from hal.capabilities import Capabilities, NumberFormat, Support
from hal.compiler.legalize import wide_format

__all__ = [
    "FEED_KINDS",
    "UNKNOWN_DOMAIN",
    "Probe",
    "block_dequantized_matmul",
    "compute_probes",
    "first_opset",
    "formats_at",
    "io_model",
    "make",
    "none_probes",
    "opset_for",
    "same_values",
    "storage_probes",
    "user_feeds",
    "values",
]

F = NumberFormat

#: An operator domain no device implements: a model using it must be refused with a HalError.
UNKNOWN_DOMAIN = "org.onnx-hal.kit"

#: Formats whose arithmetic MatMul's schema accepts (the core compute operator of most models).
_MATMUL_FORMATS = frozenset({F.FLOAT16, F.FLOAT32, F.FLOAT64, F.BFLOAT16, F.INT32, F.INT64, F.UINT32, F.UINT64})


@frozen
class Probe:
    """One model to run on a device and what it must answer.

    ``required``: the device must run it (a refusal fails the check); otherwise a
    :class:`~hal.errors.HalError` refusal is acceptable, but a wrong answer never is.
    """

    name: str
    model: onnx.ModelProto = field(repr=False)
    feeds: dict[str, np.ndarray] = field(repr=False)
    expected: dict[str, np.ndarray] = field(repr=False)
    required: bool = True


# -- formats and opsets ---------------------------------------------------------------------------


def formats_at(capabilities: Capabilities, levels: Iterable[Support | str]) -> list[NumberFormat]:
    """The formats ``capabilities`` rates at one of ``levels``, in ONNX type-code order, leaving
    out those the installed onnx package has no element type for."""
    wanted = {Support(level) for level in levels}
    known = set(TensorProto.DataType.values())
    return [f for f in NumberFormat if capabilities.support(f) in wanted and f.onnx_type in known]


def _type_str(fmt: NumberFormat) -> str:
    return f"tensor({TensorProto.DataType.Name(fmt.onnx_type).lower()})"


@functools.cache
def first_opset(op: str, fmt: NumberFormat, input_index: int = 0) -> int | None:
    """The first default-domain opset whose ``op`` accepts ``fmt`` at input ``input_index``
    (None if none does, up to the newest opset the installed onnx knows)."""
    wanted = _type_str(fmt)
    for version in range(1, onnx.defs.onnx_opset_version() + 1):
        try:
            schema = onnx.defs.get_schema(op, version)
        except onnx.defs.SchemaError:
            continue
        if input_index >= len(schema.inputs):
            continue
        type_str = schema.inputs[input_index].type_str
        for constraint in schema.type_constraints:
            if constraint.type_param_str == type_str and wanted in constraint.allowed_type_strs:
                return version
        if type_str == wanted:
            return version
    return None


#: Probes are written at this opset at least (where the device reads it), as today's models are.
MODERN_OPSET = 13


def opset_for(capabilities: Capabilities, *needed: int | None) -> int | None:
    """The opset for a probe: the newest of ``needed`` (first opsets of the operators it uses,
    see :func:`first_opset`), :data:`MODERN_OPSET` and the device's minimum; None when one of
    ``needed`` is None or the result is beyond the newest opset the device reads."""
    if any(n is None for n in needed):
        return None
    base = min(max(capabilities.opsets.min, MODERN_OPSET), capabilities.opsets.max)
    opset = max([base, *(n for n in needed if n is not None)])
    newest = max(capabilities.opsets.max, capabilities.opsets.max_loadable or 0)
    return opset if opset <= newest else None


def make(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, NumberFormat, Sequence[int | str]]],
    outputs: Sequence[tuple[str, NumberFormat, Sequence[int | str]]],
    *,
    opset: int,
    initializers: Sequence[TensorProto] = (),
    name: str = "probe",
) -> onnx.ModelProto:
    """A model at ``opset`` with the oldest IR version that opset allows."""
    graph = helper.make_graph(
        list(nodes),
        name,
        [helper.make_tensor_value_info(n, f.onnx_type, list(s)) for n, f, s in inputs],
        [helper.make_tensor_value_info(n, f.onnx_type, list(s)) for n, f, s in outputs],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


# -- values ------------------------------------------------------------------------------------------


def values(fmt: NumberFormat, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Values every implementation of ``fmt`` holds exactly: for floats, small halves and
    integers that even float4_e2m1 represents (powers of two for float8_e8m0); for integers, the
    lower half of the format's range (so that the sum of two fits); fair coin flips for bool."""
    shape = tuple(shape)
    if fmt is F.BOOL:
        return rng.random(shape) < 0.5
    if fmt is F.STRING:
        return np.array([f"s{v}" for v in rng.integers(0, 100, int(np.prod(shape)))], dtype=object).reshape(shape)
    if fmt in (F.COMPLEX64, F.COMPLEX128):
        return (rng.integers(-3, 4, shape) + 1j * rng.integers(-3, 4, shape)).astype(fmt.dtype)
    if fmt is F.FLOAT8_E8M0:
        return (2.0 ** rng.integers(-3, 4, shape)).astype(fmt.dtype)
    if fmt.is_float:
        return rng.choice([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], shape).astype(fmt.dtype)
    info_bits = min(fmt.bits, 16)
    if fmt.value.startswith("u"):
        return rng.integers(0, 2 ** (info_bits - 1), shape).astype(fmt.dtype)
    half = 2 ** (info_bits - 2)
    return rng.integers(-half, half, shape).astype(fmt.dtype)


def _wide(fmt: NumberFormat) -> np.dtype:
    """The numpy dtype that computes ``fmt``'s probes exactly."""
    if fmt.is_float:
        return np.dtype(np.float64)
    if fmt in (F.COMPLEX64, F.COMPLEX128):
        return np.dtype(np.complex128)
    if fmt in (F.BOOL, F.STRING):
        return fmt.dtype
    return np.dtype(np.int64)


def same_values(got: np.ndarray, want: np.ndarray) -> bool:
    """Same element type, shape and values (exactly; NaN equal to NaN)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype == object or want.dtype == np.bool_:
        return bool(np.array_equal(got, want))
    fmt = NumberFormat.from_dtype(want.dtype)
    wide = _wide(fmt)
    return bool(np.array_equal(got.astype(wide), want.astype(wide), equal_nan=fmt.is_float))


# -- declared levels hold ------------------------------------------------------------------------


def compute_probes(fmt: NumberFormat, capabilities: Capabilities, seed: int = 0) -> list[Probe]:
    """What a ``native`` or ``emulated`` format must compute: an elementwise operator in the
    format (``Add``; ``Mul`` for float8_e8m0, ``Or`` for bool, ``Concat`` for strings), and MatMul
    where its schema takes the format. ONNX's schemas give ``Add`` no float8, float4 or 2/4-bit
    types; a device that says it computes them must still run ``Add`` in them, since the core
    passes such nodes to it unchanged. Empty when no opset the device reads holds the format."""
    rng = np.random.default_rng(seed)
    shape = (4, 8)
    a = values(fmt, shape, rng)
    if fmt.is_float and fmt is not F.FLOAT8_E8M0:
        b = np.where(rng.random(shape) < 0.5, a, np.zeros(shape, a.dtype))  # a + b is a or 2a: representable
    else:
        b = values(fmt, shape, rng)  # integers from the lower half of the range; powers of two
    wide = _wide(fmt)
    if fmt is F.BOOL:
        op, want = "Or", a | b
    elif fmt is F.STRING:
        op, want = "Concat", np.concatenate([a, b])
    elif fmt is F.FLOAT8_E8M0:
        op, want = "Mul", (a.astype(wide) * b.astype(wide)).astype(fmt.dtype)
    else:
        op, want = "Add", (a.astype(wide) + b.astype(wide)).astype(fmt.dtype)
    probes = []
    opset = opset_for(capabilities, first_opset("Identity", fmt), first_opset(op, fmt) or 14)
    if opset is not None:
        attrs = {"axis": 0} if op == "Concat" else {}
        out_shape = [8, 8] if op == "Concat" else list(shape)
        model = make(
            [helper.make_node(op, ["a", "b"], ["y"], **attrs)],
            [("a", fmt, shape), ("b", fmt, shape)],
            [("y", fmt, out_shape)],
            opset=opset,
            name=f"{op.lower()}_{fmt.value}",
        )
        probes.append(Probe(f"{op} in {fmt.value}", model, {"a": a, "b": b}, {"y": want}))
    if fmt in _MATMUL_FORMATS:
        opset = opset_for(capabilities, first_opset("MatMul", fmt))
        if opset is not None:
            x = rng.integers(-3, 4, (4, 8)).astype(fmt.dtype)  # integer products: exact everywhere
            w = rng.integers(-3, 4, (8, 4)).astype(fmt.dtype)
            model = make(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                [("x", fmt, (4, 8)), ("w", fmt, (8, 4))],
                [("y", fmt, (4, 4))],
                opset=opset,
                name=f"matmul_{fmt.value}",
            )
            want = (x.astype(wide) @ w.astype(wide)).astype(fmt.dtype)
            probes.append(Probe(f"MatMul in {fmt.value}", model, {"x": x, "w": w}, {"y": want}))
    return probes


def storage_probes(fmt: NumberFormat, capabilities: Capabilities, seed: int = 0) -> list[Probe]:
    """What a ``storage`` format must do: convert exactly to the format the device computes it in
    (``Cast``; required where the core has a wider format for it) and move exactly: ``Reshape``,
    ``Transpose`` and ``Identity`` in the format, required where the device declares the format
    :attr:`~hal.Capabilities.movable`; elsewhere ``Identity`` (which the core lowers through the
    wider format) may be refused but must not answer wrong."""
    rng = np.random.default_rng(seed)
    x = values(fmt, (3, 4), rng)
    probes = []
    wide = wide_format(fmt, capabilities)
    if wide is not None and fmt not in (F.COMPLEX64, F.COMPLEX128):
        opset = opset_for(capabilities, first_opset("Cast", fmt))
        if opset is not None:
            model = make(
                [helper.make_node("Cast", ["x"], ["y"], to=wide.onnx_type)],
                [("x", fmt, (3, 4))],
                [("y", wide, (3, 4))],
                opset=opset,
                name=f"cast_{fmt.value}",
            )
            want = x.astype(wide.dtype)
            probes.append(Probe(f"Cast {fmt.value} to {wide.value}", model, {"x": x}, {"y": want}))
    movable = fmt in capabilities.movable
    opset = opset_for(capabilities, first_opset("Identity", fmt), first_opset("Reshape", fmt) if movable else 1)
    if opset is not None:
        if movable:
            shape = helper.make_tensor("shape", TensorProto.INT64, [2], [4, 3])
            nodes = [
                helper.make_node("Reshape", ["x", "shape"], ["r"]),
                helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
                helper.make_node("Identity", ["t"], ["y"]),
            ]
            model = make(nodes, [("x", fmt, (3, 4))], [("y", fmt, (3, 4))], opset=opset, initializers=[shape])
            want = np.ascontiguousarray(x.reshape(4, 3).T)
            probes.append(Probe(f"Reshape, Transpose, Identity in {fmt.value}", model, {"x": x}, {"y": want}))
        else:
            model = make(
                [helper.make_node("Identity", ["x"], ["y"])], [("x", fmt, (3, 4))], [("y", fmt, (3, 4))], opset=opset
            )
            probes.append(Probe(f"Identity in {fmt.value}", model, {"x": x}, {"y": x.copy()}, required=False))
    return probes


def none_probes(fmt: NumberFormat, capabilities: Capabilities, seed: int = 0) -> list[Probe]:
    """Models that hold a format rated ``none``: the format as a graph input (``Identity``) and
    as an intermediate (``Cast`` from float32 and back). The device must refuse them with a
    :class:`~hal.errors.HalError` or, if the core lowers them, answer exactly."""
    rng = np.random.default_rng(seed)
    probes = []
    has_dtype = True
    try:
        fmt.dtype  # noqa: B018 - float6 formats have no numpy dtype
    except KeyError:
        has_dtype = False
    floor = capabilities.opsets.min
    if has_dtype:
        version = first_opset("Identity", fmt)
        if version is not None:
            x = values(fmt, (2, 3), rng)
            model = make(
                [helper.make_node("Identity", ["x"], ["y"])], [("x", fmt, (2, 3))], [("y", fmt, (2, 3))],
                opset=max(version, floor),
            )
            probes.append(Probe(f"{fmt.value} input", model, {"x": x}, {"y": x.copy()}, required=False))
    version = first_opset("Cast", F.FLOAT32)
    to_version = first_opset("Cast", fmt)
    if to_version is not None and fmt not in (F.COMPLEX64, F.COMPLEX128):
        pool = {F.BOOL: [0.0, 1.0], F.FLOAT8_E8M0: [0.5, 1.0, 2.0, 4.0]}.get(
            fmt, [0.0, 1.0, 2.0, 3.0] if not fmt.is_float and fmt.value.startswith("u") else [-2.0, -1.0, 0.0, 1.0]
        )
        x = rng.choice(pool, (2, 3)).astype(np.float32)
        model = make(
            [
                helper.make_node("Cast", ["x"], ["c"], to=fmt.onnx_type),
                helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
            ],
            [("x", F.FLOAT32, (2, 3))],
            [("y", F.FLOAT32, (2, 3))],
            opset=max(version or 1, to_version, floor),
        )
        probes.append(Probe(f"float32 -> {fmt.value} -> float32", model, {"x": x}, {"y": x.copy()}, required=False))
    return probes


# -- feeds as users have them ----------------------------------------------------------------------

#: Every kind of array :func:`user_feeds` makes.
FEED_KINDS = (
    "contiguous",
    "read-only-buffer",
    "read-only-flag",
    "strided",
    "reversed",
    "fortran",
    "broadcast",
    "memory-mapped",
    "zero-size",
    "mixed",
)


def io_model(fmt: NumberFormat, shape: Sequence[int | str], opset: int) -> onnx.ModelProto:
    """``y = a - b``, ``t = transpose(a)``, ``i = identity(b)`` for two inputs of ``shape``:
    non-commutative, layout-sensitive, and an output that could alias an input."""
    rows, cols = shape
    return make(
        [
            helper.make_node("Sub", ["a", "b"], ["y"]),
            helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0]),
            helper.make_node("Identity", ["b"], ["i"]),
        ],
        [("a", fmt, (rows, cols)), ("b", fmt, (rows, cols))],
        [("y", fmt, (rows, cols)), ("t", fmt, (cols, rows)), ("i", fmt, (rows, cols))],
        opset=opset,
        name="io",
    )


def io_expected(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """What :func:`io_model` answers for ``a`` and ``b``, computed by numpy."""
    a, b = np.array(a), np.array(b)
    return {"y": a - b, "t": np.ascontiguousarray(a.T), "i": b.copy()}


def _arrange(kind: str, value: np.ndarray, directory: Path, name: str) -> np.ndarray:
    """``value``'s elements as an array of ``kind``."""
    if kind == "contiguous":
        return value.copy()
    if kind == "read-only-buffer":
        return np.frombuffer(value.tobytes(), dtype=value.dtype).reshape(value.shape)
    if kind == "read-only-flag":
        out = value.copy()
        out.flags.writeable = False
        return out
    if kind == "strided":
        big = np.zeros((value.shape[0] * 2, value.shape[1] * 3), value.dtype)
        big[::2, ::3] = value
        return big[::2, ::3]
    if kind == "reversed":
        return np.ascontiguousarray(value[::-1, ::-1])[::-1, ::-1]
    if kind == "fortran":
        return np.asfortranarray(value)
    if kind == "broadcast":
        return np.broadcast_to(value[:1], value.shape)  # zero stride along the rows, read-only
    if kind == "memory-mapped":
        path = directory / f"{name}.npy"
        np.save(path, value)
        return np.load(path, mmap_mode="r")
    msg = f"unknown feed kind {kind!r}; kinds: {', '.join(FEED_KINDS)}"
    raise ValueError(msg)


def user_feeds(
    kind: str, a: np.ndarray, b: np.ndarray, directory: Path
) -> dict[str, np.ndarray]:
    """Feeds ``a`` and ``b`` for :func:`io_model` as arrays of ``kind`` (:data:`FEED_KINDS`;
    ``zero-size`` is the caller's: it needs a model whose first dimension may be 0). Compare the
    answers with :func:`io_expected` of the feeds themselves (a broadcast view repeats a row)."""
    if kind == "mixed":
        return {"a": _arrange("strided", a, directory, "a"), "b": _arrange("read-only-buffer", np.asfortranarray(b), directory, "b")}
    return {"a": _arrange(kind, a, directory, "a"), "b": _arrange(kind, b, directory, "b")}


# -- the precision contract ------------------------------------------------------------------------


def block_dequantized_matmul(
    element: NumberFormat, scale: NumberFormat, block: int, *, k: int = 256, n: int = 16, seed: int = 0
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """``y = x @ DequantizeLinear(q, s, axis=0, block_size=block)``: weights ``q`` [k, n] in
    ``element``, one ``scale`` per ``block`` rows, ``x`` [2, k] float32, and the answer computed
    in float64 by numpy. None when the installed onnx has no DequantizeLinear for the pair."""
    rng = np.random.default_rng(seed)
    for_element, for_scale = first_opset("DequantizeLinear", element), first_opset("DequantizeLinear", scale, 1)
    if for_element is None or for_scale is None:
        return None
    version = max(for_element, for_scale, 21)  # block_size is in DequantizeLinear from opset 21
    q = rng.uniform(-3, 3, (k, n)).astype(np.float32).astype(element.dtype)
    attrs: dict[str, Any] = {"axis": 0, "block_size": block}
    if scale is F.FLOAT8_E8M0:
        s = (2.0 ** rng.integers(-4, 0, (k // block, n))).astype(scale.dtype)
        attrs["output_dtype"] = TensorProto.FLOAT  # float8_e8m0 cannot hold the products
    else:
        s = rng.uniform(0.01, 0.1, (k // block, n)).astype(np.float32).astype(scale.dtype)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], **attrs)]
    if scale not in (F.FLOAT32, F.FLOAT8_E8M0):
        nodes.append(helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["x", nodes[-1].output[0]], ["y"]))
    model = make(
        nodes,
        [("x", F.FLOAT32, (2, k))],
        [("y", F.FLOAT32, (2, n))],
        opset=version,
        initializers=[numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")],
        name=f"dequant_{element.value}_{scale.value}_{block}",
    )
    x = rng.standard_normal((2, k)).astype(np.float32)
    w = q.astype(np.float64) * np.repeat(s.astype(np.float64), block, axis=0)
    if scale not in (F.FLOAT32, F.FLOAT8_E8M0):
        w = w.astype(scale.dtype).astype(np.float64)  # DequantizeLinear answers in the scale's format
    return model, {"x": x}, {"y": (x.astype(np.float64) @ w).astype(np.float32)}


def probe_feeds(probe: Probe) -> dict[str, Any]:
    """Fresh copies of a probe's feeds (a run may not keep or change them)."""
    return {k: v.copy() for k, v in probe.feeds.items()}
