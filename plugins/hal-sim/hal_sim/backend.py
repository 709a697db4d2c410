"""The ``sim`` backend: devices built from chip profiles, computed on the CPU by onnxruntime.

Each device of ``HAL_SIM_DEVICES`` declares what its profile says (formats, scaled formats, E8M0
encoding, memory, peak throughput, interconnect, opsets, dynamic shapes, unsupported operators,
launch overhead), and the core's lowering enforces it exactly as for a real chip: formats the chip
lacks are legalized or refused, operators it lacks fall back, a model larger than its memory is
refused. What reaches :meth:`SimBackend.prepare` is then lowered once more for onnxruntime's CPU
kernels (:func:`hal.plugin.emulate`: an FP8 MatMul the simulated chip computes natively is
computed wider here) and run by :class:`hal.plugin.OrtBackend`'s runner, wrapped for faults and
pacing (:mod:`hal_sim.faults`).

What the simulator cannot compute even so (formats onnxruntime's CPU kernels cannot hold) is not
declared, whatever the profile says: the device's details list what was left out, so the
contract kit's check that every declared level holds stays true.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from hal.plugin import (
    Capabilities, CompileOptions, Device, DeviceKind, E8M0Encoding, Interconnect, InterconnectKind,
    LoweredModel, Maturity, Memory, NumberFormat, OpsetRange, OrtBackend, ScaledFormat, Stability, Support,
    UnavailableDeviceError, emulate, fit_capabilities,
)
from hal_sim import __version__
from hal_sim import profile as profiles
from hal_sim import settings
from hal_sim.faults import DeviceState, SimRunner
from hal_sim.settings import FaultSpec

__all__ = ["DEFAULT_PROFILE", "NOT_SIMULATED", "SimBackend", "SimHandle", "capabilities_for"]

log = logging.getLogger("hal_sim")

#: The profile of the one device listed, unavailable, when HAL_SIM_DEVICES chooses none.
DEFAULT_PROFILE = "h100"

#: Formats the simulator cannot compute or even hold, with why: onnxruntime's CPU kernels (the
#: simulator's runtime) have none for them, so a profile's level for them is not declared.
NOT_SIMULATED: dict[NumberFormat, str] = {
    NumberFormat.FLOAT4_E2M1: "onnxruntime's CPU has no float4_e2m1 kernels",
    NumberFormat.FLOAT6_E2M3: "onnx and onnxruntime have no float6 element type",
    NumberFormat.FLOAT6_E3M2: "onnx and onnxruntime have no float6 element type",
    NumberFormat.COMPLEX64: "onnxruntime's CPU has no complex kernels",
    NumberFormat.COMPLEX128: "onnxruntime's CPU has no complex kernels",
}

#: What a device computes with, for people (``hal devices``).
SIMULATED = "simulated (computes on the CPU through onnxruntime)"

#: Opsets when a profile declares none: what onnxruntime's CPU build reads (fitted at discovery).
_DEFAULT_OPSETS = (7, 25)

#: Interconnects that join chips to each other (a simulated device's peers are the other devices
#: of its profile); PCIe and none join nothing in particular.
_CHIP_LINKS = frozenset(k for k in InterconnectKind if k not in (InterconnectKind.PCIE, InterconnectKind.NONE))



@frozen
class SimHandle:
    """What :meth:`SimBackend.prepare` needs of a device: its profile and the run settings."""

    profile: profiles.Profile
    faults: FaultSpec | None
    seed: int
    pace: bool


def capabilities_for(profile: profiles.Profile, peers: Sequence[str] = ()) -> tuple[Capabilities, list[str]]:
    """The :class:`Capabilities` a device of ``profile`` declares, and notes on what the
    simulator changed or assumed (for its details)."""
    notes: list[str] = []
    levels = profile.levels()
    for fmt, why in NOT_SIMULATED.items():
        if levels.get(fmt, Support.NONE) is not Support.NONE:
            notes.append(f"{fmt.value}: profile says {levels[fmt].value}, not declared ({why})")
            levels[fmt] = Support.NONE
    scaled = []
    for entry in profile.scaled:
        left_out = [NOT_SIMULATED[f] for f in (entry.element, entry.scale) if f in NOT_SIMULATED]
        if left_out:
            notes.append(
                f"scaled {entry.element.value} x {entry.scale.value} {list(entry.block)}: not declared ({left_out[0]})"
            )
            continue
        scaled.append(ScaledFormat(entry.element, entry.scale, entry.block, entry.support))
    sw = profile.software
    memory = profile.memory
    link = profile.interconnect
    opsets_figure = sw.get("opsets")
    low, high = opsets_figure.value if opsets_figure else _DEFAULT_OPSETS
    if opsets_figure is None:
        notes.append(f"opsets not declared: onnxruntime's ({low}-{high}, fitted to the installed build)")
    domains = sw["domains"].value if "domains" in sw else ()
    if "dynamic_shapes" not in sw:
        notes.append("dynamic_shapes not declared: assumed yes (as onnxruntime)")
    kind = InterconnectKind(link["kind"].value) if "kind" in link else InterconnectKind.NONE
    caps = Capabilities(
        formats=levels,
        scaled=scaled,
        e8m0_encoding=E8M0Encoding(profile.e8m0_encoding.value) if profile.e8m0_encoding else None,
        interconnect=Interconnect(
            kind=kind,
            bandwidth_gbps=link["bandwidth_gbps"].value if "bandwidth_gbps" in link else None,
            links=int(link["links"].value) if "links" in link else None,
            peers=tuple(peers) if kind in _CHIP_LINKS else (),
            latency_us=link["latency_us"].value if "latency_us" in link else None,
        ),
        stability=Stability(
            maturity=Maturity.SIMULATED,
            incompatibilities=sw["incompatibilities"].value if "incompatibilities" in sw else (),
        ),
        memory=Memory(
            capacity_bytes=int(memory["capacity_gib"].value * 2**30) if "capacity_gib" in memory else None,
            bandwidth_gbps=memory["bandwidth_gbps"].value if "bandwidth_gbps" in memory else None,
        ),
        peak_tflops={fmt: figure.value for fmt, figure in profile.peak_tflops.items()},
        opsets=OpsetRange(low, high, domains=domains),
        dynamic_shapes=sw["dynamic_shapes"].value if "dynamic_shapes" in sw else True,
        unsupported_ops=sw["unsupported_ops"].value if "unsupported_ops" in sw else (),
        launch_overhead_us=sw["launch_overhead_us"].value if "launch_overhead_us" in sw else None,
    )
    # The simulator's runtime is onnxruntime's CPU build: its opsets, IR version and float8_e8m0
    # kernels bound what any simulated device can run.
    fitted = fit_capabilities(caps)
    if fitted.formats != caps.formats:
        notes.append("float8_e8m0: not declared (the installed onnxruntime has no CPU kernels for it)")
    if fitted.opsets.max < high:
        notes.append(f"opsets capped at {fitted.opsets.max}: the installed onnxruntime reads no newer")
    return fitted, notes


class SimBackend(OrtBackend):
    """Simulated chips from profiles. Backend name ``sim``; devices ``sim:<profile>:<n>``.

    ``CompileOptions.extra``: the keys :class:`~hal.plugin.OrtBackend` reads (``session_config``,
    ``intra_op_num_threads``).
    """

    name = "sim"

    def __init__(self) -> None:
        self._states: dict[str, DeviceState] = {}
        self._states_lock = threading.Lock()

    @property
    def version(self) -> str:
        # The plugin's version is part of it: emulation and the profiles change what is compiled.
        return f"{super().version}+hal-sim.{__version__}"

    # -- discovery -------------------------------------------------------------------------------

    def discover(self) -> list[Device]:
        known = profiles.profile_paths()
        raw = os.environ.get(settings.DEVICES_VARIABLE, "")
        requests = settings.parse_devices(raw)
        if not requests:
            # The rule for a backend that sees no device (hal.plugin): list the one a user would
            # name first, unavailable, with what to do. A simulator "sees" what HAL_SIM_DEVICES
            # chooses; with nothing chosen, to("sim:h100:0") then says how to choose it instead of
            # "unknown device", and no other simulated device is invented.
            reason = (
                f"no simulated devices chosen: set {settings.DEVICES_VARIABLE}, e.g. "
                f"{settings.DEVICES_VARIABLE}={DEFAULT_PROFILE},ascend-910c:2 (profiles: {', '.join(sorted(known))})"
            )
            return [
                self.unavailable(
                    reason, vendor="hal-sim", kind=DeviceKind.SIMULATED, name="no simulated device chosen",
                    local_id=f"{DEFAULT_PROFILE}:0",
                )
            ]
        problem = None
        try:
            faults = settings.parse_faults(os.environ.get(settings.FAULTS_VARIABLE, ""))
            seed = settings.read_seed()
            pace = settings.read_pace()
        except settings.SimSettingError as exc:
            # Running without the faults or pacing asked for would test the wrong thing: every
            # device says why it cannot run instead.
            log.warning("%s", exc)
            problem, faults, seed, pace = str(exc), {}, 0, False
        devices = []
        for request in requests:
            devices.extend(self._devices(request, known, faults, seed, pace, problem))
        return devices

    def _devices(
        self,
        request: settings.DeviceRequest,
        known: dict[str, tuple[Any, Any]],
        faults: dict[str, dict[str, float | int]],
        seed: int,
        pace: bool,
        problem: str | None,
    ) -> list[Device]:
        ids = [f"{self.name}:{request.profile}:{n}" for n in range(request.count)]

        def unavailable(reason: str) -> list[Device]:
            return [
                Device(
                    id=i, backend=self.name, vendor="hal-sim", name=f"simulated {request.profile}",
                    kind=DeviceKind.SIMULATED, available=False, reason=reason,
                )
                for i in ids
            ]

        if request.problem or problem:
            return unavailable(request.problem or problem or "")
        if request.profile not in known:
            return unavailable(
                f"no hal-sim profile named {request.profile!r}; profiles: {', '.join(sorted(known))} "
                f"(add your own as NAME.toml in a directory named by {profiles.PROFILES_VARIABLE})"
            )
        path, replaces = known[request.profile]
        try:
            profile = profiles.load_profile(path, shipped=replaces is None and path.parent == profiles.PROFILE_DIR)
        except profiles.ProfileError as exc:
            log.warning("%s", exc)
            return unavailable(str(exc))
        devices = []
        for device_id in ids:
            try:
                spec = settings.faults_for(faults, profile.name, device_id)
            except settings.SimSettingError as exc:
                devices.extend(d for d in unavailable(str(exc)) if d.id == device_id)
                continue
            caps, notes = capabilities_for(profile, [i for i in ids if i != device_id])
            details: dict[str, Any] = {
                "simulated": SIMULATED,
                "profile": str(path),
                "chip_kind": profile.kind,
                "seed": seed,
                "faults": spec.describe() if spec else "none",
                "pace": "each run takes at least its roofline estimate" if pace else "off (HAL_SIM_PACE=1 paces)",
            }
            if replaces is not None:
                details["profile_overrides"] = f"this user profile replaces the shipped {replaces}"
            if "maturity" in profile.software:
                details["chip_maturity"] = f"{profile.software['maturity'].value} ({profile.software['maturity'].describe()})"
            unverified = profile.unverified()
            if unverified:
                details["unverified"] = ", ".join(unverified)
            if notes:
                details["simulator"] = "; ".join(notes)
            if profile.notes:
                details["notes"] = profile.notes
            devices.append(
                Device(
                    id=device_id,
                    backend=self.name,
                    vendor=profile.vendor,
                    name=f"{profile.model} (simulated)",
                    kind=DeviceKind.SIMULATED,
                    capabilities=caps,
                    details=details,
                    handle=SimHandle(profile, spec, seed, pace),
                )
            )
        return devices

    # -- compiling -------------------------------------------------------------------------------

    def state(self, device: Device) -> DeviceState:
        """The request counter and life of ``device`` in this process (tests read ``requests``)."""
        handle = self.handle_of(device, SimHandle)
        with self._states_lock:
            state = self._states.get(device.id)
            if state is None or state.faults != handle.faults or state.seed != handle.seed:
                state = self._states[device.id] = DeviceState(device.id, handle.faults, handle.seed)
            return state

    def prepare(self, model: LoweredModel, device: Device, options: CompileOptions) -> SimRunner:
        if not device.available:
            msg = f"device {device.id} is unavailable: {device.reason}"
            raise UnavailableDeviceError(msg)
        handle = self.handle_of(device, SimHandle)
        state = self.state(device)
        if state.dead:
            msg = (
                f"device {device.id} died after {handle.faults.die_after if handle.faults else 0} runs "
                "(injected fault die_after in HAL_SIM_FAULTS) and stays dead; choose another device"
            )
            raise UnavailableDeviceError(msg)
        # The core lowered the model for the simulated chip; onnxruntime's CPU kernels may lack
        # what the chip has (FP8 or bfloat16 compute): computed wider here, answers unchanged.
        runnable = emulate(model)
        inner = super().prepare(runnable, device, options)
        return SimRunner(inner, model, device.capabilities, state, pace=handle.pace)
