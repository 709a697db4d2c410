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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hal.backend import Backend

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
