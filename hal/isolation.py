"""Isolation: a device's runner, or a plugin's import and discovery, in a worker process.

A backend can take its process down (a segfault in a vendor library, ``os._exit``) or hang in
native code where no thread can stop it. ``compiled.to(device, isolate=True)`` (and ``isolate=``
in a pool) runs that device's runner in a worker process:

- the worker is started with multiprocessing's ``spawn`` context (a fresh interpreter: onnxruntime
  and OpenVINO start threads, and a forked copy of a threaded process is not safe); it loads the
  device's plugin itself (only that one), finds the device by id, and calls the backend's
  ``prepare`` with the model *as the core lowered it* (serialized protobuf; external weights are
  reopened from their checked directory) and the same options. A backend registered in-process
  (a test's) is pickled across instead;
- requests and answers cross a pipe by pickling (numpy arrays as buffers); feeds are checked once,
  in the caller's process, and answers checked there too (:class:`hal.Executable`);
- a crash fails the requests in flight (:class:`~hal.errors.RunError`, and a pool moves them on)
  and a new worker is started at once; a request past its deadline kills the worker (a hang in
  native code) and is failed the same way. The caller's process lives.

Discovery isolation: plugins named in ``HAL_ISOLATE_PLUGINS`` (comma list of plugin or
distribution names), or that ask for it by listing their entry point in the ``hal.isolate``
entry-point group too, are imported and discovered in a child process (:func:`discover_isolated`).
The parent never imports them. Their devices are listed from the child's records (handles stay
in the child) and served by a stand-in :class:`IsolatedBackend`; using one of those devices always
runs it isolated. A plugin that crashes or hangs there is reported like any broken plugin. Ranking
policies from an isolated plugin are not registered (a policy is code run in the caller's process).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from attrs import frozen

from hal.backend import Backend, CompileOptions, Device
from hal.errors import CompileError, PluginError, RunError, SettingError

if TYPE_CHECKING:
    from hal.lowering import LoweredModel

__all__ = ["KEY", "Isolation", "IsolatedBackend", "WorkerRunner", "discover_isolated", "isolated_plugins", "prepare"]

log = logging.getLogger("hal.isolation")

#: The key under which ``to()`` hands :func:`prepare` an :class:`Isolation` (in
#: ``CompileOptions.extra``; removed before any backend sees the options).
KEY = "hal.isolate"
VARIABLE = "HAL_ISOLATE_PLUGINS"
ENTRY_POINT_GROUP = "hal.isolate"
_CHILD = "HAL_ISOLATED_CHILD"  # set in a child process: the plugin it loads in-process


@frozen
class Isolation:
    """Run the device in a worker process; ``deadline_s`` bounds each request (None: only a
    crash is caught)."""

    deadline_s: float | None = None


_exiting = threading.Event()
# Registered after multiprocessing's own exit handler, so it runs first: the workers multiprocessing
# is about to terminate at exit are not mistaken for crashes and restarted.
atexit.register(_exiting.set)


def _context() -> Any:
    return multiprocessing.get_context("spawn")


def _start_timeout() -> float:
    from hal._bounds import env_seconds

    return env_seconds("HAL_ISOLATE_START_TIMEOUT", 120.0)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# -- which plugins are isolated ---------------------------------------------------------------


def isolated_plugins() -> set[str]:
    """Plugin or distribution names whose import and discovery run in a child process:
    ``HAL_ISOLATE_PLUGINS`` and the plugins that list themselves in the ``hal.isolate`` entry
    point group."""
    from importlib.metadata import entry_points

    raw = os.environ.get(VARIABLE, "")
    names = {part.strip() for part in raw.split(",") if part.strip()}
    bad = sorted(n for n in names if not n.replace("-", "").replace("_", "").replace(".", "").isalnum())
    if bad:
        msg = f"{VARIABLE}={raw!r}: {bad} are not plugin names; give a comma list such as 'sim,openvino' (see hal plugins)"
        raise SettingError(msg)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    names.discard(os.environ.get(_CHILD, ""))
    return names


# -- the stand-in backend of an isolated plugin -----------------------------------------------


class IsolatedBackend(Backend):
    """The parent's stand-in for a backend of an isolated plugin: lists the devices the child
    found; its devices always run in a worker process (:func:`prepare`)."""

    def __init__(self, name: str, version: str, plugin: str, devices: Sequence[dict[str, Any]], problem: str | None) -> None:
        self.name = name
        self._version = version
        self.plugin = plugin
        self._devices = tuple(devices)
        self._problem = problem

    @property
    def version(self) -> str:
        return self._version

    def discover(self) -> Iterable[Device]:
        devices = [Device.from_dict(d) for d in self._devices]
        if self._problem is not None:
            raise PluginError(f"in its isolated process: {self._problem}")
        return devices

    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> Any:
        return WorkerRunner.start(_spec(self, model, device, options), device.id, None)


def discover_isolated(plugin: str, timeout: float) -> tuple[list[IsolatedBackend], str | None]:
    """Import plugin ``plugin`` and discover its backends' devices in a child process, within
    ``timeout`` seconds: stand-in backends, and the plugin's error (None when it loaded). A child
    that crashes, exits or hangs gives no backends and an error saying so."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_discover_child, args=(child, plugin), name=f"hal-discover-{plugin}", daemon=True)
    start = time.monotonic()
    process.start()
    child.close()
    result = None
    ended = False  # the child closed its end: it is exiting, or has
    try:
        if parent.poll(timeout):
            result = parent.recv()
    except (EOFError, OSError):
        ended = True
    finally:
        parent.close()
    if result is None:
        if ended:
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)
            return [], f"isolated import and discovery did not finish within {timeout:g} s (killed)"
        process.join(5)
        return [], (
            f"crashed in its isolated process during import or discovery ({_exit_text(process.exitcode)}); "
            "the other plugins are unaffected"
        )
    process.join(5)
    error, backends = result
    stand_ins = [IsolatedBackend(name, version, plugin, devices, problem) for name, version, devices, problem in backends]
    log.info("plugin %s: imported and discovered in a child process in %.2f s", plugin, time.monotonic() - start)
    return stand_ins, error


def _child_environment(plugin: str) -> None:
    """In a child: load ``plugin`` alone (built-ins too), in-process."""
    os.environ["HAL_LOAD_PLUGINS"] = plugin
    names = [n.strip() for n in os.environ.get(VARIABLE, "").split(",") if n.strip() and n.strip() != plugin]
    os.environ[VARIABLE] = ",".join(names)
    os.environ[_CHILD] = plugin  # loaded in-process here, even when it asks for isolation


def _discover_child(conn: Any, plugin: str) -> None:
    _child_environment(plugin)
    from hal._plugins import Registry

    reg = Registry(builtins={})
    infos = {p.name: p for p in reg.plugins()}
    info = infos.get(plugin)
    if info is None:
        conn.send((f"no installed plugin is named {plugin!r} ({VARIABLE} names plugins: hal plugins lists them)", []))
        return
    backends = []
    if info.status == "loaded":
        devices = reg.devices()
        problems = {p.backend: p.error for p in reg.problems()}
        for name in info.backends:
            backend = reg.backend(name)
            try:
                version = str(backend.version)
            except Exception as exc:  # noqa: BLE001 - reported like the in-process check would
                version = ""
                problems[name] = f"reading its version failed: {type(exc).__name__}: {exc}"
            found = [d.to_dict() for d in devices if d.backend == name]
            backends.append((name, version, found, problems.get(name)))
    conn.send((info.error if info.status == "error" else None, backends))
    conn.close()


# -- runners in worker processes --------------------------------------------------------------


@frozen
class _WorkerSpec:
    """Everything a worker needs to prepare the device's runner itself."""

    plugin: str | None  # loaded by name in the worker; None: ``backend`` is pickled
    backend: bytes | None
    backend_name: str
    device: str
    proto: bytes
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    digest: str
    steps: tuple[Any, ...]
    weights_dir: str | None
    reduced_precision: bool
    cache_dir: str | None
    extra: dict[str, Any]


def _spec(backend: Backend, model: LoweredModel, device: Device, options: CompileOptions) -> _WorkerSpec:
    from hal._plugins import registry

    if isinstance(backend, IsolatedBackend):
        plugin, pickled = backend.plugin, None
    else:
        reg = registry()
        plugin = reg.plugin_of(backend.name)
        info = {p.name: p for p in reg.plugins()}.get(plugin)
        pickled = None
        if info is None or info.distribution == "(in-process)":  # a test's or a notebook's: no entry point
            try:
                pickled = pickle.dumps(backend)
            except Exception as exc:
                msg = (
                    f"backend {backend.name} was registered in-process and cannot be sent to an isolated worker "
                    f"({type(exc).__name__}: {exc}); install it as a plugin, or make the backend picklable"
                )
                raise CompileError(msg) from exc
            plugin = None
    weights = model.weights
    return _WorkerSpec(
        plugin, pickled, backend.name, device.id, model.proto.SerializeToString(), model.inputs, model.outputs,
        model.digest, model.steps, None if weights is None else str(weights.base_dir), options.reduced_precision,
        options.cache_dir, {k: v for k, v in options.extra.items() if k != KEY},
    )


def prepare(backend: Backend, model: LoweredModel, device: Device, options: CompileOptions) -> Any:
    """The runner for ``device``: the backend's own, or one in a worker process when ``to()``
    asked for isolation or the backend's plugin is isolated."""
    isolation = options.extra.get(KEY)
    if isolation is None and not isinstance(backend, IsolatedBackend):
        return backend.prepare(model, device, options)
    deadline = isolation.deadline_s if isinstance(isolation, Isolation) else None
    return WorkerRunner.start(_spec(backend, model, device, options), device.id, deadline)


def _worker(conn: Any, spec: _WorkerSpec) -> None:
    """A worker process: prepare the runner, say ready, then serve requests until told to stop
    or the parent goes away."""
    import onnx

    from hal.lowering import LoweredModel

    try:
        if spec.plugin is not None:
            _child_environment(spec.plugin)
            from hal._plugins import registry

            reg = registry()
            device = reg.device(spec.device)
            backend = reg.backend(spec.backend_name)
        else:
            backend = pickle.loads(spec.backend)  # noqa: S301 - our own parent's bytes
            found = {d.id: d for d in backend.discover()}
            if spec.device not in found:
                msg = f"backend {spec.backend_name} no longer lists {spec.device} in its worker process"
                raise CompileError(msg)
            device = found[spec.device]
        proto = onnx.ModelProto.FromString(spec.proto)
        weights = None
        if spec.weights_dir is not None:
            from pathlib import Path

            from hal.model import _external_data

            weights = _external_data(proto, Path(spec.weights_dir), "the isolated worker's model")
        model = LoweredModel(proto, spec.inputs, spec.outputs, spec.digest, spec.steps, weights)
        options = CompileOptions(reduced_precision=spec.reduced_precision, cache_dir=spec.cache_dir, extra=spec.extra)
        runner = backend.prepare(model, device, options)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(exc).__name__}: {exc}", tuple(getattr(exc, "operators", ()))))
        return
    conn.send(("ready", os.getpid(), None))
    _serve(conn, runner)


def _serve(conn: Any, runner: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    send_lock = threading.Lock()

    def answer(rid: int, feeds: Any, names: Any) -> None:
        try:
            reply = ("ok", rid, list(runner.run(feeds, names)))
        except BaseException as exc:  # noqa: BLE001 - the parent raises it as a RunError
            text = str(exc).strip().splitlines()
            reply = ("error", rid, f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
        try:
            with send_lock:
                conn.send(reply)
        except (OSError, pickle.PicklingError) as exc:
            with send_lock:
                conn.send(("error", rid, f"the answer could not be sent back: {type(exc).__name__}: {exc}"))

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="hal-worker") as pool:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone: so are we
                os._exit(0)
            if message is None:
                break
            pool.submit(answer, *message)


class _Pending:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: str | None = None


class _Process:
    """One worker process of a :class:`WorkerRunner`, with the requests it has in flight."""

    def __init__(self, spec: _WorkerSpec, label: str) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, spec), name=f"hal-worker-{label}", daemon=True)
        self.process.start()
        child.close()
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()  # pending, and sending
        self.dead: str | None = None

    def ready(self, timeout: float) -> tuple[str, Any, Any]:
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            return ("failed", f"the worker process died while preparing ({_exit_text(self.process.exitcode)})", ())
        return ("failed", f"the worker process did not get ready within {timeout:g} s (HAL_ISOLATE_START_TIMEOUT)", ())

    def fail_all(self, why: str) -> None:
        with self.lock:
            if self.dead is None:
                self.dead = why
            pending, self.pending = self.pending, {}
        for slot in pending.values():
            slot.error = why
            slot.done.set()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        try:
            self.conn.close()
        except OSError:
            pass


class WorkerRunner:
    """A runner whose backend runs in a worker process (see the module's docs). ``restarts``
    counts workers started after a crash or a kill; ``pid`` is the current worker's."""

    def __init__(self, spec: _WorkerSpec, label: str, deadline_s: float | None) -> None:
        self._spec = spec
        self._label = label
        self.deadline_s = deadline_s
        self.restarts = 0
        self.crashes = 0
        self.kills = 0
        self._lock = threading.Lock()
        self._ids = 0
        self._current: _Process | None = None
        self._ready = threading.Event()
        self._closed = False
        self.start_seconds = 0.0

    @classmethod
    def start(cls, spec: _WorkerSpec, label: str, deadline_s: float | None) -> WorkerRunner:
        """Start the worker and wait for its runner; raises :class:`CompileError` with the
        worker's reason when the backend cannot prepare the model there."""
        runner = cls(spec, label, deadline_s)
        error = runner._launch()
        if error is not None:
            msg, operators = error
            raise CompileError(f"{label} (isolated): {msg}", operators)
        return runner

    @property
    def pid(self) -> int | None:
        current = self._current
        return None if current is None else current.process.pid

    def _launch(self) -> tuple[str, tuple[str, ...]] | None:
        started = time.monotonic()
        worker = _Process(self._spec, self._label)
        status, value, operators = worker.ready(_start_timeout())
        if status != "ready":
            worker.kill()
            return str(value), tuple(operators or ())
        self.start_seconds = time.monotonic() - started
        with self._lock:
            self._current = worker
        threading.Thread(target=self._read, args=(worker,), name=f"hal-worker-reader-{self._label}", daemon=True).start()
        self._ready.set()
        return None

    def _read(self, worker: _Process) -> None:
        conn = worker.conn
        while True:
            try:
                status, rid, payload = conn.recv()
            except (EOFError, OSError):
                break
            with worker.lock:
                slot = worker.pending.pop(rid, None)
            if slot is None:
                continue  # a request given up on: its answer is dropped
            if status == "ok":
                slot.value = payload
            else:
                slot.error = payload
            slot.done.set()
        if _exiting.is_set():
            return
        worker.process.join(5)
        code = worker.process.exitcode
        why = worker.dead or f"the worker process died ({_exit_text(code)})"
        if worker.dead is None:
            self.crashes += 1
            log.warning("%s: isolated worker %s; starting another", self._label, why)
        worker.fail_all(why)
        self._replace(worker)

    def _replace(self, worker: _Process) -> None:
        with self._lock:
            if self._current is not worker or self._closed:
                return
            self._current = None
            self._ready.clear()
        self.restarts += 1
        error = self._launch()
        if error is not None:
            log.warning("%s: the isolated worker could not be restarted: %s", self._label, error[0])
            with self._lock:
                self._broken = error[0]
            self._ready.set()

    _broken: str | None = None

    def abandon(self) -> None:
        """Kill the worker (a request is stuck in it); a new one is started."""
        with self._lock:
            worker = self._current
        if worker is not None and worker.process.is_alive():
            self.kills += 1
            worker.dead = "the worker process was killed: a request in it overran its deadline"
            worker.kill()

    def run(self, feeds: dict[str, Any], output_names: Sequence[str]) -> list[Any]:
        deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        if not self._ready.wait(None if deadline is None else self.deadline_s):
            msg = f"{self._label}: the isolated worker is restarting and was not ready within {self.deadline_s:g} s"
            raise RunError(msg)
        with self._lock:
            worker = self._current
            broken = self._broken
            self._ids += 1
            rid = self._ids
        if worker is None:
            msg = f"{self._label}: the isolated worker is not running: {broken or 'closed'}"
            raise RunError(msg)
        slot = _Pending()
        with worker.lock:
            if worker.dead is not None:
                msg = f"{self._label}: {worker.dead}"
                raise RunError(msg)
            worker.pending[rid] = slot
            try:
                worker.conn.send((rid, feeds, list(output_names)))
            except (OSError, ValueError) as exc:
                worker.pending.pop(rid, None)
                msg = f"{self._label}: the isolated worker cannot take requests ({type(exc).__name__}: {exc})"
                raise RunError(msg) from None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not slot.done.wait(timeout):
            with worker.lock:
                worker.pending.pop(rid, None)
            self.abandon()
            msg = f"{self._label}: no answer within {self.deadline_s:g} s; the isolated worker was killed and restarted"
            raise RunError(msg)
        if slot.error is not None:
            msg = f"{self._label} (isolated): {slot.error}"
            raise RunError(msg)
        return slot.value

    def close(self) -> None:
        """Stop the worker."""
        with self._lock:
            self._closed = True
            worker, self._current = self._current, None
        if worker is not None:
            worker.dead = "the isolated executable was closed"
            try:
                with worker.lock:
                    worker.conn.send(None)
            except (OSError, ValueError):
                pass
            worker.process.join(2)
            worker.kill()
            worker.fail_all(worker.dead)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - at interpreter exit; daemon workers die with us
            pass
