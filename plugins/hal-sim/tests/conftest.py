"""Fixtures: a HAL with only the sim plugin, configured by environment variables, and small
profiles written for one test."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import hal
import hal.plugin

SIM_VARIABLES = ("HAL_SIM_DEVICES", "HAL_SIM_FAULTS", "HAL_SIM_SEED", "HAL_SIM_PACE", "HAL_SIM_PROFILES")


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., tuple[hal.Device, ...]]]:
    """``sim(HAL_SIM_DEVICES="h100", ...)``: set the variables (the others unset), reload the
    plugins and return ``hal.devices()``. Plugins are reloaded again when the test ends."""

    def configure(**variables: str) -> tuple[hal.Device, ...]:
        monkeypatch.setenv("HAL_LOAD_PLUGINS", "sim")
        monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "hal-cache"))
        for name in SIM_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        hal.plugin.reload_plugins()
        return hal.devices()

    try:
        yield configure
    finally:
        hal.plugin.reload_plugins()


#: A small valid profile; tests add sections to it.
BASE_PROFILE = """\
schema = 1
vendor = "Acme"
model = "X1"
kind = "npu"

[[formats]]
level = "native"
formats = ["float32", "int64", "bool"]
source = "unverified: a test chip"
"""


@pytest.fixture
def profile_dir(tmp_path: Path) -> Callable[..., Path]:
    """``profile_dir(name=text, ...)``: a directory of profiles ``name.toml`` (``text`` dedented;
    ``BASE`` in it stands for :data:`BASE_PROFILE`). Returns the directory."""
    directory = tmp_path / "profiles"
    directory.mkdir(exist_ok=True)

    def write(**profiles: str) -> Path:
        for name, text in profiles.items():
            body = textwrap.dedent(text).replace("BASE\n", BASE_PROFILE)
            (directory / f"{name.replace('_', '-')}.toml").write_text(body)
        return directory

    return write
