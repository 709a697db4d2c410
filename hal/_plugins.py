"""Plugin loading and device discovery. The only module that knows about pluggy.

Order of events, all lazy (nothing happens at ``import hal``):

1. built-in plugins (``DEFAULT_PLUGINS``) and the ``hal`` entry points are loaded, filtered by
   ``HAL_LOAD_PLUGINS`` (comma list; unset = all installed, empty = none) and
   ``HAL_DISABLE_PLUGINS`` (comma list, built-ins included);
2. each plugin's ``hal_register_backends`` is called on its own, so one that raises or registers
   nonsense is reported with its name and the others still register;
3. each backend's ``discover()`` runs in a daemon thread with a timeout
   (``HAL_DISCOVERY_TIMEOUT`` seconds, default 60), so one that raises or hangs is reported and
   every other device is still listed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import pluggy
from attrs import frozen

from hal import hookspecs
from hal.backend import Backend, Device
from hal.errors import PluginError, UnavailableDeviceError, UnknownDeviceError

__all__ = ["DEFAULT_PLUGINS", "PluginInfo", "Registry", "registry"]

log = logging.getLogger("hal.plugins")

#: Built-in plugins, loaded through the same hook a vendor uses: name -> module.
DEFAULT_PLUGINS = {"cpu": "hal.backends.cpu"}


@frozen
class PluginInfo:
    """What ``hal plugins`` shows for one plugin.

    ``status`` is ``loaded``, ``blocked`` (by ``HAL_DISABLE_PLUGINS``), ``not-allowed`` (left
    out of ``HAL_LOAD_PLUGINS``) or ``error`` (then ``error`` says why).
    """

    name: str
    distribution: str
    version: str
    builtin: bool
    status: str
    error: str | None = None
    hooks: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": self.status,
            "error": self.error,
            "hooks": list(self.hooks),
            "backends": list(self.backends),
        }


@frozen
class DiscoveryProblem:
    """A backend whose discovery failed; shown by ``hal devices`` after the devices."""

    backend: str
    plugin: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "plugin": self.plugin, "error": self.error}


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Registry:
    """Plugins, their backends and the devices they found. One per process: :func:`registry`."""

    def __init__(self, builtins: dict[str, str] | None = None) -> None:
        self._builtins = DEFAULT_PLUGINS if builtins is None else builtins
        self._pm = pluggy.PluginManager("hal")
        self._pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._plugins: dict[str, dict[str, Any]] | None = None
        self._backends: dict[str, tuple[str, Backend]] = {}
        self._devices: dict[str, Device] | None = None
        self._problems: list[DiscoveryProblem] = []

    # -- plugins -------------------------------------------------------------------------------

    def add_plugin(self, plugin: object, name: str) -> None:
        """Register an in-process plugin object (tests, notebooks). Resets discovery."""
        with self._lock:
            self._load()
            info = self._record(name, distribution="(in-process)", version="", builtin=False)
            self._register(plugin, name, info)
            self._devices = None

    def remove_plugin(self, name: str) -> None:
        with self._lock:
            if self._pm.get_plugin(name) is not None:
                self._pm.unregister(name=name)
            if self._plugins is not None:
                self._plugins.pop(name, None)
            self._backends = {k: v for k, v in self._backends.items() if v[0] != name}
            self._devices = None

    def plugins(self) -> tuple[PluginInfo, ...]:
        with self._lock:
            self._load()
            assert self._plugins is not None
            return tuple(PluginInfo(**info) for info in self._plugins.values())

    def _record(self, name: str, *, distribution: str, version: str, builtin: bool) -> dict[str, Any]:
        assert self._plugins is not None
        info = {
            "name": name,
            "distribution": distribution,
            "version": version,
            "builtin": builtin,
            "status": "loaded",
            "error": None,
            "hooks": (),
            "backends": (),
        }
        self._plugins[name] = info
        return info

    def _load(self) -> None:
        if self._plugins is not None:
            return
        self._plugins = {}
        allowed = _env_list("HAL_LOAD_PLUGINS")
        blocked = _env_list("HAL_DISABLE_PLUGINS") or set()
        for name in blocked:
            self._pm.set_blocked(name)

        from hal import __version__

        for name, module in self._builtins.items():
            info = self._record(name, distribution="onnx-hal", version=__version__, builtin=True)
            if name in blocked:
                info["status"] = "blocked"
                continue
            self._register_lazily(lambda module=module: import_module(module), name, info)

        for ep in sorted(entry_points(group="hal"), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else ep.module
            version = ep.dist.version if ep.dist else ""
            if ep.name in self._plugins:
                log.warning("plugin %s from %s ignored: the name is taken", ep.name, dist)
                continue
            info = self._record(ep.name, distribution=dist, version=version, builtin=False)
            if {ep.name, dist} & blocked:
                info["status"] = "blocked"
            elif allowed is not None and not {ep.name, dist} & allowed:
                info["status"] = "not-allowed"
            else:
                self._register_lazily(ep.load, ep.name, info)

    def _register_lazily(self, load: Callable[[], object], name: str, info: dict[str, Any]) -> None:
        try:
            plugin = load()
        except Exception as exc:  # a broken plugin must not take the host down
            info["status"], info["error"] = "error", f"import failed: {_describe(exc)}"
            log.warning("plugin %s failed to import: %s", name, _describe(exc))
            return
        self._register(plugin, name, info)

    def _register(self, plugin: object, name: str, info: dict[str, Any]) -> None:
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            info["status"], info["error"] = "error", f"invalid plugin: {_describe(exc)}"
            return
        info["hooks"] = tuple(sorted(h.name for h in self._pm.get_hookcallers(plugin) or ()))
        self._call_register_backends(plugin, name, info)

    def _call_register_backends(self, plugin: object, name: str, info: dict[str, Any]) -> None:
        registered: list[str] = []

        def register(backend: Backend) -> None:
            if not isinstance(backend, Backend):
                msg = f"register() takes a hal.Backend instance, got {type(backend).__name__}"
                raise PluginError(msg)
            if not backend.name or ":" in backend.name or backend.name != backend.name.strip():
                msg = f"{type(backend).__name__}.name must be a non-empty name without ':', got {backend.name!r}"
                raise PluginError(msg)
            if backend.name in self._backends:
                owner = self._backends[backend.name][0]
                msg = f"backend name {backend.name!r} is already registered by plugin {owner}"
                raise PluginError(msg)
            self._backends[backend.name] = (name, backend)
            registered.append(backend.name)

        # Each plugin's hook is called on its own so one failure cannot hide the rest.
        for impl in self._pm.hook.hal_register_backends.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            kwargs = {"register": register}
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                info["status"], info["error"] = "error", f"hal_register_backends failed: {_describe(exc)}"
                log.warning("plugin %s: hal_register_backends failed: %s", name, _describe(exc))
        info["backends"] = tuple(registered)

    # -- backends and devices ------------------------------------------------------------------

    def backends(self) -> dict[str, Backend]:
        with self._lock:
            self._load()
            return {name: backend for name, (_, backend) in self._backends.items()}

    def backend(self, name: str) -> Backend:
        backends = self.backends()
        try:
            return backends[name]
        except KeyError:
            msg = f"no backend named {name!r}; registered: {', '.join(sorted(backends)) or 'none'}"
            raise UnknownDeviceError(msg) from None

    def devices(self, *, refresh: bool = False) -> tuple[Device, ...]:
        with self._lock:
            self._load()
            if self._devices is None or refresh:
                self._discover()
            assert self._devices is not None
            return tuple(self._devices.values())

    def problems(self) -> tuple[DiscoveryProblem, ...]:
        self.devices()
        return tuple(self._problems)

    def device(self, device_id: str, *, require_available: bool = True) -> Device:
        devices = {d.id: d for d in self.devices()}
        device = devices.get(device_id)
        if device is None:
            usable = [d.id for d in devices.values() if d.available]
            msg = (
                f"unknown device {device_id!r}; available devices: {', '.join(usable) or 'none'} "
                "(run `hal devices` to see all, `hal plugins` for plugin errors)"
            )
            raise UnknownDeviceError(msg)
        if require_available and not device.available:
            usable = [d.id for d in devices.values() if d.available]
            msg = (
                f"device {device_id} is unavailable: {device.reason}; "
                f"available devices: {', '.join(usable) or 'none'}"
            )
            raise UnavailableDeviceError(msg)
        return device

    def _discover(self) -> None:
        timeout = float(os.environ.get("HAL_DISCOVERY_TIMEOUT", "60"))
        results: dict[str, tuple[str, Any]] = {}

        def run(name: str, backend: Backend) -> None:
            try:
                results[name] = ("ok", list(backend.discover()))
            except Exception as exc:
                results[name] = ("error", exc)

        threads = []
        for name, (_, backend) in self._backends.items():
            t = threading.Thread(target=run, args=(name, backend), name=f"hal-discover-{name}", daemon=True)
            t.start()
            threads.append((name, t))
        deadline = time.monotonic() + timeout
        for _, t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

        devices: dict[str, Device] = {}
        problems: list[DiscoveryProblem] = []
        for name, (plugin, _) in self._backends.items():
            outcome = results.get(name)
            if outcome is None:
                problems.append(DiscoveryProblem(name, plugin, f"discovery did not finish within {timeout:g} s"))
                continue
            status, value = outcome
            if status == "error":
                problems.append(DiscoveryProblem(name, plugin, f"discovery failed: {_describe(value)}"))
                continue
            for error in _accept(name, value, devices):
                problems.append(DiscoveryProblem(name, plugin, error))
        for p in problems:
            log.warning("backend %s (plugin %s): %s", p.backend, p.plugin, p.error)
        self._devices, self._problems = devices, problems


def _accept(backend: str, found: Iterable[Any], into: dict[str, Device]) -> list[str]:
    errors = []
    for device in found:
        if not isinstance(device, Device):
            errors.append(f"discover() returned {type(device).__name__}, not a hal.Device")
        elif device.backend != backend or not device.id.startswith(f"{backend}:"):
            errors.append(f"device {device.id} must have backend {backend!r} and an id starting with '{backend}:'")
        elif device.id in into:
            errors.append(f"device id {device.id} is registered twice")
        else:
            into[device.id] = device
    return errors


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, created on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        with _REGISTRY_LOCK:
            if _REGISTRY is None:
                _REGISTRY = Registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget loaded plugins and devices; the next call reloads (after changing HAL_* variables)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        _REGISTRY = None
