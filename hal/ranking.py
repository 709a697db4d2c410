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
from hal.lowering import LoweringStep, StepKind

if TYPE_CHECKING:
    from hal.backend import Device
    from hal.model import Model

__all__ = ["BUILTIN_POLICIES", "Verdict", "assess", "fp8_as_written", "health_key", "rank"]

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
        from hal.health import quarantine_message

        return Verdict(device.id, "cannot", reason=quarantine_message(device))
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

    ``policy``: a built-in one (:data:`BUILTIN_POLICIES`) or one a plugin registered
    (``hal_register_policies``), which is given the default order and returns the devices to
    try, in its order. ``fastest`` measures (:mod:`hal.selection`, in ``to()``); here it leaves
    the default order.
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


def fp8_as_written(verdict: Verdict) -> bool:
    """Whether lowering keeps the model's FP8 as written for the device: no FP8 weights
    dequantized, converted or requantized (``legalize-scaled``, ``requantize``) and no FP8
    operator computed in a wider format (``legalize-format``)."""
    for step in verdict.steps:
        if step.kind in (StepKind.LEGALIZE_SCALED, StepKind.REQUANTIZE):
            return False
        if step.kind in (StepKind.LEGALIZE_FORMAT, StepKind.LEGALIZE_FORMAT_SKIPPED) and "float8_" in step.detail:
            return False
    return True


def _native_fp8(ordered: list[tuple[Device, Verdict]]) -> list[tuple[Device, Verdict]]:
    return sorted(ordered, key=lambda dv: not fp8_as_written(dv[1]))  # stable: default order within


def health_key(device: Device) -> tuple[int, float, bool, float]:
    """The ``stable`` policy's order: devices a doctor run found with no failure, then devices
    never checked, then those with failures by error rate; then answers that did not vary, then
    lower latency jitter (p90/p50)."""
    health = device.capabilities.stability.health
    if not health.probes:
        group = 1
    else:
        group = 0 if not health.failures else 2
    return (
        group,
        health.error_rate or 0.0,
        health.deterministic is False,
        health.latency_jitter if health.latency_jitter is not None else float("inf"),
    )


def _stable(ordered: list[tuple[Device, Verdict]]) -> list[tuple[Device, Verdict]]:
    return sorted(ordered, key=lambda dv: health_key(dv[0]))  # stable: default order within


#: Built-in policies and what each does; a plugin cannot register these names.
BUILTIN_POLICIES = {
    "fastest": "measured on the model on each candidate within HAL_SELECT_BUDGET_S, remembered (hal.selection)",
    "stable": "measured health first (hal doctor: failures, error rate, determinism, jitter), then the default order",
    "native-fp8": "devices that keep the model's FP8 as written first, then the default order",
}


def _apply_policy(name: str, model: Model, ordered: list[tuple[Device, Verdict]]) -> list[tuple[Device, Verdict]]:
    from hal._plugins import registry

    if name == "fastest":
        return ordered
    if name == "stable":
        return _stable(ordered)
    if name == "native-fp8":
        return _native_fp8(ordered)
    policies = registry().policies()
    policy = policies.get(name)
    if policy is None:
        msg = f"unknown ranking policy {name!r}; built in: {', '.join(BUILTIN_POLICIES)}; registered by plugins: {', '.join(sorted(policies)) or 'none'}"
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
