"""hal-iree's test session: the iree plugin loaded and a per-session HAL cache dir. The models
and helpers the tests share are in ``iree_helpers`` (a plain module: ``from conftest import``
would find whichever conftest was imported last when several test trees run in one session).

Every test here runs real IREE (no mocks) on ``iree:local-task``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import hal
import hal.plugin


@pytest.fixture(scope="session", autouse=True)
def _iree_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Load the iree plugin and keep vmfbs in a fresh cache for this session."""
    saved = {k: os.environ.get(k) for k in ("HAL_LOAD_PLUGINS", "HAL_CACHE_DIR")}
    loaded = [p for p in (saved["HAL_LOAD_PLUGINS"] or "").split(",") if p]
    if "iree" not in loaded:
        os.environ["HAL_LOAD_PLUGINS"] = ",".join([*loaded, "iree"])
    os.environ["HAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("hal-cache"))
    hal.plugin.reload_plugins()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    hal.plugin.reload_plugins()


