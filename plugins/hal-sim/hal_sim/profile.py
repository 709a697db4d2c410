"""Chip profiles: one TOML file per simulated chip, every figure with its source.

A profile is data, not code: a vendor describes an unreleased chip without writing Python. The
shipped ones are in ``hal_sim/profiles/``; ``HAL_SIM_PROFILES=DIR`` (several directories joined by
``os.pathsep``) adds a user's own, and a user's profile named like a shipped one replaces it (the
device's details say so). A profile's name is its file name without ``.toml``: lower case
letters, digits, ``.`` and ``-`` (``h100``, ``ascend-910c``, ``acme-x1``).

The schema (version 1)
======================

Every *figure* — a claim about the chip — is an inline table with its ``value`` and its
``source``; ``verified = true`` only where the figure appears in the project's
``shared/reference/chips.md`` and is not marked "secondary" there (the default is false, so a
figure is unverified unless its author says otherwise). A figure without a source is refused::

    capacity_gib = {value = 80, source = "chips.md: NVIDIA H100 datasheet", verified = true}
    launch_overhead_us = {value = 5.0, source = "unverified: a typical kernel launch, not measured"}

A figure that is not known is left out; the device then declares nothing for it (no capacity: no
memory limit is enforced; no peak: the estimate has no compute figure for that format). Keys:

``schema`` (int, required)
    ``1``.
``vendor``, ``model`` (strings, required); ``kind`` (required: ``"gpu"``, ``"npu"`` or ``"cpu"``, the
    real chip's kind; the simulated device's kind is always ``simulated``); ``notes`` (string).
``[[formats]]`` (required, one table per group of formats sharing a level and a source)
    ``level`` (``native``, ``emulated``, ``storage`` or ``none``), ``formats`` (a list of
    :class:`hal.NumberFormat` values: ``float32``, ``bfloat16``, ``float8_e4m3fn`` ...), ``source``,
    ``verified``. A format named by no group is ``none``; a format named twice is refused.
``[[scaled]]`` (optional, one table per block-scaled format)
    ``element``, ``scale`` (formats), ``block`` (a list of positive ints: ``[1, 32]`` is MX),
    ``support`` (a level, default ``native``), ``source``, ``verified``.
``e8m0_encoding`` (figure, optional)
    ``"ocp"`` (OCP MX / ONNX: 0x00 = 2^-127) or ``"cann-zero"`` (Huawei CANN: 0x00 = 0).
``[memory]``
    ``capacity_gib`` (figure, GiB = 2^30 bytes: the "80 GB" of an H100 are 80 GiB of HBM; may
    be fractional), ``bandwidth_gbps`` (figure, GB/s = 10^9 bytes per second).
``[peak_tflops]``
    ``<format> = figure``: dense (not sparse) peak throughput in TFLOPS (TOPS for integers).
``[interconnect]``
    ``kind`` (figure: ``nvlink``, ``hccs``, ``pcie``, ``infinity-fabric``, ``roce``, ``mtlink``,
    ``none``), ``bandwidth_gbps``, ``links``, ``latency_us`` (figures).
``[software]`` (the real chip's software stack)
    ``maturity`` (figure: ``stable``, ``beta`` or ``experimental``; shown in details, the device's
    own maturity is ``simulated``), ``incompatibilities`` (figure: a list of sentences, declared
    on the device), ``opsets`` (figure: ``[min, max]`` default-domain opsets; absent: what the
    simulator's onnxruntime reads), ``domains`` (figure: extra operator domains, e.g.
    ``["com.microsoft"]``), ``dynamic_shapes`` (figure: bool; absent: true, as onnxruntime),
    ``unsupported_ops`` (figure: op types, ``"Op"`` for ONNX's own domain, ``"domain:Op"``
    otherwise), ``launch_overhead_us`` (figure: the fixed cost of one kernel launch in
    microseconds, for the roofline estimate).

Any other key is refused (a typo must not silently drop a figure). Errors are
:class:`ProfileError`: the file, the key, what was expected and the fix.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import frozen

from hal.plugin import HalError, NumberFormat, Support

__all__ = [
    "PROFILE_DIR",
    "PROFILES_VARIABLE",
    "Figure",
    "Profile",
    "ProfileError",
    "load_profile",
    "profile_paths",
]

log = logging.getLogger("hal_sim")

#: The profiles shipped with the package.
PROFILE_DIR = Path(__file__).with_name("profiles")

#: The environment variable naming a user's profile directories (``os.pathsep``-separated).
PROFILES_VARIABLE = "HAL_SIM_PROFILES"

SCHEMA = 1
_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
_KINDS = ("gpu", "npu", "cpu")
_LEVELS = tuple(s.value for s in Support)
_MATURITIES = ("stable", "beta", "experimental")
_LINKS = ("nvlink", "hccs", "pcie", "infinity-fabric", "roce", "mtlink", "none")
_ENCODINGS = ("ocp", "cann-zero")
_TOP_LEVEL = (
    "schema", "vendor", "model", "kind", "notes", "formats", "scaled", "e8m0_encoding", "memory", "peak_tflops",
    "interconnect", "software",
)


class ProfileError(HalError, ValueError):
    """A profile file cannot be used. ``path`` is the file, ``key`` the offending key (dotted,
    ``memory.capacity_gib``; empty for the file as a whole)."""

    def __init__(self, path: Path | str, key: str, problem: str, fix: str) -> None:
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(f"hal-sim profile {where}{problem}; {fix}")
        self.path = Path(path)
        self.key = key


@frozen
class Figure:
    """One claim about a chip and where it comes from."""

    value: Any
    source: str
    verified: bool = False

    def describe(self) -> str:
        marked = self.verified or self.source.lower().startswith("unverified")
        return self.source if marked else f"{self.source} (unverified)"


@frozen
class FormatGroup:
    level: Support
    formats: tuple[NumberFormat, ...]
    source: str
    verified: bool


@frozen
class ScaledEntry:
    element: NumberFormat
    scale: NumberFormat
    block: tuple[int, ...]
    support: Support
    source: str
    verified: bool


@frozen
class Profile:
    """A parsed profile. Figures absent from the file are None (or empty)."""

    name: str
    path: Path
    vendor: str
    model: str
    kind: str
    notes: str
    formats: tuple[FormatGroup, ...]
    scaled: tuple[ScaledEntry, ...]
    e8m0_encoding: Figure | None
    memory: Mapping[str, Figure]
    peak_tflops: Mapping[NumberFormat, Figure]
    interconnect: Mapping[str, Figure]
    software: Mapping[str, Figure]
    shipped: bool

    def figure(self, key: str) -> Figure | None:
        """A figure by its dotted key (``memory.capacity_gib``, ``peak_tflops.bfloat16``,
        ``e8m0_encoding``), or None when the profile does not declare it."""
        if key == "e8m0_encoding":
            return self.e8m0_encoding
        section, _, name = key.partition(".")
        table: Mapping[Any, Figure] | None = {
            "memory": self.memory, "interconnect": self.interconnect, "software": self.software,
        }.get(section)
        if section == "peak_tflops":
            return self.peak_tflops.get(NumberFormat(name))
        return None if table is None else table.get(name)

    def levels(self) -> dict[NumberFormat, Support]:
        return {fmt: group.level for group in self.formats for fmt in group.formats}

    def unverified(self) -> list[str]:
        """Dotted keys of every unverified figure, for the device's details."""
        keys = [f"formats.{g.level.value}" for g in self.formats if not g.verified]
        keys += [f"scaled.{s.element.value}x{s.scale.value}" for s in self.scaled if not s.verified]
        if self.e8m0_encoding is not None and not self.e8m0_encoding.verified:
            keys.append("e8m0_encoding")
        for section, table in (("memory", self.memory), ("interconnect", self.interconnect), ("software", self.software)):
            keys += [f"{section}.{k}" for k, f in table.items() if not f.verified]
        keys += [f"peak_tflops.{k.value}" for k, f in self.peak_tflops.items() if not f.verified]
        return list(dict.fromkeys(keys))


# -- finding profiles -----------------------------------------------------------------------------


def user_dirs() -> list[Path]:
    """The directories ``HAL_SIM_PROFILES`` names, in order (empty entries skipped)."""
    raw = os.environ.get(PROFILES_VARIABLE, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def profile_paths() -> dict[str, tuple[Path, Path | None]]:
    """Every profile name -> (its file, the shipped file it replaces or None). Shipped profiles
    first; each ``HAL_SIM_PROFILES`` directory in order, a later one replacing an earlier one's
    profile of the same name. A directory that does not exist is logged and skipped."""
    found: dict[str, tuple[Path, Path | None]] = {p.stem: (p, None) for p in sorted(PROFILE_DIR.glob("*.toml"))}
    shipped = {name: path for name, (path, _) in found.items()}
    for directory in user_dirs():
        if not directory.is_dir():
            log.warning("%s names %s, which is not a directory; no profiles read from it", PROFILES_VARIABLE, directory)
            continue
        for path in sorted(directory.glob("*.toml")):
            found[path.stem] = (path, shipped.get(path.stem))
    return found


# -- parsing --------------------------------------------------------------------------------------


def load_profile(path: Path | str, *, shipped: bool = False) -> Profile:
    """Read and check one profile file. Raises :class:`ProfileError` naming the file, the key and
    the fix."""
    path = Path(path)
    name = path.stem
    if not _NAME.match(name):
        raise ProfileError(
            path, "", f"the file name {name!r} is not a profile name",
            "name it in lower case letters, digits, '.' and '-' (acme-x1.toml)",
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(path, "", f"cannot be read ({exc})", "check the path and its permissions") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(path, "", f"is not valid TOML ({exc})", "fix the syntax (https://toml.io)") from None
    return _Reader(path).profile(name, data, shipped)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str, fix: str) -> ProfileError:
        return ProfileError(self.path, key, problem, fix)

    def keys(self, key: str, table: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str] = ()) -> None:
        allowed = tuple(allowed)
        for k in table:
            if k not in allowed:
                where = f"{key}.{k}" if key else k
                fix = f"use one of {', '.join(allowed)} (schema {SCHEMA})"
                if key and k in _TOP_LEVEL:
                    fix += f"; a key written below [{key.split('[')[0]}] belongs to it: move {k} above the first table"
                raise self.fail(where, "unknown key", fix)
        for k in required:
            if k not in table:
                where = f"{key}.{k}" if key else k
                raise self.fail(where, "missing", "every profile declares it (see the schema in hal_sim/profile.py)")

    def table(self, key: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"is {_kind(value)}, not a table", f"write [{key}] with its keys beneath")
        return value

    def string(self, key: str, value: Any, choices: Iterable[str] | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"is {_kind(value)}, not a non-empty string", "write a quoted string")
        if choices is not None and value not in (choices := tuple(choices)):
            raise self.fail(key, f"is {value!r}", f"use one of {', '.join(choices)}")
        return value

    def source(self, key: str, entry: Mapping[str, Any]) -> tuple[str, bool]:
        if "source" not in entry:
            raise self.fail(
                key, "has no source",
                "say where the figure comes from: source = \"chips.md: ...\", or \"unverified: <why>\" "
                "with verified = false; leave the figure out if nothing is known",
            )
        source = self.string(f"{key}.source", entry["source"])
        verified = entry.get("verified", False)
        if not isinstance(verified, bool):
            raise self.fail(f"{key}.verified", f"is {_kind(verified)}", "write true or false")
        return source, verified

    def figure(self, key: str, value: Any, check: Any) -> Figure:
        if not isinstance(value, Mapping):
            raise self.fail(
                key, f"is {_kind(value)} with no source",
                f"write {key.rpartition('.')[2]} = {{value = {_toml(value)}, source = \"...\", verified = false}}",
            )
        self.keys(key, value, ("value", "source", "verified"), ("value",))
        source, verified = self.source(key, value)
        return Figure(check(f"{key}.value", value["value"]), source, verified)

    # value checks, each returning the value as the profile means it

    def number(self, key: str, value: Any, *, positive: bool = True) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise self.fail(key, f"is {_kind(value)}, not a number", "write a number such as 80 or 3.35")
        if positive and value <= 0:
            raise self.fail(key, f"is {value}, not positive", "write a positive number, or leave the figure out")
        return float(value)

    def count(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, f"is {value!r}, not a positive integer", "write a whole number such as 18")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"is {_kind(value)}, not a boolean", "write true or false")
        return value

    def fmt(self, key: str, value: Any) -> NumberFormat:
        try:
            return NumberFormat(value)
        except ValueError:
            raise self.fail(
                key, f"{value!r} is not a number format",
                f"use hal.NumberFormat values: {', '.join(f.value for f in NumberFormat)}",
            ) from None

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(key, f"is {_kind(value)}, not a list of strings", 'write ["...", "..."]')
        return tuple(value)

    def ops(self, key: str, value: Any) -> tuple[str, ...]:
        ops = self.strings(key, value)
        for op in ops:
            domain, _, name = op.rpartition(":")
            if not name.isidentifier() or domain == "ai.onnx":
                raise self.fail(key, f"{op!r} is not an operator", "write 'Op' for ONNX's own domain, 'domain:Op' otherwise")
        return ops

    def opsets(self, key: str, value: Any) -> tuple[int, int]:
        if (
            not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            or value[0] > value[1]
        ):
            raise self.fail(key, f"is {value!r}", "write [min, max] default-domain opsets, min <= max, such as [13, 21]")
        return (value[0], value[1])

    # the sections

    def profile(self, name: str, data: Mapping[str, Any], shipped: bool) -> Profile:
        self.keys("", data, _TOP_LEVEL, ("schema", "vendor", "model", "kind", "formats"))
        if data["schema"] != SCHEMA:
            raise self.fail("schema", f"is {data['schema']!r}", f"this hal-sim reads schema {SCHEMA}")
        notes = data.get("notes", "")
        if not isinstance(notes, str):
            raise self.fail("notes", f"is {_kind(notes)}", "write a quoted string")
        return Profile(
            name=name,
            path=self.path,
            vendor=self.string("vendor", data["vendor"]),
            model=self.string("model", data["model"]),
            kind=self.string("kind", data["kind"], _KINDS),
            notes=notes,
            formats=self.formats(data["formats"]),
            scaled=self.scaled(data.get("scaled", [])),
            e8m0_encoding=(
                self.figure("e8m0_encoding", data["e8m0_encoding"], lambda k, v: self.string(k, v, _ENCODINGS))
                if "e8m0_encoding" in data else None
            ),
            memory=self.section("memory", data, {
                "capacity_gib": self.number, "bandwidth_gbps": self.number,
            }),
            peak_tflops=self.peaks(data.get("peak_tflops", {})),
            interconnect=self.section("interconnect", data, {
                "kind": lambda k, v: self.string(k, v, _LINKS), "bandwidth_gbps": self.number,
                "links": self.count, "latency_us": self.number,
            }),
            software=self.section("software", data, {
                "maturity": lambda k, v: self.string(k, v, _MATURITIES),
                "incompatibilities": self.strings,
                "opsets": self.opsets,
                "domains": self.strings,
                "dynamic_shapes": self.boolean,
                "unsupported_ops": self.ops,
                "launch_overhead_us": lambda k, v: self.number(k, v, positive=False),
            }),
            shipped=shipped,
        )

    def section(self, key: str, data: Mapping[str, Any], checks: Mapping[str, Any]) -> dict[str, Figure]:
        table = self.table(key, data.get(key, {}))
        self.keys(key, table, checks)
        return {k: self.figure(f"{key}.{k}", v, checks[k]) for k, v in table.items()}

    def peaks(self, value: Any) -> dict[NumberFormat, Figure]:
        table = self.table("peak_tflops", value)
        return {
            self.fmt(f"peak_tflops.{k}", k): self.figure(f"peak_tflops.{k}", v, self.number) for k, v in table.items()
        }

    def groups(self, key: str, value: Any) -> list[Mapping[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.fail(key, f"is {_kind(value)}", f"write one [[{key}]] table per entry")
        return value

    def formats(self, value: Any) -> tuple[FormatGroup, ...]:
        groups = []
        seen: dict[NumberFormat, int] = {}
        for i, entry in enumerate(self.groups("formats", value)):
            key = f"formats[{i}]"
            self.keys(key, entry, ("level", "formats", "source", "verified"), ("level", "formats"))
            level = Support(self.string(f"{key}.level", entry["level"], _LEVELS))
            names = entry["formats"]
            if not isinstance(names, list) or not names:
                raise self.fail(f"{key}.formats", f"is {_kind(names)}", 'write a non-empty list: ["float32", "float16"]')
            fmts = tuple(self.fmt(f"{key}.formats", n) for n in names)
            for fmt in fmts:
                if fmt in seen:
                    raise self.fail(
                        f"{key}.formats", f"{fmt.value} is already in formats[{seen[fmt]}]",
                        "give each format one level",
                    )
                seen[fmt] = i
            source, verified = self.source(key, entry)
            groups.append(FormatGroup(level, fmts, source, verified))
        if not groups:
            raise self.fail("formats", "is empty", "declare at least the formats the chip computes in")
        return tuple(groups)

    def scaled(self, value: Any) -> tuple[ScaledEntry, ...]:
        entries = []
        for i, entry in enumerate(self.groups("scaled", value)):
            key = f"scaled[{i}]"
            self.keys(key, entry, ("element", "scale", "block", "support", "source", "verified"), ("element", "scale", "block"))
            block = entry["block"]
            if not isinstance(block, list) or not block or not all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block
            ):
                raise self.fail(f"{key}.block", f"is {block!r}", "write positive integers: [1, 32] for MX, [128, 128]")
            source, verified = self.source(key, entry)
            entries.append(
                ScaledEntry(
                    self.fmt(f"{key}.element", entry["element"]),
                    self.fmt(f"{key}.scale", entry["scale"]),
                    tuple(block),
                    Support(self.string(f"{key}.support", entry.get("support", "native"), _LEVELS)),
                    source,
                    verified,
                )
            )
        return tuple(entries)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value) if isinstance(value, (int, float)) else "..."
