"""Where the HAL keeps files: ``HAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnx-hal``, else
``~/.cache/onnx-hal``; inside :func:`cache_root_at`, the directory it names."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("hal.cache")

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


_root_override: Path | None = None
_root_lock = threading.RLock()


@contextmanager
def cache_root_at(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Every cache the HAL keeps (compiled, verified, backends/, runtime/, digests/) lives under
    ``path`` for the block, in every thread of this process, then where it was.

    For measuring a cold placement (``hal bench``) without touching ``os.environ``: setting
    ``HAL_CACHE_DIR`` would race with runtimes' own ``getenv`` on their threads and leak into
    child processes. Blocks in one thread nest; a block in another thread waits for this one to
    end. Work other threads do meanwhile uses ``path`` too.
    """
    global _root_override  # noqa: PLW0603 - one process-wide setting, guarded by its lock
    with _root_lock:
        before = _root_override
        _root_override = Path(path)
        try:
            yield _root_override
        finally:
            _root_override = before


def cache_root() -> Path:
    override = _root_override
    if override is not None:
        return override
    explicit = os.environ.get("HAL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "onnx-hal"


def cache_skipped(where: Path, exc: OSError) -> None:
    """Log, once per process for each place and reason, that the cache at ``where`` is skipped
    because ``exc`` (a read-only or full disk, a path through a file, ...): the compile goes on
    without it."""
    reason = f"{type(exc).__name__}: {exc.strerror or exc}"
    with _warned_lock:
        if (str(where), reason) in _warned:
            return
        _warned.add((str(where), reason))
    log.warning("compile cache skipped: cannot write %s (%s); compiling without it", where, reason)


def backend_cache_dir(backend: str) -> str:
    """A directory a backend may keep its own artifacts in (OpenVINO's model cache, IREE vmfbs),
    created on first use: ``<cache root>/backends/<backend>``.

    Never raises. When the directory cannot be created or written (``HAL_CACHE_DIR`` names a
    file or lies under one, a read-only directory, ...) it logs a WARNING and returns ``""``, which
    backends read like ``CompileOptions.cache_dir=None``: no cache. A disk that fills up later is
    each write's business (see :class:`hal.cache.Artifact`).
    """
    path = cache_root() / "backends" / backend
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):  # mkdir of an existing directory checks nothing
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as exc:
        cache_skipped(path, exc)
        return ""
    return str(path)
