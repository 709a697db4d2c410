"""ONNX -> MLIR (IREE's in-process ONNX importer) -> ``.vmfb`` (``iree-compile`` in a subprocess),
with an on-disk cache of vmfb files.

The compiler runs in a subprocess on purpose: an LLVM assertion or crash in the compiler must
not take the caller's process down, and its diagnostics arrive on stderr where we can pick out
the first meaningful line for a :class:`~hal.errors.CompileError`.

Cache layout (one directory per backend, given by the core)::

    <cache_dir>/<key>.vmfb          the module, loadable by ``iree-run-module`` as is
    <cache_dir>/<key>.vmfb.record   {"key", "sha256", "size", "flags", "compiler", ...}

``key`` hashes the model's sha256 (for a vmfb whose weights are IREE parameters, the sha256 of
its graph without them: see :mod:`hal_iree._parameters`), the target flags, the compiler version and the host CPU (for
``--iree-llvmcpu-target-cpu=host``). The pair is a :class:`hal.cache.Artifact`: the vmfb is moved
into place first, then its record, and a vmfb is loaded only when its record names this key and
its bytes still hash to the recorded sha256. A truncated, overwritten or foreign vmfb is removed
with a WARNING and rebuilt; a cache that cannot be written is skipped with a WARNING.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hal.plugin import Artifact, CompileError

if TYPE_CHECKING:
    import onnx

#: IREE's ONNX importer only covers operators at opset 17 and later (the backend's declared minimum).
MIN_IMPORT_OPSET = 17
#: The newest opset handed to IREE as written: its importer reads an operator at the version the
#: model names (the lowering then refuses what it cannot legalize), and the core's conversion down
#: to an older opset fails for many opset-28 models that IREE runs as they are.
MAX_IMPORT_OPSET = 28
#: The name the model's main graph is imported under, so the runner can find it.
ENTRY = "main"
#: Bumped when the import steps (or anything else that changes the vmfb) change.
_FORMAT = 1

_LOC_PREFIX = re.compile(r"^(?:loc\(.*?\):\s*)+")
_ONNX_OP = re.compile(r'name = "onnx\.(\w+)"|torch\.operator "onnx\.(\w+)"')
_LOCATION = re.compile(r"^(?:<stdin>|-|loc\(.*?\)|[^:\s]*):\d+:\d+:\s*")


@functools.cache
def compiler_version() -> str:
    """``iree-base-compiler``'s version and revision, e.g. ``3.13.0rc20261016@89ece87b8985``.

    Read from ``iree/compiler/version.py`` without importing ``iree.compiler``, whose import loads
    MLIR (about 60 ms): a prepare that finds its vmfb in the cache needs the version for the key
    and nothing else from the compiler.
    """
    version: Any = None
    spec = importlib.util.find_spec("iree.compiler")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
        module_spec = importlib.util.spec_from_file_location("_hal_iree_compiler_version", path)
        if path.is_file() and module_spec is not None and module_spec.loader is not None:
            version = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(version)
    if getattr(version, "VERSION", None) is None:
        try:
            from iree.compiler import version
        except ImportError:
            # A runtime-only install (iree-base-runtime) runs vmfbs compiled elsewhere; with no
            # compiler there is no version to key a cache entry by, and nothing to compile with.
            msg = "iree-base-compiler is not installed (iree.compiler does not import); pip install iree-base-compiler"
            raise CompileError(msg) from None

    revision = (getattr(version, "REVISIONS", {}) or {}).get("IREE", "")
    return f"{version.VERSION}@{revision[:12]}" if revision else str(version.VERSION)


def host_cpu_fingerprint() -> str:
    """A short hash of the host CPU's model and feature flags.

    ``--iree-llvmcpu-target-cpu=host`` bakes the host's features into the vmfb, so a cache
    shared between machines (NFS, a copied cache dir) must not hand one CPU's code to another.
    """
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    text += line
                if key in ("flags", "Features"):
                    break  # the first processor's entry is enough
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for IREE's importer: shapes inferred, main graph named :data:`ENTRY`.

    The importer rejects operators older than opset 17 (e.g. BatchNormalization-9); the backend
    declares ``OpsetRange(17, ...)`` so the core converts such models before ``prepare`` (shown
    by ``hal explain``). Raises :class:`ValueError` for a model below it all the same.
    """
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_IMPORT_OPSET:
        msg = (
            f"the model's opset {opset} is below {MIN_IMPORT_OPSET}, the oldest IREE's ONNX importer "
            "reads (compile it through hal, which converts it)"
        )
        raise ValueError(msg)
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    prepared.graph.name = ENTRY
    return onnx.shape_inference.infer_shapes(prepared, data_prop=True)


def import_onnx(model: onnx.ModelProto, parameters: Mapping[str, str] | None = None) -> bytes:
    """Import a prepared model (see :func:`prepare_onnx`) into MLIR bytecode (torch-onnx dialect).

    ``parameters`` (``{initializer name: key}``, see :mod:`hal_iree._parameters`): those
    initializers are imported as IREE parameters, never read.
    """
    from iree.compiler import ir
    from iree.compiler.extras import onnx_importer

    info = onnx_importer.ModelInfo(model)
    context = ir.Context()
    module = info.create_module(context=context).operation
    if parameters:
        from hal_iree._parameters import import_module

        importer = import_module(info, module, parameters)
    else:
        importer = onnx_importer.NodeImporter.define_function(info.main_graph, module)
    importer.import_all()
    module.verify()
    buffer = io.BytesIO()
    module.write_bytecode(buffer)
    return buffer.getvalue()


def compile_mlir(mlir: bytes, flags: Sequence[str], output: str) -> None:
    """Run ``iree-compile`` on MLIR bytecode, writing the vmfb to ``output``.

    Raises :class:`RuntimeError` whose message is the first error line of the diagnostics.
    """
    from iree.compiler.tools import binaries

    exe = binaries.find_tool("iree-compile")
    cmd = [exe, "-", "--iree-input-type=onnx", *flags, "-o", output]
    proc = subprocess.run(cmd, input=mlir, capture_output=True, check=False)  # noqa: S603
    if proc.returncode != 0:
        raise RuntimeError(diagnostic_summary(proc.stderr.decode("utf-8", "replace"), proc.returncode))


def diagnostic_summary(stderr: str, returncode: int) -> str:
    """The first meaningful line of ``iree-compile``'s diagnostics, without MLIR locations.

    MLIR locations point into the imported IR, which the caller never sees, so they are cut.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            text = _LOC_PREFIX.sub("", line.split("error:", 1)[1].strip())
            op = _ONNX_OP.search(line)
            # The failing op's dump is long and in IREE's terms: keep the ONNX operator name.
            text = text.split(": %", 1)[0].split(": \"torch.", 1)[0].strip()
            if op:
                text += f" (ONNX {op.group(1) or op.group(2)})"
            return text or line
    for line in lines:
        if not line.startswith(("^", "#", "Stack dump", "PLEASE", "0.", "note:")):
            return _LOCATION.sub("", line)
    if returncode < 0:
        return f"iree-compile crashed (signal {-returncode})"
    return f"iree-compile exited with status {returncode}"


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def cache_key(model_sha256: str, target: str, flags: Sequence[str], compiler: str, extra: str = "") -> str:
    """A hex digest naming a cache entry (see the module docstring for what goes in).

    ``model_sha256``: the sha256 (hex) of the model's deterministic serialization.
    """
    import onnx

    digest = hashlib.sha256()
    digest.update(model_sha256.encode())
    meta = json.dumps(
        {"format": _FORMAT, "target": target, "flags": list(flags), "compiler": compiler,
         "onnx": onnx.__version__, "extra": extra},
        sort_keys=True,
    )
    digest.update(b"\0" + meta.encode())
    return digest.hexdigest()


def read_cached(cache_dir: Path, key: str) -> bytes | None:
    """The cached vmfb for ``key`` if present and intact, else None (a damaged one is removed)."""
    return Artifact(cache_dir / f"{key}.vmfb", key).read()


def write_cached(cache_dir: Path, key: str, data: bytes, info: dict[str, Any]) -> None:
    """Store a vmfb and its record (with ``info``); a failure to write only loses the cache entry."""
    Artifact(cache_dir / f"{key}.vmfb", key).write(data, info)


def build_vmfb(
    model: onnx.ModelProto,
    flags: Sequence[str],
    device_id: str,
    workdir: str | None = None,
    parameters: Mapping[str, str] | None = None,
) -> bytes:
    """Import and compile ``model`` with ``flags``; return the vmfb bytes. The initializers named
    in ``parameters`` stay out of it (IREE parameters, given at load).

    Raises :class:`~hal.errors.CompileError` naming ``device_id`` and a one-line reason.
    """
    try:
        prepared = prepare_onnx(model)
    except Exception as exc:
        msg = f"IREE cannot import the model for {device_id}: {_first_line(str(exc)) or type(exc).__name__}"
        raise CompileError(msg) from None
    try:
        mlir = import_onnx(prepared, parameters)
    except Exception as exc:  # OnnxImportError, MLIRError, KeyError for unknown types, ...
        msg = f"IREE's ONNX importer rejected the model for {device_id}: {_first_line(str(exc)) or type(exc).__name__}"
        raise CompileError(msg) from None
    with tempfile.TemporaryDirectory(prefix="hal-iree-", dir=workdir) as tmp:
        output = os.path.join(tmp, "module.vmfb")
        try:
            compile_mlir(mlir, flags, output)
        except RuntimeError as exc:
            msg = f"iree-compile failed for {device_id}: {exc}"
            raise CompileError(msg) from None
        with open(output, "rb") as fh:
            return fh.read()
