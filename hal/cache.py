"""The on-disk compile cache.

Entries live under ``HAL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/onnx-hal`` or
``~/.cache/onnx-hal``): ``compiled/`` holds models lowered for a device, ``verified/`` the
verdicts of checking them against a reference (:mod:`hal.verification`), ``backends/<name>/``
holds each backend's own artifacts (onnxruntime's optimized models, OpenVINO's blobs, IREE's
vmfbs).

Every entry is written to a temporary file in the same directory and renamed into place, so a
reader sees a whole entry or none, and two processes compiling the same model at once both
succeed and leave one valid entry. Each entry carries a sha256 of its payload; a corrupt or
truncated entry is detected on read, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hal._paths import cache_root

__all__ = ["CompileCache", "atomic_write", "cache_key"]

log = logging.getLogger("hal.cache")

_MAGIC = b"HALC\x01"


def cache_key(**parts: Any) -> str:
    """A sha256 over JSON-serialised parts (model hash, capabilities, versions, options...)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CompileCache:
    """Integrity-checked blobs by key, under ``root`` (default: the HAL cache's ``compiled/``)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "compiled"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> bytes | None:
        """The payload stored under ``key``, or None (a corrupt entry is removed)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("compile cache entry %s unreadable (%s); rebuilding", path, exc)
            return None
        header = len(_MAGIC) + 32
        payload = data[header:]
        if data[: len(_MAGIC)] != _MAGIC or data[len(_MAGIC) : header] != hashlib.sha256(payload).digest():
            log.warning("compile cache entry %s is corrupt or truncated; removing it and rebuilding", path)
            path.unlink(missing_ok=True)
            return None
        return payload

    def put(self, key: str, payload: bytes) -> None:
        try:
            atomic_write(self._path(key), _MAGIC + hashlib.sha256(payload).digest() + payload)
        except OSError as exc:  # a full or read-only disk must not fail the compile
            log.warning("could not write compile cache entry %s: %s", key, exc)


def info() -> dict[str, Any]:
    """Entries and bytes per cache section, for ``hal cache info``."""
    root = cache_root()
    sections: dict[str, dict[str, int]] = {}
    candidates = [root / "compiled", root / "verified"]
    backends = root / "backends"
    if backends.is_dir():
        candidates += sorted(p for p in backends.iterdir() if p.is_dir())
    for section in candidates:
        if not section.is_dir():
            continue
        files = [p for p in section.rglob("*") if p.is_file()]
        name = str(section.relative_to(root))
        sections[name] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return {"root": str(root), "sections": sections}


def clear() -> int:
    """Remove every cache entry the HAL and its backends wrote; returns bytes freed."""
    root = cache_root()
    freed = 0
    for section in (root / "compiled", root / "verified", root / "backends"):
        if section.is_dir():
            freed += sum(p.stat().st_size for p in section.rglob("*") if p.is_file())
            shutil.rmtree(section, ignore_errors=True)
    return freed
