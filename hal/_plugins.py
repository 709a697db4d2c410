"""Plugin loading and device discovery. The only module that knows about pluggy.

Order of events, all lazy (nothing happens at ``import hal``):

1. built-in plugins (``DEFAULT_PLUGINS``) and the ``hal`` entry points are loaded, filtered by
   ``HAL_LOAD_PLUGINS`` (comma list; unset = all installed, empty = none) and
   ``HAL_DISABLE_PLUGINS`` (comma list, built-ins included); each import is bounded by
   ``HAL_PLUGIN_TIMEOUT`` seconds (default 30);
2. each plugin is registered with pluggy and checked: a function named ``hal_*`` that is no hook
   (a misspelling) makes it an error; then its registration hooks are called through pluggy
   (:class:`Hooks`), one plugin at a time and bounded by ``HAL_PLUGIN_TIMEOUT``, so one that
   raises, hangs or registers nonsense is reported with its name and the others still register;
3. each backend's ``discover()`` runs in a daemon thread bounded by ``HAL_DISCOVERY_TIMEOUT``
   seconds (default 60), only when its devices are needed: naming ``ort:cpu`` discovers the
   ``ort`` backend alone. What a plugin hands over (backends, devices, policies) is checked as it
   enters; a bad one is reported under the plugin's name and every other device stays usable.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import pluggy
from attrs import evolve, frozen

from hal import hookspecs
from hal._bounds import BoundExceeded, bounded, env_seconds
from hal.backend import Backend, Device
from hal.capabilities import Capabilities
from hal.errors import PluginError, UnavailableDeviceError, UnknownDeviceError
from hal.health import with_health

__all__ = ["DEFAULT_PLUGINS", "Hooks", "PluginInfo", "Policy", "Registry", "registry"]

log = logging.getLogger("hal.plugins")

#: Built-in plugins, loaded through the same hook a vendor uses: name -> module.
DEFAULT_PLUGINS = {"cpu": "hal.backends.cpu"}

#: A backend listing more devices than this is stopped and reported (an endless generator).
MAX_DEVICES_PER_BACKEND = 1024


@frozen
class PluginInfo:
    """What ``hal plugins`` shows for one plugin.

    ``status`` is ``loaded``, ``blocked`` (by ``HAL_DISABLE_PLUGINS``), ``not-allowed`` (left
    out of ``HAL_LOAD_PLUGINS``) or ``error`` (then ``error`` says why). ``isolated``: imported
    and discovered in a child process, its devices run in workers (:mod:`hal.isolation`).
    """

    name: str
    distribution: str
    version: str
    builtin: bool
    status: str = "loaded"
    error: str | None = None
    hooks: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()
    isolated: bool = False

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
            "policies": list(self.policies),
            "isolated": self.isolated,
        }


@frozen
class DiscoveryProblem:
    """A backend whose discovery failed; shown by ``hal devices`` after the devices."""

    backend: str
    plugin: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "plugin": self.plugin, "error": self.error}


@frozen
class Policy:
    """A ranking policy a plugin registered: ``rank(model, devices) -> devices``."""

    name: str
    plugin: str
    rank: Callable[[Any, Sequence[Device]], Sequence[Device]]
    description: str = ""


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Hooks:
    """The typed facade over pluggy: one method per hook. Nothing else calls ``pm.hook``.

    Registration hooks are called for one plugin at a time through
    :meth:`pluggy.PluginManager.subset_hook_caller`, leaving out the other plugins' ordinary
    implementations but keeping every wrapper, so wrappers (tracing, timing) see each call.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def _only(self, plugin: object, name: str) -> Any:
        caller = getattr(self._pm.hook, name)
        others = {
            impl.plugin
            for impl in caller.get_hookimpls()
            if impl.plugin is not plugin and not (impl.wrapper or impl.hookwrapper)
        }
        return self._pm.subset_hook_caller(name, remove_plugins=others) if others else caller

    def register_backends(self, plugin: object, register: Callable[[Backend], None]) -> None:
        self._only(plugin, "hal_register_backends")(register=register)

    def register_policies(self, plugin: object, register: Callable[..., None]) -> None:
        self._only(plugin, "hal_register_policies")(register=register)

    def probe_health(self, device: Device) -> list[Any]:
        return [h for h in self._pm.hook.hal_probe_health(device=device) if h is not None]


class Registry:
    """Plugins, their backends and the devices they found. One per process: :func:`registry`."""

    def __init__(self, builtins: dict[str, str] | None = None) -> None:
        self._builtins = DEFAULT_PLUGINS if builtins is None else builtins
        self._pm = pluggy.PluginManager("hal")
        self._pm.add_hookspecs(hookspecs)
        self.hooks = Hooks(self._pm)
        self._lock = threading.RLock()
        self._plugins: dict[str, PluginInfo] | None = None
        self._backends: dict[str, tuple[str, Backend]] = {}
        self._policies: dict[str, Policy] = {}
        #: backend name -> (devices, problem or None), filled per backend on demand
        self._found: dict[str, tuple[tuple[Device, ...], DiscoveryProblem | None]] = {}

    # -- plugins -------------------------------------------------------------------------------

    def add_plugin(self, plugin: object, name: str) -> None:
        """Register an in-process plugin object (tests, notebooks). Resets discovery."""
        with self._lock:
            self._load()
            self._set(PluginInfo(name, "(in-process)", "", False))
            self._register(plugin, name)
            self._found = {}

    def remove_plugin(self, name: str) -> None:
        with self._lock:
            if self._pm.get_plugin(name) is not None:
                self._pm.unregister(name=name)
            if self._plugins is not None:
                self._plugins.pop(name, None)
            self._backends = {k: v for k, v in self._backends.items() if v[0] != name}
            self._policies = {k: v for k, v in self._policies.items() if v.plugin != name}
            self._found = {}

    def plugins(self) -> tuple[PluginInfo, ...]:
        with self._lock:
            self._load()
            assert self._plugins is not None
            return tuple(self._plugins.values())

    def policies(self) -> dict[str, Policy]:
        """Ranking policies registered by plugins, by name."""
        with self._lock:
            self._load()
            return dict(self._policies)

    def _set(self, info: PluginInfo) -> None:
        assert self._plugins is not None
        self._plugins[info.name] = info

    def _update(self, name: str, **changes: Any) -> None:
        assert self._plugins is not None
        self._plugins[name] = evolve(self._plugins[name], **changes)

    def _fail(self, name: str, error: str) -> None:
        self._update(name, status="error", error=error)
        log.warning("plugin %s: %s", name, error)

    def _load(self) -> None:
        if self._plugins is not None:
            return
        timeout = env_seconds("HAL_PLUGIN_TIMEOUT", 30.0)
        env_seconds("HAL_DISCOVERY_TIMEOUT", 60.0)  # a bad value is named now, not mid-discovery
        self._plugins = {}
        allowed = _env_list("HAL_LOAD_PLUGINS")
        blocked = _env_list("HAL_DISABLE_PLUGINS") or set()
        from hal.isolation import isolated_plugins

        isolated = isolated_plugins()
        for name in blocked:
            self._pm.set_blocked(name)

        from hal import __version__

        for name, module in self._builtins.items():
            self._set(PluginInfo(name, "onnx-hal", __version__, True))
            if name in blocked:
                self._update(name, status="blocked")
                continue
            self._register_lazily(lambda module=module: import_module(module), name, timeout)

        for ep in sorted(entry_points(group="hal"), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else ep.module
            version = ep.dist.version if ep.dist else ""
            if ep.name in self._plugins:
                log.warning("plugin %s from %s ignored: the name is taken", ep.name, dist)
                continue
            self._set(PluginInfo(ep.name, dist, version, False))
            if {ep.name, dist} & blocked:
                self._update(ep.name, status="blocked")
            elif allowed is not None and not {ep.name, dist} & allowed:
                self._update(ep.name, status="not-allowed")
            elif {ep.name, dist} & isolated:
                self._register_isolated(ep.name, timeout)
            else:
                self._register_lazily(ep.load, ep.name, timeout)

    def _register_isolated(self, name: str, timeout: float) -> None:
        """Import and discover plugin ``name`` in a child process (:mod:`hal.isolation`); register
        stand-ins for its backends. A crash or hang there is this plugin's error alone."""
        from hal.isolation import discover_isolated

        backends, error = discover_isolated(name, timeout + env_seconds("HAL_DISCOVERY_TIMEOUT", 60.0))
        self._update(name, isolated=True, hooks=("hal_register_backends",) if backends else ())
        if error is not None:
            self._fail(name, error)
        accepted = []
        for backend in backends:
            try:
                accepted.append(self._accept_backend(name, backend))
            except PluginError as exc:
                self._fail(name, str(exc))
        self._update(name, backends=tuple(accepted))

    def _register_lazily(self, load: Callable[[], object], name: str, timeout: float) -> None:
        try:
            plugin = bounded(load, timeout, f"hal-import-{name}")
        except BoundExceeded:
            self._fail(name, f"import did not finish within {timeout:g} s (HAL_PLUGIN_TIMEOUT)")
            return
        except Exception as exc:  # a broken plugin must not take the host down
            self._fail(name, f"import failed: {_describe(exc)}")
            return
        self._register(plugin, name)

    def _register(self, plugin: object, name: str) -> None:
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            self._fail(name, f"invalid plugin: {_describe(exc)}")
            return
        misspelled = self._unknown_hooks(plugin)
        if misspelled:
            self._pm.unregister(plugin)
            self._fail(name, misspelled)
            return
        hooks = tuple(sorted(h.name for h in self._pm.get_hookcallers(plugin) or ()))
        self._update(name, hooks=hooks)
        timeout = env_seconds("HAL_PLUGIN_TIMEOUT", 30.0)
        if "hal_register_backends" in hooks:
            self._call_registration(name, "hal_register_backends", timeout,
                                    lambda register: self.hooks.register_backends(plugin, register), self._accept_backend)
        if "hal_register_policies" in hooks:
            self._call_registration(name, "hal_register_policies", timeout,
                                    lambda register: self.hooks.register_policies(plugin, register), self._accept_policy)

    def _unknown_hooks(self, plugin: object) -> str | None:
        """A reported error for ``hal_*`` implementations no hookspec declares (misspellings),
        which pluggy would otherwise keep as silently uncalled hooks."""
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError:
            pass
        else:
            return None
        unknown = sorted(
            caller.name for caller in self._pm.get_hookcallers(plugin) or () if caller.spec is None
        )
        if not unknown:
            return None
        parts = []
        for hook in unknown:
            near = difflib.get_close_matches(hook, hookspecs.HOOKS, n=1)
            parts.append(f"{hook} (did you mean {near[0]}?)" if near else hook)
        return f"unknown hooks {', '.join(parts)}: hooks are {', '.join(hookspecs.HOOKS)}"

    def _call_registration(
        self,
        name: str,
        hook: str,
        timeout: float,
        call: Callable[[Callable[..., None]], None],
        accept: Callable[..., str],
    ) -> None:
        registered: list[str] = []
        lock = threading.Lock()
        closed = threading.Event()

        def register(*args: Any, **kwargs: Any) -> None:
            with lock:
                if closed.is_set():  # a hook that timed out and woke up later
                    msg = f"{hook} registered after its {timeout:g} s deadline; ignored"
                    raise PluginError(msg)
                registered.append(accept(name, *args, **kwargs))

        try:
            bounded(lambda: call(register), timeout, f"hal-{hook}-{name}")
        except BoundExceeded:
            self._fail(name, f"{hook} did not finish within {timeout:g} s (HAL_PLUGIN_TIMEOUT)")
        except Exception as exc:
            self._fail(name, f"{hook} failed: {_describe(exc)}")
        finally:
            with lock:
                closed.set()
        field_name = "backends" if hook == "hal_register_backends" else "policies"
        assert self._plugins is not None
        self._update(name, **{field_name: (*getattr(self._plugins[name], field_name), *registered)})

    def _accept_backend(self, plugin: str, backend: Any) -> str:
        if not isinstance(backend, Backend):
            msg = f"register() takes a hal.Backend instance, got {type(backend).__name__}"
            raise PluginError(msg)
        name = getattr(backend, "name", None)
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            msg = f"{type(backend).__name__}.name must be a non-empty name without ':', got {name!r}"
            raise PluginError(msg)
        if name in self._backends:
            owner = self._backends[name][0]
            msg = f"backend name {name!r} is already registered by plugin {owner}"
            raise PluginError(msg)
        self._backends[name] = (plugin, backend)
        return name

    def _accept_policy(self, plugin: str, name: Any, rank: Any = None, description: Any = "") -> str:
        if not isinstance(name, str) or not name or name != name.strip().lower():
            msg = f"a policy name must be a non-empty lower-case string, got {name!r}"
            raise PluginError(msg)
        if not callable(rank):
            msg = f"policy {name!r}: rank must be callable rank(model, devices), got {type(rank).__name__}"
            raise PluginError(msg)
        from hal.ranking import BUILTIN_POLICIES

        if name in BUILTIN_POLICIES:
            msg = f"policy name {name!r} is built in ({', '.join(BUILTIN_POLICIES)}); choose another name"
            raise PluginError(msg)
        if name in self._policies:
            msg = f"policy name {name!r} is already registered by plugin {self._policies[name].plugin}"
            raise PluginError(msg)
        self._policies[name] = Policy(name, plugin, rank, str(description or ""))
        return name

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

    def plugin_of(self, backend: str) -> str:
        """The name of the plugin that registered ``backend``."""
        with self._lock:
            self._load()
            return self._backends[backend][0]

    def devices(self, *, refresh: bool = False) -> tuple[Device, ...]:
        with self._lock:
            self._load()
            if refresh:
                self._found = {}
            self._discover([n for n in self._backends if n not in self._found])
            return tuple(d for n in self._backends for d in self._found.get(n, ((), None))[0])

    def problems(self) -> tuple[DiscoveryProblem, ...]:
        self.devices()
        return tuple(p for _, p in self._found.values() if p is not None)

    def device(self, device_id: str, *, require_available: bool = True) -> Device:
        backend = device_id.partition(":")[0] if isinstance(device_id, str) else ""
        with self._lock:
            self._load()
            if backend in self._backends:  # a named device waits for its own backend only
                if backend not in self._found:
                    self._discover([backend])
                devices = {d.id: d for d in self._found[backend][0]}
            else:
                devices = {}
        device = devices.get(device_id)
        if device is None:
            everything = self.devices()
            usable = [d.id for d in everything if d.available]
            msg = (
                f"unknown device {device_id!r}; available devices: {', '.join(usable) or 'none'} "
                "(run `hal devices` to see all, `hal plugins` for plugin errors)"
            )
            raise UnknownDeviceError(msg)
        if require_available and not device.available:
            usable = [d.id for d in self.devices() if d.available]
            msg = (
                f"device {device_id} is unavailable: {device.reason}; "
                f"available devices: {', '.join(usable) or 'none'}"
            )
            raise UnavailableDeviceError(msg)
        return device

    def reapply_health(self) -> None:
        """Give the devices already discovered their latest health records (after ``hal doctor``
        recorded some), without discovering again."""
        with self._lock:
            self._found = {n: (tuple(with_health(ds)), p) for n, (ds, p) in self._found.items()}

    def _discover(self, names: Sequence[str]) -> None:
        if not names:
            return
        timeout = env_seconds("HAL_DISCOVERY_TIMEOUT", 60.0)
        results: dict[str, tuple[str, Any]] = {}
        stop = threading.Event()

        def run(name: str, backend: Backend) -> None:
            try:
                found = []
                for device in backend.discover():
                    if stop.is_set():  # timed out: stop consuming (an endless generator)
                        return
                    found.append(device)
                    if len(found) > MAX_DEVICES_PER_BACKEND:
                        results[name] = ("error", PluginError(f"discover() listed more than {MAX_DEVICES_PER_BACKEND} devices"))
                        return
                results[name] = ("ok", found)
            except Exception as exc:
                results[name] = ("error", exc)

        threads = []
        for name in names:
            backend = self._backends[name][1]
            t = threading.Thread(target=run, args=(name, backend), name=f"hal-discover-{name}", daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stop.set()

        for name in names:
            plugin = self._backends[name][0]
            outcome = results.get(name)
            devices: dict[str, Device] = {}
            errors: list[str] = []
            if outcome is None:
                errors.append(f"discovery did not finish within {timeout:g} s (HAL_DISCOVERY_TIMEOUT)")
            elif outcome[0] == "error":
                errors.append(f"discovery failed: {_describe(outcome[1])}")
            else:
                errors.extend(_accept(name, outcome[1], devices, self._found))
            problem = DiscoveryProblem(name, plugin, "; ".join(errors)) if errors else None
            if problem is not None:
                log.warning("backend %s (plugin %s): %s", name, plugin, problem.error)
            # Measured health (hal doctor's last record) is the host's, never the plugin's say-so.
            self._found[name] = (tuple(with_health(devices.values())), problem)


def _accept(
    backend: str,
    found: Iterable[Any],
    into: dict[str, Device],
    known: dict[str, tuple[tuple[Device, ...], Any]],
) -> list[str]:
    """Check each device a backend handed over; the bad ones become errors, the rest are kept."""
    taken = {d.id for devices, _ in known.values() for d in devices}
    errors = []
    for device in found:
        if not isinstance(device, Device):
            errors.append(f"discover() returned {type(device).__name__}, not a hal.Device")
            continue
        problem = _device_problem(device, backend)
        if problem is not None:
            errors.append(problem)
        elif device.id in into or device.id in taken:
            errors.append(f"device id {device.id} is registered twice")
        else:
            into[device.id] = device
    return errors


def _device_problem(device: Device, backend: str) -> str | None:
    if device.backend != backend or not device.id.startswith(f"{backend}:"):
        return f"device {device.id} must have backend {backend!r} and an id starting with '{backend}:'"
    if not isinstance(device.capabilities, Capabilities):
        return f"device {device.id}: capabilities must be a hal.Capabilities, got {type(device.capabilities).__name__}"
    if not isinstance(device.available, bool):
        return f"device {device.id}: available must be True or False, got {device.available!r}"
    for field_name in ("vendor", "name"):
        if not isinstance(getattr(device, field_name), str):
            return f"device {device.id}: {field_name} must be a string"
    return None


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
