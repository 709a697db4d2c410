"""The on-disk compile cache.

Entries live under ``HAL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/onnx-hal`` or
``~/.cache/onnx-hal``): ``compiled/`` holds models lowered for a device, ``verified/`` the
verdicts of checking them against a reference (:mod:`hal.verification`), ``backends/<name>/``
holds each backend's own artifacts (onnxruntime's optimized models, OpenVINO's model files and
blobs, IREE's vmfbs).

Every file is written to a temporary name in the same directory and renamed into place, so a
reader sees a whole file or none, and two processes compiling the same model at once both
succeed and leave one valid entry.

What is checked on read, before anything is used:

- a :class:`CompileCache` entry carries a sha256 over its key and its payload: an entry that is
  damaged, truncated or was copied to another key's name is removed with a WARNING and rebuilt;
- a backend's :class:`Artifact` (a file its runtime reads) has a record next to it holding the key
  it was built for and the size and sha256 of its bytes, or is named by its own sha256: a changed
  byte, a truncated file or another model's file copied over it is removed with a WARNING naming
  the file, and rebuilt.

A cache that cannot be written (a read-only or full disk, ``HAL_CACHE_DIR`` naming a file) is
skipped with a WARNING; it never fails a compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attrs import field, frozen

from hal._paths import cache_root, cache_skipped

__all__ = ["RECORD_SUFFIX", "Artifact", "CompileCache", "atomic_write", "cache_key"]

log = logging.getLogger("hal.cache")

#: Entry format 2: the sha256 covers the key, then the payload. Format 1 (payload only) is read
#: as stale and rebuilt.
_MAGIC = b"HALC\x02"
_OLD_MAGICS = (b"HALC\x01",)
#: An artifact's record is the artifact's name plus this suffix.
RECORD_SUFFIX = ".record"


def cache_key(**parts: Any) -> str:
    """A sha256 over JSON-serialised parts (model hash, capabilities, versions, options...)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so no reader ever sees a partial file. Raises :class:`OSError`
    (the caller decides whether a failed write matters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry_digest(key: str, payload: bytes | memoryview) -> bytes:
    digest = hashlib.sha256(key.encode())
    digest.update(b"\0")
    digest.update(payload)
    return digest.digest()


class CompileCache:
    """Integrity-checked blobs by key, under ``root`` (default: the HAL cache's ``compiled/``).

    :meth:`get` answers a payload only if its checksum, which covers ``key`` too, holds: an entry
    moved or copied to another key's file is refused like a damaged one.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "compiled"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> bytes | None:
        """The payload stored under ``key``, or None (a corrupt or foreign entry is removed)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("compile cache entry %s unreadable (%s); rebuilding", path, exc)
            return None
        header = len(_MAGIC) + 32
        magic = data[: len(_MAGIC)]
        if magic in _OLD_MAGICS:
            log.info("compile cache entry %s was written by an older onnx-hal; rebuilding it", path)
            return None  # put() replaces it
        payload = memoryview(data)[header:]
        if magic != _MAGIC or data[len(_MAGIC) : header] != _entry_digest(key, payload):
            log.warning(
                "compile cache entry %s is corrupt, truncated or belongs to another key; removing it and rebuilding",
                path,
            )
            _unlink(path)
            return None
        return bytes(payload)

    def put(self, key: str, payload: bytes) -> None:
        """Store ``payload`` under ``key``; a cache that cannot be written is skipped (WARNING)."""
        try:
            atomic_write(self._path(key), _MAGIC + _entry_digest(key, payload) + payload)
        except OSError as exc:  # a full or read-only disk must not fail the compile
            cache_skipped(self.root, exc)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache: the entry stays, and is refused again next time
        log.debug("cannot remove %s: %s", path, exc)


@frozen
class Artifact:
    """A file a backend keeps in its cache directory, checked before its runtime uses it.

    ``path`` is the file the runtime reads (an optimized model, a vmfb, a model file handed to the
    runtime by name); ``key`` is the cache key it was built for; ``sha256``, for a file named by
    its own content, is the hash its bytes must have. Next to the file a record,
    ``<path>.record`` (JSON: ``key``, ``size``, ``sha256`` of the bytes, the file's ``stat`` when
    it was checked, and whatever ``info`` the backend adds), is written atomically *after* the
    file. A file is used only when its record names ``key`` (and ``sha256``) and its bytes hash to
    the recorded sha256.

    Reading (:meth:`read` for bytes, :meth:`check` for a runtime that opens the path itself)
    answers None / False for a missing file. A changed byte, a truncated file, another model's
    file copied over it or a record for another key is logged as a WARNING naming the file; the
    file and its record are removed and the backend builds it again. A file without a record (an
    older onnx-hal's, or a writer that has not finished) is not used and is replaced by the
    rebuild (INFO); a content-named one is checked against its name instead. Writing
    (:meth:`write`, :meth:`adopt`) never raises :class:`OSError`: a cache that cannot be written
    is skipped with a WARNING and the compile goes on.

    The warm path does not hash an unchanged file: hashing costs about 0.7 ms per MB here, 30 ms
    for a 47 MB model, on every warm ``to()``. The record keeps the file's device, inode, size,
    modification and change times, taken once the filesystem clock had passed the file's change
    time and the file was then found to hold what was written; any later write to the file, or a
    file put in its place, gets a later change time (which no user can set back), so a file whose
    ``stat`` still equals the record's holds the recorded bytes, and any other is hashed. What
    that does not see is a change made below the filesystem (a failing disk). A cache copied
    elsewhere (new inodes) still works, hashed on every read until ``hal cache clear``.

    Example, a backend whose runtime returns bytes::

        artifact = Artifact(Path(options.cache_dir) / f"{key}.bin", key)
        data = artifact.read()
        if data is None:
            data = build()
            artifact.write(data)
    """

    path: Path = field(converter=Path)
    key: str
    sha256: str | None = None

    @property
    def record(self) -> Path:
        """Where the record lives (``<path>.record``)."""
        return self.path.with_name(self.path.name + RECORD_SUFFIX)

    def read(self) -> bytes | None:
        """The file's bytes if present and intact, else None (a damaged file is removed)."""
        try:
            with self.path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("cached artifact %s is unreadable (%s); rebuilding it", self.path, exc)
            return None
        return data if self._verify(st, lambda: hashlib.sha256(data).hexdigest(), len(data)) else None

    def check(self) -> bool:
        """Whether the file is present and intact, for a runtime that reads it by path (a damaged
        file is removed). An unchanged file is not read; another is hashed, not loaded."""
        try:
            with self.path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                return self._verify(st, lambda: hashlib.file_digest(fh, "sha256").hexdigest(), st.st_size)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            log.warning("cached artifact %s is unreadable (%s); rebuilding it", self.path, exc)
            return False

    def write(self, data: bytes, info: Mapping[str, Any] | None = None) -> bool:
        """Store ``data`` as the file, then its record (``info`` adds fields to the record).
        False, with a WARNING, when the cache cannot be written."""
        digest = hashlib.sha256(data).hexdigest()
        if self.sha256 is not None and digest != self.sha256:
            log.warning("not caching %s: its bytes hash to %s, not to its name", self.path, digest[:16])
            return False
        try:
            atomic_write(self.path, data)
            self._seal(len(data), digest, info, lambda: self.path.read_bytes() == data)
        except OSError as exc:
            cache_skipped(self.path.parent, exc)
            self.discard()
            return False
        return True

    def adopt(self, written: Path, info: Mapping[str, Any] | None = None) -> bool:
        """Move a file the runtime wrote itself (at :meth:`temp_path`) into place and record it.
        False, with a WARNING, when that fails; ``written`` is removed either way."""
        try:
            os.replace(written, self.path)
            return self._seal(None, None, info, None)
        except OSError as exc:
            _unlink(written)
            cache_skipped(self.path.parent, exc)
            self.discard()
            return False

    def temp_path(self) -> Path:
        """A private name next to :attr:`path` for a runtime that writes the file itself; pass
        it to :meth:`adopt` afterwards (or remove it)."""
        return self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")

    def discard(self) -> None:
        """Remove the file and its record (missing ones and read-only caches are fine)."""
        _unlink(self.path)
        _unlink(self.record)

    # -- internals ---------------------------------------------------------------------------

    def _seal(
        self, size: int | None, digest: str | None, info: Mapping[str, Any] | None, intact: Callable[[], bool] | None
    ) -> bool:
        """Write the record of the file just put in place. Its ``stat`` goes in only once the
        filesystem clock is past the file's change time (so any later change shows in the change
        time) and the file then holds what was written: ``intact()`` says so for bytes the caller
        wrote; a file the runtime wrote (``digest`` None) is hashed at that point. Without a
        ``stat``, readers hash the file every time."""
        before = os.stat(self.path)
        settled = _clock_passed(before.st_ctime_ns, self.path.parent)
        if digest is None:
            size, digest = before.st_size, _file_sha256(self.path)
            if self.sha256 is not None and digest != self.sha256:
                log.warning("not caching %s: its bytes hash to %s, not to its name", self.path, digest[:16])
                self.discard()
                return False
        elif settled and intact is not None and not intact():
            msg = f"{self.path} changed while it was being written"
            raise OSError(msg)
        stat = _fingerprint(before) if settled and _fingerprint(os.stat(self.path)) == _fingerprint(before) else None
        record = {**dict(info or {}), "key": self.key, "size": size, "sha256": digest, "stat": stat}
        atomic_write(self.record, json.dumps(record, indent=1, sort_keys=True).encode())
        return True

    def _expected(self) -> dict[str, Any] | str:
        """The record (checked to be this artifact's), or why there is none to go by."""
        try:
            record = json.loads(self.record.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return "missing"
        except (OSError, ValueError) as exc:
            return f"its record {self.record.name} is damaged ({type(exc).__name__})"
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) \
                or not isinstance(record.get("size"), int):
            return f"its record {self.record.name} is damaged"
        if record.get("key") != self.key or (self.sha256 is not None and record["sha256"] != self.sha256):
            return f"its record says it was built for another cache key ({str(record.get('key'))[:16]})"
        return record

    def _verify(self, st: os.stat_result, digest: Callable[[], str], size: int) -> bool:
        record = self._expected()
        if record == "missing" and self.sha256 is not None:
            record = {"sha256": self.sha256, "size": size}  # named by its content: the name is the record
        if record == "missing":
            log.info("cached artifact %s has no record (an older onnx-hal's, or still being written); rebuilding it",
                     self.path)
            return False
        if isinstance(record, str):
            problem = record
        elif record.get("stat") is not None and record["stat"] == _fingerprint(st):
            return True  # unchanged since it was checked: see the class docstring
        elif record["size"] != size:
            problem = f"is {size} bytes where {record['size']} were written (truncated or replaced)"
        elif digest() != record["sha256"]:
            problem = "does not match its sha256 (changed, damaged, or another model's file)"
        else:
            return True
        log.warning("cached artifact %s %s; removing it and rebuilding", self.path, problem)
        self.discard()
        return False


def _fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _clock_passed(ctime_ns: int, directory: Path, wait_s: float = 0.05) -> bool:
    """Whether a file changed now gets a change time later than ``ctime_ns``, waiting for it up to
    ``wait_s``: at once where the kernel timestamps changes finely after a ``stat`` (Linux 6.13
    and later), within a tick of the filesystem's clock (a few ms) elsewhere."""
    deadline = time.monotonic() + wait_s
    while True:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".clock.", suffix=".tmp")
        try:
            now = os.fstat(fd).st_ctime_ns
        finally:
            os.close(fd)
            os.unlink(probe)
        if now > ctime_ns:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def info() -> dict[str, Any]:
    """Files (artifact records not counted) and bytes per cache section, for ``hal cache info``."""
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
        entries = sum(1 for p in files if not p.name.endswith(RECORD_SUFFIX))
        sections[name] = {"files": entries, "bytes": sum(p.stat().st_size for p in files)}
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
