"""Where the HAL keeps files: ``HAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnx-hal``, else
``~/.cache/onnx-hal``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("HAL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "onnx-hal"


def backend_cache_dir(backend: str) -> Path:
    """A directory a backend may keep its own artifacts in (OpenVINO's model cache, IREE vmfbs)."""
    path = cache_root() / "backends" / backend
    path.mkdir(parents=True, exist_ok=True)
    return path
