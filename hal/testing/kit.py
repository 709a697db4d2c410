"""The pytest side of the contract kit: options, device selection, collection and reporting.

Enabled with ``pytest -p hal.testing --hal-device ID`` (see :mod:`hal.testing` for what a vendor
needs to know). Without ``--hal-device`` nothing here is registered, so a test run that merely has
onnx-hal installed is unchanged.

How the tests get into a vendor's session: the kit's tests live in :mod:`hal.testing.contract`,
a module of this package, not under the vendor's paths. When the session has collected its own
arguments, a wrapper around :func:`pytest_make_collect_report` for the session adds that module
as one more collector (``pytest.Module.from_parent``), so pytest's own machinery imports it,
reports it and applies ``-k``, ``-m``, ``--deselect`` and ``--lf`` to it like any other module.
Every test that asks for the ``hal_device`` fixture, the kit's and the vendor's own, is
parametrized by device id in :func:`pytest_generate_tests`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import hal

if TYPE_CHECKING:
    from hal.testing.conformance import TargetSummary

__all__ = ["ALL_AVAILABLE", "NODE_FLOOR_DETAIL", "hal_device", "selected_devices"]

#: ``--hal-device all-available``: every device ``hal.devices()`` finds available.
ALL_AVAILABLE = "all-available"

#: A ``Device.details`` key a plugin may set to the fraction (0 to 1) of the ONNX node test cases
#: its device passes at least; the kit fails the device below it. Without it the kit reports counts.
NODE_FLOOR_DETAIL = "onnx_node_floor"

#: The module of contract tests this plugin adds to the session.
CONTRACT = Path(__file__).with_name("contract.py")

_DEVICES = pytest.StashKey[list[str]]()
_NODE_RESULTS = pytest.StashKey[dict[str, "TargetSummary"]]()
_MARKER = "hal_device_params"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("hal", "onnx-hal contract kit (hal.testing)")
    group.addoption(
        "--hal-device",
        action="append",
        default=[],
        metavar="ID",
        dest="hal_devices",
        help=f"run the onnx-hal contract kit on this device id (repeat for more; {ALL_AVAILABLE}: every available device)",
    )
    group.addoption(
        "--hal-node-every",
        type=int,
        default=10,
        metavar="N",
        dest="hal_node_every",
        help="run every N-th ONNX node test case by name in the kit (default 10; 1 runs all)",
    )


def configure(config: pytest.Config) -> None:
    """Register the kit for this session if ``--hal-device`` was given; otherwise do nothing."""
    if not config.getoption("hal_devices"):
        return
    every = config.getoption("hal_node_every")
    if every < 1:
        msg = f"--hal-node-every must be at least 1, got {every}"
        raise pytest.UsageError(msg)
    config.addinivalue_line(
        "markers", f"{_MARKER}(kind): hal.testing: parametrize by device and what that device declares"
    )
    pytest.register_assert_rewrite("hal.testing.contract")
    config.stash[_NODE_RESULTS] = {}
    plugin = sys.modules[__name__]  # this module's hooks and fixtures
    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "hal.testing.kit")


# -- devices ---------------------------------------------------------------------------------------


def selected_devices(config: pytest.Config) -> list[str]:
    """The device ids ``--hal-device`` names, ``all-available`` expanded, in the order given.

    Raises ``pytest.UsageError`` for an id no plugin registers (devices named explicitly may be
    unavailable: the kit then checks that they say why, and skips the rest)."""
    if _DEVICES in config.stash:
        return config.stash[_DEVICES]
    known = {d.id: d for d in hal.devices()}
    ids: list[str] = []
    for requested in config.getoption("hal_devices"):
        if requested == ALL_AVAILABLE:
            ids.extend(d.id for d in known.values() if d.available)
        elif requested in known:
            ids.append(requested)
        else:
            listed = ", ".join(f"{d.id}{'' if d.available else ' (unavailable)'}" for d in known.values()) or "none"
            msg = (
                f"--hal-device {requested}: no plugin registers that device; devices here: {listed} "
                "(HAL_LOAD_PLUGINS chooses the plugins; `hal plugins` shows plugin errors)"
            )
            raise pytest.UsageError(msg)
    config.stash[_DEVICES] = list(dict.fromkeys(ids))
    return config.stash[_DEVICES]


def _device(device_id: str) -> hal.Device:
    for device in hal.devices():
        if device.id == device_id:
            return device
    pytest.fail(f"device {device_id} is no longer registered (a test reset the plugins?)")


# -- collection ------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    report = yield
    session = collector.session
    if collector is session and report.passed and not session.isinitpath(CONTRACT):
        report.result.append(_contract_module(session))
    return report


def _contract_module(session: pytest.Session) -> pytest.Module:
    root = Path(session.config.rootpath)
    try:
        CONTRACT.relative_to(root)
    except ValueError:  # an installed onnx-hal: name the module by its path from the rootdir
        nodeid = os.path.relpath(CONTRACT, root).replace(os.sep, "/")
        return pytest.Module.from_parent(session, path=CONTRACT, nodeid=nodeid)
    return pytest.Module.from_parent(session, path=CONTRACT)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hal_device_id" not in metafunc.fixturenames:
        return
    ids = selected_devices(metafunc.config)
    marker = metafunc.definition.get_closest_marker(_MARKER)
    if marker is None:
        metafunc.parametrize("hal_device_id", ids, ids=ids)
        return
    from hal.testing import contract

    kind = marker.args[0]
    params: list[Any] = []
    for device_id in ids:
        found = contract.device_params(kind, _device(device_id))
        params.extend(pytest.param(device_id, value, id=f"{device_id}-{label}") for value, label in found)
        if not found:
            skip = pytest.mark.skip(reason=f"{device_id} declares no {kind.replace('-', ' ')}")
            params.append(pytest.param(device_id, None, id=f"{device_id}-none-declared", marks=skip))
    metafunc.parametrize(("hal_device_id", "hal_param"), params)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def hal_device(hal_device_id: str) -> hal.Device:
    """The :class:`hal.Device` under test: one of ``--hal-device``'s ids per test."""
    return _device(hal_device_id)


# -- reporting -------------------------------------------------------------------------------------


def record_node_cases(config: pytest.Config, summary: TargetSummary) -> None:
    """Keep one device's node-case counts for the terminal summary."""
    config.stash[_NODE_RESULTS][summary.device] = summary


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(_NODE_RESULTS, {})
    if not results:
        return
    terminalreporter.section("hal.testing: ONNX node test cases")
    for summary in results.values():
        terminalreporter.write_line(
            f"{summary.device}: {summary.passed} passed, {summary.wrong} wrong, {summary.errors} errors "
            f"of {summary.total} (every {summary.every}. case by name; --hal-node-every 1 runs all)"
        )
        for text, count in summary.reasons:
            terminalreporter.write_line(f"  {count:4d}  {text}")
