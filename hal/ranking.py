"""Verdicts and ranking: whether each device can run a model, and in which order ``to("auto")``
tries them.

Neither lowers anything itself: the caller passes ``lower(device)``, which answers the device's
lowering steps (or raises :class:`~hal.errors.LoweringError`) from the one lowering per (model,
device) that :class:`hal.CompiledModel` keeps, so assessing, ranking, falling back and preparing
share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from attrs import frozen

from hal.errors import HalError, InputError, LoweringError, PluginError
from hal.lowering import LoweringStep

if TYPE_CHECKING:
    from hal.backend import Device
    from hal.model import Model

__all__ = ["Verdict", "assess", "rank"]

#: ``lower(device)`` -> the steps lowering takes for it; raises LoweringError when it cannot.
Lower = Callable[["Device"], Sequence[LoweringStep]]


@frozen
class Verdict:
    """Whether a device runs a model: ``as-is``, ``lowered`` (with the steps) or ``cannot`` (why)."""

    device: str
    status: str
    steps: tuple[LoweringStep, ...] = ()
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "status": self.status, "steps": [s.to_dict() for s in self.steps], "reason": self.reason}


def _lower_uncached(model: Model) -> Lower:
    from hal.compiler import lower_for

    return lambda device: lower_for(model.proto, device.capabilities)[1]


def assess(model: Model, device: Device, lower: Lower | None = None) -> Verdict:
    """What lowering ``device`` needs to run ``model``, without compiling anything."""
    if not device.available:
        return Verdict(device.id, "cannot", reason=f"unavailable: {device.reason}")
    if device.capabilities.stability.health.quarantined:
        return Verdict(device.id, "cannot", reason="quarantined after failed health probes")
    try:
        steps = tuple((lower or _lower_uncached(model))(device))
    except LoweringError as exc:
        return Verdict(device.id, "cannot", reason=str(exc))
    return Verdict(device.id, "lowered" if steps else "as-is", steps=steps)


_KIND_ORDER = {"gpu": 0, "npu": 0, "cpu": 1, "simulated": 2}
_MATURITY_ORDER = {"stable": 0, "beta": 1, "experimental": 2, "simulated": 3}


def rank(
    model: Model,
    devices: Sequence[Device],
    policy: str | None = None,
    lower: Lower | None = None,
) -> list[tuple[Device, Verdict]]:
    """Devices that can run ``model``, best first, each with its verdict.

    The default policy: devices that run the model as it is written before those whose lowering
    changes how it computes (element-type legalization); opset and IR-version conversion do not
    count against a device (:attr:`StepKind.keeps_meaning`); then accelerators before CPUs before
    simulated chips; declared maturity; then the embedded ``ort:cpu`` first among equals, as the
    reference implementation. Devices that cannot run the model are left out.

    ``policy`` names a ranking policy a plugin registered (``hal_register_policies``): it is
    given the default order and returns the devices to try, in its order.
    """
    lower = lower or _lower_uncached(model)
    verdicts = [(d, assess(model, d, lower)) for d in devices]
    usable = [(d, v) for d, v in verdicts if v.status != "cannot"]
    ordered = sorted(
        usable,
        key=lambda dv: (
            any(not step.kind.keeps_meaning for step in dv[1].steps),
            _KIND_ORDER.get(dv[0].kind.value, 3),
            _MATURITY_ORDER.get(dv[0].capabilities.stability.maturity.value, 4),
            dv[0].id != "ort:cpu",
            dv[0].id,
        ),
    )
    return ordered if policy is None else _apply_policy(policy, model, ordered)


def _apply_policy(name: str, model: Model, ordered: list[tuple[Device, Verdict]]) -> list[tuple[Device, Verdict]]:
    from hal._plugins import registry

    policies = registry().policies()
    policy = policies.get(name)
    if policy is None:
        msg = f"unknown ranking policy {name!r}; registered: {', '.join(sorted(policies)) or 'none'}"
        raise InputError(msg)
    by_id = {d.id: (d, v) for d, v in ordered}
    try:
        chosen = list(policy.rank(model, [d for d, _ in ordered]))
    except HalError:
        raise
    except Exception as exc:  # a plugin's bug: name the plugin, not a raw traceback
        msg = f"ranking policy {name!r} (plugin {policy.plugin}) failed: {type(exc).__name__}: {exc}"
        raise PluginError(msg) from exc
    ids = [getattr(d, "id", None) for d in chosen]
    unknown = [i for i in ids if i not in by_id]
    if unknown or len(set(ids)) != len(ids):
        msg = f"ranking policy {name!r} (plugin {policy.plugin}) returned devices that were not candidates or twice: {ids}"
        raise PluginError(msg)
    return [by_id[i] for i in ids]
