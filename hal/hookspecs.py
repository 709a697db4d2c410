"""The plugin contract.

A plugin is a module (or object) with functions marked ``@hal.hookimpl`` whose names are the
hooks below. It is found through the ``hal`` entry-point group::

    # setup.cfg of a plugin distribution
    [options.entry_points]
    hal =
        acme = hal_acme

Hooks are called with keyword arguments only, and an implementation may accept fewer arguments
than the spec names, so adding an argument to a spec breaks no plugin. Keep the plugin module
cheap to import: import the vendor runtime inside the backend's methods.

The host calls every hook through pluggy (so ``@hookimpl(wrapper=True)`` works), one plugin at
a time for the registration hooks (one plugin's exception cannot hide another's registrations),
each call bounded by ``HAL_PLUGIN_TIMEOUT`` seconds. A function whose name starts with ``hal_``
but is not a hook below (a misspelling) makes the plugin an error, reported by ``hal plugins``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hal.backend import Backend, Device
    from hal.capabilities import Health
    from hal.model import Model

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("hal")
hookimpl = pluggy.HookimplMarker("hal")


@hookspec
def hal_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the backends this plugin provides.

    Call ``register(backend)`` once per :class:`hal.Backend` instance. The host checks each
    registration (a ``Backend`` instance, a non-empty unique ``name``) and reports a bad one with
    the plugin's name instead of failing; the other plugins' backends are still registered.

    Do not discover devices here: the host calls :meth:`Backend.discover` lazily, with a
    timeout, and reports a backend that raises or hangs without taking the host down.

    :param register: callback taking one :class:`hal.Backend`.
    :return: nothing; the return value is ignored.
    """


@hookspec
def hal_register_policies(register: Callable[..., None]) -> None:
    """Register device-ranking policies that ``to("auto", policy=NAME)`` can use.

    Call ``register(name, rank, description)`` once per policy: ``name`` is a short lower-case
    name (``"cheapest"``), ``rank`` a callable ``rank(model, devices) -> devices`` that returns
    the candidate devices in the order to try them (it may leave some out; it must not add any),
    ``description`` one line for ``hal plugins``. The candidates are the available devices that
    can run the model after lowering, already in the default order. Names are unique across
    plugins; a clash is reported with both plugins' names.

    :param register: callback ``register(name: str, rank: Callable[[hal.Model, Sequence[hal.Device]],
        Sequence[hal.Device]], description: str = "")``.
    :return: nothing; the return value is ignored.
    """


@hookspec
def hal_probe_health(device: Device) -> Health | None:
    """Measure the health of ``device`` with the vendor's own means (ECC errors, XID events,
    thermal throttling, a driver's self-test) and return it as a :class:`hal.Health`.

    Called for every device by health checks (``hal doctor``); every plugin may answer for any
    device, and every non-None answer is kept. Return ``None`` for devices you know nothing of.
    Keep it quick: each call is bounded by ``HAL_PLUGIN_TIMEOUT`` seconds.

    :param device: the :class:`hal.Device` to probe.
    :return: a :class:`hal.Health`, or ``None``.
    """


#: Every hook name, for the host's misspelling check.
HOOKS = ("hal_register_backends", "hal_register_policies", "hal_probe_health")
