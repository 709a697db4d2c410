"""A fleet of devices across a Ray cluster: listing, placement, and failover between actors."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import evolve, frozen

from hal.backend import Device
from hal.capabilities import DeviceKind
from hal.errors import CompileError, HalError, InputError, SettingError
from hal.executable import Executable
from hal.lowering import LoweringStep, Placement
from hal.pool import OPEN, BreakerSettings, Counted, Dispatcher, check_seconds

if TYPE_CHECKING:
    from hal.compiled import CompiledModel

__all__ = ["Fleet", "FleetDevice", "FleetExecutable", "Shipment", "model_bytes", "resources_for", "ship"]

log = logging.getLogger("hal.ray")

#: Seconds a request may take through a fleet, every retry included, unless ``deadline_s`` says.
DEFAULT_DEADLINE_S = 30.0
#: How often Ray restarts a device actor whose process or node died.
DEFAULT_MAX_RESTARTS = 4
#: Seconds the actors may take to start, lower and verify the model, unless ``placement_timeout_s`` says.
DEFAULT_PLACEMENT_TIMEOUT_S = 600.0
#: Seconds a node's probe may take to list its devices (a node that died a moment ago lists none).
PROBE_TIMEOUT_S = 60.0
#: Requests one device actor runs at once (a runner may be called from many threads).
ACTOR_CONCURRENCY = 4


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        msg = "hal.ray needs Ray: pip install 'onnx-hal[ray]' (ray[serve])"
        raise SettingError(msg) from None
    return ray


@frozen
class FleetDevice:
    """A HAL device on one node of the cluster. ``id`` is ``ray:<node>:<device id>`` (the first 8
    characters of Ray's node id), unique in the fleet; ``device`` is the record the node's
    ``hal.devices()`` listed."""

    node: str
    host: str
    device: Device

    @property
    def id(self) -> str:
        return f"ray:{self.node[:8]}:{self.device.id}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node, "host": self.host, "device": self.device.to_dict()}


def resources_for(device: Device) -> dict[str, Any]:
    """The Ray actor options a device needs (``num_cpus``, ``num_gpus``, ``resources``,
    ``accelerator_type``): ``GPU`` for an NVIDIA or other GPU, ``NPU`` (with the accelerator type,
    e.g. ``Ascend910B``) for an Ascend NPU, ``CPU`` for a CPU device, and for a simulated chip a
    custom resource ``hal_sim_<profile>`` (``sim:ascend-910c:0`` needs ``hal_sim_ascend_910c``)
    that the nodes having it advertise: ``HAL_SIM_DEVICES=h100 ray start --resources='{"hal_sim_h100": 1}'``."""
    if device.backend == "sim":
        profile = device.id.split(":")[1]  # sim:<profile>:<n>, hal-sim's documented id
        return {"num_cpus": 0, "resources": {f"hal_sim_{profile.replace('-', '_').replace('.', '_')}": 1.0}}
    if device.kind is DeviceKind.GPU:
        return {"num_cpus": 0, "num_gpus": 1.0}
    if device.kind is DeviceKind.NPU:
        options: dict[str, Any] = {"num_cpus": 0, "resources": {"NPU": 1.0}}
        compact = device.name.replace(" ", "")
        if compact.lower().startswith("ascend"):
            options["accelerator_type"] = "Ascend" + compact[len("ascend"):].split("(")[0]
        return options
    return {"num_cpus": 1}


def _scaled(options: Mapping[str, Any], share: float) -> dict[str, Any]:
    """Resource options with every amount multiplied by ``share`` (replicas share a device)."""
    out = dict(options)
    for key in ("num_cpus", "num_gpus"):
        if key in out:
            out[key] = out[key] * share
    if "resources" in out:
        out["resources"] = {k: v * share for k, v in out["resources"].items()}
    return out


def model_bytes(compiled: CompiledModel) -> bytes:
    """The compiled model as :meth:`CompiledModel.save` writes it, in memory: what a node's
    ``hal.compile(bytes)`` reads back without optimizing again. Raises InputError for a model whose
    weights are external (:func:`ship` carries those)."""
    import json

    import onnx

    from hal.compiled import MANIFEST_KEY

    if compiled.model.weights is not None:
        msg = (
            f"{compiled.model.name!r} keeps its weights in external files, which do not fit in one ModelProto's bytes; "
            "use hal.ray.ship(compiled), which carries them beside it"
        )
        raise InputError(msg)
    proto = onnx.ModelProto()
    proto.CopyFrom(compiled.model.proto)
    proto.metadata_props.add(key=MANIFEST_KEY, value=json.dumps(compiled.manifest, sort_keys=True))
    return proto.SerializeToString()


@frozen(eq=False)  # an array inside: no element-wise ==
class Shipment:
    """A compiled model as a fleet ships it through Ray's object store: the model's bytes and,
    for a model with external weights, its one weights file as a uint8 array (Ray moves arrays
    without pickling their bytes, and a node reads them from shared memory). :meth:`open` makes
    it a :class:`~hal.CompiledModel` again on the node."""

    model: bytes
    data_name: str | None = None
    data: Any = None  # np.ndarray of uint8: the weights file save() wrote, tensors 64-byte aligned

    @property
    def nbytes(self) -> int:
        return len(self.model) + (0 if self.data is None else int(self.data.nbytes))

    def open(self) -> CompiledModel:
        """The compiled model, not optimized again. External weights are written to a private
        directory of this process (removed when the model is), whose files the HAL maps."""
        import hal

        if self.data is None:
            return hal.compile(self.model)
        import shutil
        import tempfile
        import weakref
        from pathlib import Path

        directory = Path(tempfile.mkdtemp(prefix="hal-fleet-"))
        try:
            (directory / "model.onnx").write_bytes(self.model)
            with open(directory / str(self.data_name), "wb") as f:
                f.write(memoryview(self.data).cast("B"))
            compiled = hal.compile(directory / "model.onnx")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        weakref.finalize(compiled, shutil.rmtree, str(directory), True)  # mapped files outlive the names
        return compiled


def ship(compiled: CompiledModel) -> Shipment:
    """``compiled`` as a :class:`Shipment`: its bytes, and its external weights (if any) as one
    array, read from the file :meth:`CompiledModel.save` writes (one copy, into the object store
    when put there)."""
    if compiled.model.weights is None:
        return Shipment(model_bytes(compiled))
    import tempfile
    from pathlib import Path

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="hal-ship-") as tmp:
        path = Path(tmp) / "model.onnx"
        compiled.save(path)
        data_name = f"{path.name}.data"
        data = np.fromfile(path.parent / data_name, dtype=np.uint8)
        return Shipment(path.read_bytes(), data_name, data)


class Fleet:
    """Every HAL device of a Ray cluster.

    ``Fleet(address=None)`` uses the Ray session already started in this process, or starts one
    with ``ray.init(address, **init_options)`` (``None``: a local one, or the cluster named by
    ``RAY_ADDRESS``). A small actor on each alive node lists that node's ``hal.devices()``.
    """

    def __init__(self, address: str | None = None, **init_options: Any) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address, **init_options)
        self._devices = self._discover()

    def __repr__(self) -> str:
        nodes = len({d.node for d in self._devices})
        return f"<hal.ray.Fleet: {len(self._devices)} devices on {nodes} nodes>"

    @property
    def devices(self) -> tuple[FleetDevice, ...]:
        """Every node's devices, available or not, node by node."""
        return self._devices

    def refresh(self) -> tuple[FleetDevice, ...]:
        """List the nodes' devices again (nodes come and go)."""
        self._devices = self._discover()
        return self._devices

    def _discover(self) -> tuple[FleetDevice, ...]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from hal.ray._actors import NodeProbe

        ray = _ray()
        probe = ray.remote(NodeProbe)
        actors = []
        alive = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            alive.append(node["NodeID"])
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            actors.append(probe.options(num_cpus=0, scheduling_strategy=strategy).remote())
        refs = [a.devices.remote() for a in actors]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
            listed = []
            for node, ref in zip(alive, refs):
                try:
                    listed.append(ray.get(ref, timeout=0))
                except Exception as exc:  # noqa: BLE001 - a node that cannot answer lists nothing
                    log.warning("fleet: node %s listed no devices: %s", node[:8], _remote_reason(exc))
        finally:
            for actor in actors:
                ray.kill(actor)
        found = []
        for entry in sorted(listed, key=lambda e: e["node"]):
            for data in entry["devices"]:
                found.append(FleetDevice(entry["node"], entry["host"], Device.from_dict(data)))
        return tuple(found)

    def to(
        self,
        compiled: CompiledModel,
        devices: str | Sequence[str | FleetDevice] = "auto",
        *,
        replicas: int = 1,
        deadline_s: float | None = DEFAULT_DEADLINE_S,
        breaker: BreakerSettings | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        resources: Mapping[str, Mapping[str, Any]] | None = None,
        placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
        **options: Any,
    ) -> FleetExecutable:
        """Place ``compiled`` on devices of the fleet and return a :class:`FleetExecutable`.

        ``devices``: ``"auto"`` (every available device that can run the model, accelerators and
        simulated chips before CPUs: CPU devices only when there is nothing else), or a list of
        fleet ids (``ray:<node>:sim:h100:0``), :class:`FleetDevice` records, or device ids
        (``sim:h100:0``: that device on every node that lists it). ``replicas``: actors per
        device, sharing its resources. The model goes into the object store once; each actor
        lowers and verifies it on its node (``compiled.to(device, strict=True, **options)``, the
        node's own compile cache). ``resources``: actor options by device id, replacing
        :func:`resources_for`'s. An actor not ready within ``placement_timeout_s`` (no node
        offers its resources, or lowering takes longer) is left out. Raises :class:`~hal.errors.CompileError` naming each device's
        failure when no actor could place it; devices that could not are left out with a WARNING.
        """
        from hal.compiled import CompiledModel
        from hal.ray._actors import DeviceWorker

        ray = _ray()
        if not isinstance(compiled, CompiledModel):
            msg = f"Fleet.to takes a hal.CompiledModel (from hal.compile(model)), got {type(compiled).__name__}"
            raise InputError(msg)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            msg = f"replicas must be an integer of at least 1, got {replicas!r}"
            raise InputError(msg)
        if deadline_s is not None:
            check_seconds("deadline_s", deadline_s)
        check_seconds("placement_timeout_s", placement_timeout_s)
        chosen = self._choose(compiled, devices)
        ref = ray.put(ship(compiled))
        worker = ray.remote(DeviceWorker)
        pending = []
        for target in chosen:
            base = dict(resources[target.device.id]) if resources and target.device.id in resources else resources_for(target.device)
            for replica in range(replicas):
                actor_options = _scaled(base, 1.0 / replicas)
                actor = worker.options(
                    **actor_options,
                    max_restarts=max_restarts,
                    max_task_retries=0,  # a failed request is retried by the fleet, on another actor
                    max_concurrency=ACTOR_CONCURRENCY,
                    scheduling_strategy=_prefer(target.node),
                ).remote(ref, target.device.id, options)
                name = target.id if replica == 0 else f"ray:{target.node[:8]}.r{replica}:{target.device.id}"
                pending.append((name, target, actor, actor_options))
        members: list[_Member] = []
        failures: list[tuple[str, str]] = []
        described = [a.describe.remote() for _, _, a, _ in pending]
        ray.wait(described, num_returns=len(described), timeout=placement_timeout_s)
        for (name, target, actor, actor_options), ref_ in zip(pending, described):
            try:
                info = ray.get(ref_, timeout=0)
            except ray.exceptions.GetTimeoutError:
                wanted = {k: v for k, v in actor_options.items() if k in ("num_cpus", "num_gpus", "resources", "accelerator_type")}
                failures.append((name, (
                    f"not ready within {placement_timeout_s:g} s: no node offers {wanted} free, or lowering took longer "
                    "(`ray status` lists what the nodes offer; a node advertises a chip with ray start --resources)"
                )))
                ray.kill(actor, no_restart=True)
                continue
            except Exception as exc:  # noqa: BLE001 - the actor's constructor failed: left out, with why
                failures.append((name, _remote_reason(exc)))
                ray.kill(actor, no_restart=True)
                continue
            members.append(_Member(name, target, actor, info, compiled, breaker or BreakerSettings()))
        if not members:
            msg = f"no device of the fleet could take {compiled.model.name!r}: " + "; ".join(f"{d}: {r}" for d, r in failures)
            raise CompileError(msg)
        for name, reason in failures:
            log.warning("fleet: %s left out: %s", name, reason)
        return FleetExecutable(members, ref, deadline_s=deadline_s, left_out=failures)

    def _choose(self, compiled: CompiledModel, devices: str | Sequence[str | FleetDevice]) -> list[FleetDevice]:
        if isinstance(devices, str):
            if devices != "auto":
                devices = [devices]
            else:
                runnable = [d for d in self._devices if d.device.available and compiled.explain(d.device).status != "cannot"]
                others = [d for d in runnable if d.device.kind is not DeviceKind.CPU]
                chosen = others or runnable
                if not chosen:
                    reasons = "; ".join(f"{d.id}: {compiled.explain(d.device).reason}" for d in self._devices)
                    msg = f"no device of the fleet can run {compiled.model.name!r}: {reasons or 'the fleet lists no device'}"
                    raise CompileError(msg)
                return chosen
        chosen = []
        by_fleet_id = {d.id: d for d in self._devices}
        for item in devices:
            if isinstance(item, FleetDevice):
                chosen.append(item)
                continue
            if not isinstance(item, str):
                msg = f"devices= takes 'auto' or a list of fleet ids, device ids or FleetDevice records, got {item!r}"
                raise InputError(msg)
            if item in by_fleet_id:
                chosen.append(by_fleet_id[item])
                continue
            named = [d for d in self._devices if d.device.id == item]
            if not named:
                known = ", ".join(sorted({d.id for d in self._devices})) or "none"
                msg = f"no node of the fleet lists a device {item!r}; the fleet has: {known} (fleet.refresh() after adding nodes)"
                raise InputError(msg)
            chosen.extend(named)
        return list(dict.fromkeys(chosen))


def _prefer(node: str) -> Any:
    """Start on the node that listed the device, but let Ray restart the actor on another node
    with the same resources when that node dies."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=True)


def _remote_reason(exc: BaseException) -> str:
    """One line for an error that came back from an actor: the HAL's own message where the actor
    raised one, else what Ray says happened."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, HalError):
        return first
    return f"{type(exc).__name__}: {first}".rstrip(": ")


class _Fetched:
    """A runner that hands back the outputs a remote actor already returned, so the member's
    :class:`~hal.Executable` checks them (count, element types, shapes) as it checks any runner's."""

    @staticmethod
    def run(feeds: Any, names: Sequence[str]) -> Any:
        return feeds


class _Member(Counted):
    """One actor of a fleet: its device, breaker, counts, and a local Executable for checking."""

    def __init__(self, name: str, target: FleetDevice, actor: Any, info: Mapping[str, Any],
                 compiled: CompiledModel, settings: BreakerSettings) -> None:
        device = evolve(Device.from_dict(info["device"]), id=name)
        exe = Executable(
            _Fetched(), device, compiled.inputs, compiled.outputs,
            placement=tuple(Placement(name, tuple(p["nodes"])) for p in info["placement"]),
            lowering=tuple(LoweringStep(**s) for s in info["lowering"]),
        )
        super().__init__(name, exe, settings, extra=("restarted",))
        self.target = target
        self.actor = actor
        self.verified = info["verified"]
        self.inflight = 0
        self.restarting = False  # killed as hung, not answered since


class FleetExecutable(Dispatcher):
    """A model placed on actors across the fleet: ``run(feeds)``, ``inputs`` and ``outputs`` as a
    :class:`hal.Executable` has them, safe from many threads.

    Each request gets an id and goes to the healthy actor with the fewest requests in flight
    (ties in turn); one that fails it (the device raised, the actor or its node died, no answer
    within its share of ``deadline_s``, non-finite floats where another actor answers finite
    ones) counts against that actor's circuit breaker (:class:`hal.pool.Breaker`) and the
    request moves to the next actor, as a :class:`hal.Pool` does. The caller gets exactly one
    answer, or a :class:`~hal.errors.FailoverError` naming each actor's failure; an abandoned
    call's late answer is dropped. Ray restarts an actor whose process or node died (up to
    ``max_restarts``); its breaker lets a trial through after the cool-down. An actor whose
    breaker opens on timeouts is hung: its process is killed, and Ray restarts it
    (``restarts()`` counts them).
    """

    def __init__(self, members: Sequence[_Member], model: Any, *, deadline_s: float | None,
                 left_out: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__()
        self._members = tuple(members)
        self._model = model  # the object-store copy: Ray's restarted actors read it again
        self.deadline_s = deadline_s
        self.left_out = tuple(left_out)
        self._ids = itertools.count(1)
        self._turn = itertools.count()

    def __repr__(self) -> str:
        return f"<hal.ray.FleetExecutable on {', '.join(m.id for m in self._members)}>"

    @property
    def lowering(self) -> tuple[LoweringStep, ...]:
        """What placing the model changed on the first actor's device (each actor's in ``describe()``)."""
        return self._members[0].exe.lowering

    @property
    def actors(self) -> dict[str, Any]:
        """Ray actor handles by fleet id."""
        return {m.id: m.actor for m in self._members}

    def describe(self) -> list[dict[str, Any]]:
        """Per actor: fleet id, node, host, the device's lowering and its verification."""
        return [
            {"id": m.id, "node": m.target.node, "host": m.target.host,
             "lowering": [s.to_dict() for s in m.exe.lowering], "verified": m.verified}
            for m in self._members
        ]

    def restarts(self) -> dict[str, int]:
        """Per actor: how many times the fleet killed it as hung (Ray restarts it)."""
        return {m.id: m.counts["restarted"] for m in self._members}

    def check_health(self, burn_in: int = 2) -> dict[str, dict[str, Any]]:
        """Each actor's canary check (:meth:`hal.ray._actors.DeviceWorker.check_health`), or the
        reason it could not answer."""
        ray = _ray()
        refs = {m.id: m.actor.check_health.remote(burn_in) for m in self._members}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=self.deadline_s)
            except Exception as exc:  # noqa: BLE001 - a dead or hung actor is a health result
                out[name] = {"status": "unreachable", "reasons": [_remote_reason(exc)]}
        return out

    def close(self) -> None:
        """End the actors (Ray does not restart them)."""
        ray = _ray()
        for member in self._members:
            try:
                ray.kill(member.actor, no_restart=True)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass

    # -- running ---------------------------------------------------------------------------------

    def _order(self) -> list[_Member]:
        with self._lock:
            turn = next(self._turn) % len(self._members)
            rotated = self._members[turn:] + self._members[:turn]
            return sorted(rotated, key=lambda m: m.inflight)  # stable: ties keep their turn

    def _count(self, member: _Member, what: str, error: str | None = None) -> None:
        member.count(what, error)
        with self._lock:
            if what == "served":
                member.restarting = False
            # Timeouts opened its breaker: the actor is hung (its threads stuck in calls nothing
            # in Python can stop). Once per hang: a restarting actor answers nothing for a while.
            hung = what == "timed_out" and member.breaker.state == OPEN and not member.restarting
            if hung:
                member.restarting = True
        if hung:
            self._restart(member)

    def _restart(self, member: _Member) -> None:
        """Kill a hung actor's process; Ray restarts it (``max_restarts``) and the breaker lets a
        trial through after the cool-down. Its stuck requests fail over like any other."""
        log.warning(
            "fleet: %s stopped answering within its share of the deadline (%s): its process is killed, Ray restarts it",
            member.id, member.last_error,
        )
        member.count("restarted")
        try:
            _ray().kill(member.actor, no_restart=False)
        except Exception as exc:  # noqa: BLE001 - already dead (Ray restarts it, or it is out of restarts)
            log.warning("fleet: %s could not be killed: %s", member.id, exc)

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Run the model on one actor of the fleet, failing over (see the class). Raises
        :class:`~hal.errors.InputError` for bad feeds (no actor is tried) and
        :class:`~hal.errors.FailoverError` when no actor answered within the deadline."""
        ray = _ray()
        checker = self._members[0].exe
        feeds, names, specs = checker.check(feeds, output_names)
        feeds = dict(feeds)
        with self._lock:
            request = next(self._ids)
        return self._dispatch(
            self._order(),
            lambda member, timeout: self._attempt(ray, member, request, feeds, names, specs, timeout),
            self._count,
            deadline_s=self.deadline_s,
            nobody=f"no actor of the fleet answered request {request}",
            hint="see .stats(), and ray status for the nodes",
        )

    def _attempt(self, ray: Any, member: _Member, request: int, feeds: dict[str, Any], names: Sequence[str],
                 specs: Any, timeout: float | None) -> tuple[str, Any]:
        """``("ok", outputs)``, ``("error", reason)`` or ``("timeout", reason)``."""
        with self._lock:
            member.inflight += 1
        try:
            ref = member.actor.run.remote(request, feeds, list(names))
            try:
                answered, results = ray.get(ref, timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                try:
                    ray.cancel(ref)  # its answer, should it come, is dropped where it lands
                except Exception:  # noqa: BLE001, S110 - already finished or gone
                    pass
                return "timeout", f"no answer within {timeout:.3g} s (abandoned)"
            except ray.exceptions.RayTaskError as exc:
                return "error", _remote_reason(exc)
            except ray.exceptions.RayError as exc:  # the actor or its node died, or is restarting
                return "error", f"actor unreachable ({_remote_reason(exc)}); Ray restarts it"
            if answered != request:
                return "error", f"answered request {answered} when asked for {request}"
            try:
                return "ok", member.exe.run_checked(results, names, specs)
            except HalError as exc:
                return "error", str(exc)
        finally:
            with self._lock:
                member.inflight -= 1


