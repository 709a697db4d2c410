"""Compile once, target any chip.

:func:`compile` turns a model into a portable :class:`CompiledModel`: canonical ONNX after
hardware-independent optimization, plus a manifest (content hashes, requirements, versions).
:meth:`CompiledModel.save` writes it as one ONNX file (the manifest rides in
``metadata_props``), which :func:`load_compiled` reads back on another machine.

:meth:`CompiledModel.to` lowers it for one device, driven by the device's capabilities (opset
conversion, element-type legalization), falls back to another device when the backend cannot
compile it (unless told not to), records every change on the :class:`~hal.Executable`, and
caches lowered models on disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define

from hal._paths import backend_cache_dir
from hal._plugins import registry
from hal.backend import Backend, CompileOptions, Device
from hal.capabilities import Capabilities, Support
from hal.cache import CompileCache, atomic_write, cache_key
from hal.errors import (
    CompileError,
    DeviceError,
    HalError,
    LoweringError,
    ModelError,
    OutputPathError,
    InputError,
    UnavailableDeviceError,
    VerificationError,
    first_line,
)
from hal import isolation
from hal.executable import Executable
from hal.health import quarantine_message, without_health
from hal.lowering import LoweredModel, LoweringStep, Placement, StepKind
from hal.model import Model, load
from hal.ranking import Verdict, assess, rank
from hal.verification import (
    REFERENCE_EVALUATOR,
    DisputedShape,
    Reference,
    ShapeCheckedRunner,
    VerificationReport,
    compare,
    judge,
    positive_inputs,
    seeded_feeds,
    shape_signature,
)

if TYPE_CHECKING:
    from pathlib import Path

    from hal.pool import Pool

    import onnx

__all__ = ["CompiledModel", "Verdict", "assess", "compile", "load_compiled", "rank"]  # the last three re-exported

log = logging.getLogger("hal.compile")

MANIFEST_KEY = "onnx-hal.manifest"
MANIFEST_VERSION = 1


# -- the compiled model ------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import onnx

    from hal import __version__

    return {"onnx-hal": __version__, "onnx": onnx.__version__}


@functools.lru_cache(maxsize=1)
def _lowering_code() -> str:
    """A digest of the lowering passes' source (hal/compiler, hal/fp8.py, hal/model.py's analysis):
    part of every cached lowering's key, so a changed pass never reuses an old lowering, in a
    development checkout as much as after a release."""
    from pathlib import Path

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*(root / "compiler").glob("*.py"), root / "fp8.py", root / "model.py"]):
        try:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        except OSError:  # an installation without sources (zipped): the version alone keys it
            digest.update(path.name.encode())
    return digest.hexdigest()[:16]


def _strip_manifest(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """Remove and return the manifest, so hashes cover the model alone."""
    for i, prop in enumerate(proto.metadata_props):
        if prop.key == MANIFEST_KEY:
            try:
                manifest = json.loads(prop.value)
            except ValueError:
                msg = f"the {MANIFEST_KEY} entry is not JSON; recompile the model with `hal compile`"
                raise ModelError(msg) from None
            del proto.metadata_props[i]
            return manifest if isinstance(manifest, dict) else None
    return None


class CompiledModel:
    """A model optimized once, portable between machines, ready to place on any device."""

    def __init__(self, model: Model, manifest: dict[str, Any]) -> None:
        self.model = model
        self.manifest = manifest
        self._references: dict[Any, Reference] = {}
        self._lowerings: dict[Capabilities, _Lowering | LoweringError] = {}
        self._lock = threading.Lock()

    def _reference(self, device_id: str, lossy: tuple[onnx.ModelProto, str] | None = None) -> Reference:
        """The reference devices are verified against (shared by every device but ort:cpu,
        which must not be its own reference). ``lossy``: a lowering that changed the model's
        values on purpose (FP8 requantized for the device; its error is in its step), given as
        (lowered proto, digest): the device is checked against that model, not the original."""
        own = device_id == "ort:cpu"
        key: Any = own if lossy is None else (own, lossy[1])
        with self._lock:
            reference = self._references.get(key)
            if reference is None:
                proto = self.model.proto if lossy is None else lossy[0]
                reference = Reference(
                    proto,
                    weights=self.model.weights,
                    exclude=device_id if own else "",
                    # Unoptimized: a reference needs no speed, and its external weights are then
                    # used in place (an optimized session copies them in).
                    ort_cpu=(
                        (lambda: self.to("ort:cpu", verify=False, fallback=None, graph_optimization="disabled")) if lossy is None
                        else (lambda: compile(Model(proto, weights=self.model.weights)).to(
                            "ort:cpu", verify=False, fallback=None, graph_optimization="disabled"))
                    ),
                )
                self._references[key] = reference
            return reference

    def __repr__(self) -> str:
        return f"<hal.CompiledModel {self.model.name!r} {self.digest[:12]}>"

    @property
    def digest(self) -> str:
        """sha256 of the optimized model: the key every cache entry starts from."""
        return self.model.digest

    @property
    def steps(self) -> tuple[LoweringStep, ...]:
        """What hardware-independent optimization changed."""
        return tuple(LoweringStep(**s) for s in self.manifest.get("optimizations", ()))

    @property
    def inputs(self):  # type: ignore[no-untyped-def]
        return self.model.inputs

    @property
    def outputs(self):  # type: ignore[no-untyped-def]
        return self.model.outputs

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the compiled model as one ONNX file carrying its manifest; a model with external
        data gets its weights in one file beside it, ``<name>.data`` (64-byte aligned).

        The file appears whole or not at all, with the permissions a new file gets under the
        process's umask. Raises :class:`~hal.errors.OutputPathError` naming the path when it is a
        directory, its directory does not exist, or the file cannot be written there.
        """
        import onnx

        target = _writable_file(path)
        weights = self.model.weights
        try:
            if weights is None:
                proto = onnx.ModelProto()
                proto.CopyFrom(self.model.proto)
            else:
                # The weights go to one file beside the model, streamed from their mappings.
                proto = weights.save_beside(self.model.proto, target, f"{target.name}.data")
            proto.metadata_props.add(key=MANIFEST_KEY, value=json.dumps(self.manifest, sort_keys=True))
            atomic_write(target, proto.SerializeToString())
            # atomic_write's temporary file is private (0600); a saved model is not.
            os.chmod(target, 0o666 & ~_umask())
        except OSError as exc:
            msg = f"cannot write the compiled model to {target}: {exc.strerror or exc}; choose another path"
            raise OutputPathError(msg) from None

    def verify(
        self,
        devices: Sequence[str] | None = None,
        *,
        example: Mapping[str, Any] | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        reduced_precision: bool = False,
    ) -> list[VerificationReport]:
        """Check each device (default: every available one) against the reference, fresh (no
        cached verdict): one :class:`~hal.verification.VerificationReport` per device, with every
        output's max absolute and relative error. ``rtol``/``atol`` replace the per-type
        tolerances; ``example`` gives real inputs instead of seeded ones. A device that cannot
        place the model gets status ``error``. ``hal verify`` prints this.
        """
        reg = registry()
        targets = list(devices) if devices else [d.id for d in reg.devices() if d.available]
        feeds = seeded_feeds(self.model.inputs, example=example, positive=positive_inputs(self.model.proto))
        key = _feeds_digest(feeds)
        reports = []
        for device_id in targets:
            reg.device(device_id, require_available=False)  # an unknown id is the caller's mistake
            try:
                exe = self.to(device_id, strict=True, verify=False, reduced_precision=reduced_precision)
            except HalError as exc:
                reports.append(VerificationReport(device_id, "error", detail=f"cannot place the model: {exc}"))
                continue
            reports.append(judge(
                device_id, exe.run, feeds, self._reference(device_id), self.model.outputs, key=key,
                real_inputs=example is not None, reduced_precision=reduced_precision, rtol=rtol, atol=atol,
            ))
        return reports

    def explain(self, device: str | Device) -> Verdict:
        """Whether ``device`` runs this model as is, after lowering, or cannot (and why)."""
        target = device if isinstance(device, Device) else registry().device(device, require_available=False)
        return assess(self.model, target, self._steps_for)

    def to(
        self,
        device: str | Device | Sequence[str | Device] = "auto",
        *,
        fallback: str | None = "auto",
        strict: bool = False,
        reduced_precision: bool = False,
        verify: bool | str = True,
        example: Mapping[str, Any] | None = None,
        policy: str | None = None,
        precision: str = "exact",
        rtol: float | None = None,
        deadline_s: float | None = None,
        isolate: bool | Sequence[str] = False,
        breaker: Any = None,
        **extra: Any,
    ) -> Executable | Pool:
        """Lower the model for ``device`` and prepare it there.

        ``device``: an id such as ``"ort:cpu"``, a :class:`Device`, ``"auto"`` (the best
        available device, see :func:`rank`), or a list of ids: a :class:`~hal.Pool` with failover
        over every listed device that takes the model (:mod:`hal.pool`; ``deadline_s`` bounds a
        request, ``breaker`` is a :class:`hal.pool.BreakerSettings`).

        ``isolate=True`` runs the device in a worker process that a crash or a hang past
        ``deadline_s`` kills and restarts (:mod:`hal.isolation`); in a pool, ``True`` or the ids
        of the devices to isolate.

        ``fallback``: when the chosen device's backend cannot compile the model, ``"auto"``
        tries the next best available device, a device id tries that one, ``None`` raises.
        Any fallback logs a WARNING and is recorded in ``Executable.lowering``.

        ``strict``: forbid fallback (like ``fallback=None``); the error names the operators the
        backend refused where it says so. Devices of a list given as ``device`` are still tried
        in order: that is the caller's own choice, not a fallback.

        ``reduced_precision``: let backends compute in narrower types than declared (e.g.
        OpenVINO's bf16 on AMX CPUs); off by default. Other keyword arguments go to the backend
        as ``CompileOptions.extra``.

        ``verify``: ``True`` (default) runs the lowered model once on the device and on a
        reference (the ONNX reference evaluator, or ``ort:cpu``; see :mod:`hal.verification`) with
        seeded inputs and compares every output; a device that disagrees raises
        :class:`~hal.errors.VerificationError`, or is skipped (WARNING, a ``fallback`` step) when
        ``auto``, a list or a fallback offers another. The verdict is cached with the lowered
        model, so a warm ``to()`` does not verify again. ``"each-shape"`` also checks the first
        run of every new input-shape signature (for models with dynamic dimensions): under
        ``auto`` or a fallback, a shape the device answers wrong or cannot run moves, alone, to
        the next device that answers it right (WARNING, a ``fallback`` step); otherwise the
        :class:`~hal.errors.VerificationError` is raised. ``False`` skips verification.
        ``example``: real inputs to verify with (by input name), instead of
        seeded ones; dynamic dimensions then take the example's sizes.

        ``policy``: with ``"auto"``, ``"fastest"`` (measured on this model and remembered),
        ``"stable"`` (measured health first), ``"native-fp8"`` (FP8 kept as written first), or a
        policy a plugin registered (``hal plugins`` lists them) instead of the default order;
        see :mod:`hal.selection` and :func:`rank`.

        ``precision="relaxed"``: use a device's reduced-precision variant only where its outputs
        match the reference within ``rtol`` (default: the per-type reduced-precision tolerance),
        else its exact variant (:mod:`hal.selection`).
        """
        from hal import selection

        if verify not in (True, False, "each-shape"):
            msg = f"verify={verify!r} is not one of True, False, 'each-shape'"
            raise InputError(msg)
        if isinstance(device, (list, tuple)) or deadline_s is not None or isolate or breaker is not None:
            from hal import pool

            if isinstance(device, (list, tuple)):
                _check_target(device)
                return pool.pool_for(self, device, fallback=fallback, strict=strict, policy=policy, deadline_s=deadline_s,
                                     isolate=isolate, breaker=breaker, reduced_precision=reduced_precision,
                                     verify=verify, example=example, precision=precision, rtol=rtol, **extra)
            extra = pool.isolation_options(device, deadline_s, isolate, breaker, extra)
        selection.check_precision(precision, rtol)
        reg = registry()
        options = CompileOptions(reduced_precision=reduced_precision, extra=extra)
        candidates = self._candidates(device, policy)
        prepared: dict[str, Executable] = {}
        notes: dict[str, LoweringStep] = {}
        if policy == "fastest" and isinstance(device, str) and device == "auto":
            candidates, prepared, notes = selection.fastest(self, candidates, options, verify, example, precision, rtol)
        explicit = not (isinstance(device, str) and device == "auto")

        def finish(exe: Executable) -> Executable:
            if verify == "each-shape" and isinstance(exe.runner, ShapeCheckedRunner) and (not explicit or not (strict or fallback is None)):
                # A later shape the device answers wrong (or cannot run) moves to the next device.
                others = (
                    (lambda: [d for d, _ in rank(self.model, registry().devices(), policy, self._steps_for)]) if not explicit
                    else (lambda: self._fallbacks(fallback, set()))
                )

                def place(other: Device) -> Executable:
                    return self.to(other.id, fallback=None, strict=True, reduced_precision=reduced_precision,
                                   verify="each-shape", example=example, precision=precision, rtol=rtol, **extra)

                # Under auto, a dispute at a new shape is settled as at placement (below).
                exe.runner.disputes_raise = not explicit
                exe._use(_ShapeFailover(exe, others, place))  # noqa: SLF001 - the core's own wrapping
            return exe

        failures: list[tuple[Device, HalError]] = []
        tried: set[str] = set()
        reserve: tuple[Executable, int] | None = None  # auto's disputed first choice, and its failures
        seconded = False  # another device agreed with the disputed one
        while candidates:
            target = candidates.pop(0)
            if target.id in tried:
                continue
            tried.add(target.id)
            try:
                exe = prepared.pop(target.id, None)
                if exe is None:
                    exe = selection.prepare(self, reg.backend(target.backend), target, options, verify, example, precision, rtol)
                report = exe.verification
                if reserve is not None and not (report is not None and report.passed and report.reference == REFERENCE_EVALUATOR):
                    if report is not None and report.passed:  # it agrees with ort:cpu, not the evaluator
                        seconded = True
                        break  # two runtimes against the evaluator: the first choice stands
                    raise CompileError(f"{target.id} is not verified either ({'off' if report is None else report.summary()})")
                if not explicit and report is not None and report.disputed and reserve is None:
                    # The evaluator (which defines the operators) disputes this device's answer: a
                    # device that agrees with the evaluator is used instead; one that agrees with
                    # this device settles it for this one (the evaluator has bugs of its own:
                    # LpNormalization p=1 in onnx 1.23); with neither, auto refuses.
                    reserve = (exe, len(failures))
                    raise CompileError(f"{target.id}'s answer is disputed: {report.detail}")
            except (CompileError, UnavailableDeviceError) as exc:
                failures.append((target, exc))
                if candidates:  # the caller's own list (or auto's ranking) goes on
                    continue
                if reserve is not None:
                    break
                if strict or fallback is None:
                    first, first_exc = failures[0]
                    if isinstance(first_exc, VerificationError) and len(failures) == 1:
                        raise first_exc
                    raise _no_fallback(first, first_exc, strict) from exc
                if explicit:
                    candidates = self._fallbacks(fallback, tried)
                continue
            return finish(self._with_fallbacks(exe, failures, notes))
        if reserve is not None:
            exe, before = reserve
            if seconded:  # another runtime answers as it does: the evaluator is outvoted
                return finish(self._with_fallbacks(exe, failures[:before], notes))
            # Nobody settles it. The evaluator defines the operators, and where the two differ on
            # the node test cases it is right about ten times in eleven: auto refuses, and says how
            # to take the device anyway.
            disputed, why = failures[before]
            others = "; ".join(f"{d.id}: {e}" for d, e in failures[before + 1:])
            raise _unsettled(
                str(why), others, disputed.id, exe.verification,
                or_else="or pass example= with the inputs the model is meant for",
            )
        reasons = "; ".join(f"{d.id}: {e}" for d, e in failures) or self._why_none_ranked()
        msg = f"no device could compile {self.model.name!r}: {reasons}"
        raise CompileError(msg)

    def _with_fallbacks(self, exe: Executable, failures: list[tuple[Device, HalError]], notes: dict[str, LoweringStep]) -> Executable:
        """``exe`` with a ``fallback`` step (and a WARNING) per device tried before it."""
        if failures:
            first, reason = failures[0]
            moved = f"all {len(self.model.proto.graph.node)} nodes moved from {first.id} to {exe.device.id}"
            log.warning("fallback: %s: %s", moved, reason)
            skipped = [LoweringStep(StepKind.FALLBACK, f"{moved}: {reason}")]
            for other, other_reason in failures[1:]:
                log.warning("fallback: %s skipped too: %s", other.id, other_reason)
                skipped.append(LoweringStep(StepKind.FALLBACK, f"{other.id} skipped: {other_reason}"))
            exe.lowering = (*skipped, *exe.lowering)
        if exe.device.id in notes:
            exe.lowering = (*exe.lowering, notes[exe.device.id])
        return exe

    def _why_none_ranked(self) -> str:
        """Each available device's reason for not running the model, when ``auto`` ranked none."""
        verdicts = [assess(self.model, d, self._steps_for) for d in registry().devices() if d.available]
        return "; ".join(f"{v.device}: {v.reason}" for v in verdicts if v.reason) or "no available device can run it"

    # -- internals ---------------------------------------------------------------------------

    def _candidates(self, device: str | Device | Sequence[str | Device], policy: str | None = None) -> list[Device]:
        _check_target(device)
        reg = registry()
        if policy is not None and not (isinstance(device, str) and device == "auto"):
            msg = f"policy={policy!r} ranks devices for to('auto'); a device or a list is tried as given"
            raise InputError(msg)
        if isinstance(device, (str, Device)) and device != "auto":
            named = reg.device(device.id if isinstance(device, Device) else device)
            if named.capabilities.stability.health.quarantined:  # asked for by name: no quiet fallback
                raise UnavailableDeviceError(quarantine_message(named))
            return [named]
        if isinstance(device, str):
            return [d for d, _ in rank(self.model, reg.devices(), policy, self._steps_for)]
        return [reg.device(d.id if isinstance(d, Device) else d) for d in device]

    def _fallbacks(self, fallback: str | None, tried: set[str]) -> list[Device]:
        if fallback is None:
            return []
        if fallback == "auto":
            return [d for d, _ in rank(self.model, registry().devices(), lower=self._steps_for) if d.id not in tried]
        return [registry().device(fallback)]

    def _prepare(
        self,
        backend: Backend,
        device: Device,
        options: CompileOptions,
        verify: bool | str = False,
        example: Mapping[str, Any] | None = None,
    ) -> Executable:
        if device.capabilities.stability.health.quarantined:
            msg = quarantine_message(device)
            raise UnavailableDeviceError(msg)
        _version_of(backend)  # a plugin whose version fails cannot key its caches: refuse it now
        proto, steps, digest, key = self._lowered(device, options.reduced_precision)
        check = None
        if verify:
            lossy = (proto, digest) if any(step.kind is StepKind.REQUANTIZE for step in steps) else None
            check = _Verification(self, backend, device, key, options.reduced_precision, example, lossy)
            if check.cached is not None and not check.cached.passed and check.cached.status == "failed":
                raise check.refusal(check.cached)
            check.start()
        options = CompileOptions(
            reduced_precision=options.reduced_precision,
            cache_dir=str(backend_cache_dir(backend.name)),
            extra=options.extra,
        )
        # Lowering converts opsets and legalizes inside the graph, never the declared inputs and
        # outputs, so the model's own records describe the lowered proto too.
        lowered = LoweredModel(proto, self.model.inputs, self.model.outputs, digest, steps, self.model.weights)
        try:
            runner = isolation.prepare(backend, lowered, device, options)
        except HalError:
            raise
        except Exception as exc:  # a plugin's bug must still reach the caller as a HalError
            msg = f"backend {backend.name} failed to compile for {device.id}: {type(exc).__name__}: {exc}"
            raise CompileError(msg) from exc
        if not callable(getattr(runner, "run", None)):
            msg = f"backend {backend.name} returned {type(runner).__name__} from prepare(), not a runner with run(feeds, output_names)"
            raise CompileError(msg)
        nodes = tuple(n.name or f"{n.op_type}#{i}" for i, n in enumerate(proto.graph.node))
        exe = Executable(
            runner, device, self.model.inputs, self.model.outputs,
            placement=(Placement(device.id, nodes),), lowering=tuple(steps), model=lowered,
        )
        if check is not None:
            report = check.finish(exe)
            kind = StepKind.UNVERIFIED if report.status == "skipped" else StepKind.VERIFIED
            exe.lowering = (*exe.lowering, LoweringStep(kind, report.summary()))
            exe.verification = report
            if verify == "each-shape":  # from here on: placement's own run above is not checked twice
                checked = ShapeCheckedRunner(
                    runner, check.reference, self.model.outputs, device.id,
                    # Seeded values prove little about real ones: the first real run of the placement's
                    # shape is checked too (one reference run); an example's shape is checked already.
                    reduced_precision=options.reduced_precision, seen={check.signature} if check.example else set(),
                )
                exe._use(checked)  # noqa: SLF001 - the core's own wrapping
        return exe

    def _steps_for(self, device: Device) -> tuple[LoweringStep, ...]:
        """The steps lowering takes for ``device`` (for verdicts and ranking); raises
        :class:`LoweringError` when it cannot."""
        return self._lowering(device).steps

    def _lowering(self, device: Device, reduced_precision: bool = False) -> _Lowering:
        """The one lowering of this model for ``device``'s capabilities: computed once per
        process (shared by assess, rank, fallback and prepare), kept in the compile cache between
        processes. Lowering depends on the model and the capabilities alone, not on the backend.
        Raises :class:`LoweringError` when the device cannot run the model (cached too).
        ``reduced_precision``: the caller allows lowering that changes values for speed (FP8
        requantized to the device's native scale format); ranking asks without it."""
        caps = without_health(device.capabilities)  # health changes nothing lowering does
        with self._lock:
            found = self._lowerings.get((caps, reduced_precision))
        if found is None:
            found = self._lowering_from_cache(caps, reduced_precision)
            with self._lock:
                self._lowerings[(caps, reduced_precision)] = found
        if isinstance(found, LoweringError):
            raise LoweringError(str(found), getattr(found, "operators", ()))
        return found

    def _lowering_from_cache(self, caps: Capabilities, reduced_precision: bool = False) -> _Lowering | LoweringError:
        from hal.compiler import lower_for

        key = cache_key(
            layout=6,  # JSON (steps, digest, or the refusal); a changed model's bytes in their own entry
            model=self.digest,
            capabilities=caps.to_dict(),
            hal=_versions(),
            code=_lowering_code(),
            **({"reduced_precision": True} if reduced_precision else {}),
        )
        cache = CompileCache()
        payload = cache.get(key)
        if payload is not None:
            try:
                meta = json.loads(payload)
                if meta.get("error") is not None:
                    return LoweringError(str(meta["error"]), tuple(meta.get("operators", ())))
                steps = tuple(LoweringStep(**s) for s in meta["steps"])
                # Ranking reads this entry only; the lowered model's bytes are read by prepare.
                return _Lowering(
                    steps, str(meta["digest"]), key, changed=not meta["unchanged"], caps=caps,
                    reduced_precision=reduced_precision,
                )
            except Exception:  # noqa: BLE001 - an entry from an incompatible version: rebuild it
                log.warning("compile cache entry %s unusable; rebuilding", key[:12])
        try:
            proto, steps = lower_for(self.model.proto, caps, reduced_precision=reduced_precision)
        except LoweringError as exc:
            cache.put(key, json.dumps({"error": str(exc), "operators": list(getattr(exc, "operators", ()))}).encode())
            return exc
        if proto is self.model.proto:
            digest = self.digest
        else:
            data = proto.SerializeToString(deterministic=True)
            weights = self.model.weights
            # With external data, the digest covers the bytes, not where they sit (hal.weights).
            digest = hashlib.sha256(data if weights is None else weights.normalized(proto)).hexdigest()
            cache.put(_model_key(key), data)
        changed = proto is not self.model.proto
        cache.put(key, json.dumps({"steps": [s.to_dict() for s in steps], "unchanged": not changed, "digest": digest}).encode())
        lowered = _Lowering(tuple(steps), digest, key, changed=changed, caps=caps, reduced_precision=reduced_precision)
        if changed:
            lowered.parsed = proto  # already in memory: no need to parse the bytes back
        return lowered

    def _lowered(self, device: Device, reduced_precision: bool = False) -> tuple[onnx.ModelProto, list[LoweringStep], str, str]:
        """The lowered model for ``device``, its steps, its digest and its cache key. A lowering
        that changed nothing answers with this model itself, so a warm ``to()`` neither reads nor
        parses a copy of the model; a changed one is read from its own cache entry here, for the
        device chosen, never for the devices ranking only looked at."""
        import onnx

        lowering = self._lowering(device, reduced_precision)
        if not lowering.changed:
            return self.model.proto, list(lowering.steps), self.digest, lowering.key
        if lowering.parsed is None:
            data = CompileCache().get(_model_key(lowering.key))
            if data is None:  # evicted or damaged (removed with a WARNING): lower again
                from hal.compiler import lower_for

                proto, _ = lower_for(self.model.proto, lowering.caps, reduced_precision=lowering.reduced_precision)
                CompileCache().put(_model_key(lowering.key), proto.SerializeToString(deterministic=True))
                lowering.parsed = proto
            else:
                lowering.parsed = onnx.ModelProto.FromString(data)
        return lowering.parsed, list(lowering.steps), lowering.digest, lowering.key


def _model_key(lowering_key: str) -> str:
    """The cache key of a lowered model's bytes, beside its lowering's entry."""
    return cache_key(lowered_model=lowering_key)


@define
class _Lowering:
    """One cached lowering: steps, digest, cache key, whether it changed the model, and the
    lowered model, read and parsed on first use by ``prepare``, never by ranking."""

    steps: tuple[LoweringStep, ...]
    digest: str
    key: str
    changed: bool
    caps: Any = None  # the capabilities it was lowered for (to lower again if its bytes are lost)
    parsed: Any = None
    reduced_precision: bool = False


#: Bump when what a cached verdict means changes (tolerances, seeded inputs, comparison).
_VERIFY_FORMAT = 2  # 2: inputs cast to e8m0 drawn positive, e8m0 compared exactly


class _Verification:
    """One device's verification inside ``to()``: the cached verdict, or the reference computed
    on a thread while the backend compiles, then the device's own run compared with it."""

    def __init__(
        self,
        compiled: CompiledModel,
        backend: Backend,
        device: Device,
        lowering_key: str,
        reduced_precision: bool,
        example: Mapping[str, Any] | None,
        lossy: tuple[onnx.ModelProto, str] | None = None,
    ) -> None:
        from hal.verification import budget_seconds

        self.device = device
        self.outputs = compiled.model.outputs
        self.reduced_precision = reduced_precision
        self.example = example is not None
        self._inputs = compiled.model.inputs
        self._proto = compiled.model.proto
        self._example = example
        # Seeded inputs are only drawn when the verdict is not cached: a warm to() skips them.
        self._feeds: dict[str, Any] | None = None
        self.key_of_feeds = _feeds_digest(self.feeds) if example is not None else "seeded"
        self.reference = compiled._reference(device.id, lossy)  # noqa: SLF001 - the model's own helper
        self.key = cache_key(
            lowering=lowering_key,
            device=device.id,  # the verdict is the runtime's: its device, backend and version
            backend=backend.name,
            backend_version=_version_of(backend),
            verify=_VERIFY_FORMAT,
            feeds=self.key_of_feeds,
            reduced_precision=reduced_precision,
            budget=budget_seconds(),
        )
        self.cached = _cached_report(self.key)
        self._thread: threading.Thread | None = None
        self._expected: tuple[dict[str, Any], str] | None = None
        self._problem: HalError | None = None

    @property
    def feeds(self) -> dict[str, Any]:
        if self._feeds is None:
            self._feeds = seeded_feeds(self._inputs, example=self._example, positive=positive_inputs(self._proto))
        return self._feeds

    @property
    def signature(self) -> tuple[tuple[str, Any], ...]:
        return shape_signature(self.feeds)

    def start(self) -> None:
        """Compute the reference's outputs on a thread (it overlaps the backend's compile)."""
        if self.cached is not None:
            return
        self._thread = threading.Thread(target=self._reference_run, name="hal-verify-reference", daemon=True)
        self._thread.start()

    def _reference_run(self) -> None:
        try:
            self._expected = self.reference.run(self.feeds, key=self.key_of_feeds)
        except HalError as exc:
            self._problem = exc
        except Exception as exc:  # noqa: BLE001 - a reference's own bug leaves the device unverified, said so
            self._problem = HalError(f"the reference failed: {type(exc).__name__}: {exc}")

    def finish(self, exe: Executable) -> VerificationReport:
        """The verdict for ``exe``; raises :class:`VerificationError` when the device disagrees."""
        if self.cached is not None:
            return self.cached
        assert self._thread is not None
        self._thread.join()
        report = judge(
            self.device.id, exe.run, self.feeds, self.reference, self.outputs,
            expected=self._problem or self._expected, real_inputs=self.example,
            reduced_precision=self.reduced_precision,
        )
        if report.status == "skipped":
            # INFO, not WARNING, when nothing looks wrong; the step on the executable says it.
            log.log(logging.WARNING if report.checks else logging.INFO, "%s: %s", self.device.id, report.summary())
        _verdicts().put(self.key, json.dumps(report.to_dict()).encode())
        if report.status == "failed":
            raise self.refusal(report)
        return report

    def refusal(self, report: VerificationReport) -> VerificationError:
        """The :class:`VerificationError` for a failed ``report``, with why where the device
        declares an output's format storage-only (cold and warm alike)."""
        error = report.error()
        hint = self._narrower_hint(report)
        if hint:
            error.args = (f"{error} ({hint})",)
        return error

    def _narrower_hint(self, report: VerificationReport) -> str | None:
        """Why a float output may be off: the device only stores its format (no wider one to
        compute it in), so the runtime computes it narrower; ``reduced_precision=True`` accepts that."""
        if self.reduced_precision:
            return None
        formats = {o.name: o.format for o in self.outputs}
        caps = self.device.capabilities
        narrow = sorted({
            formats[c.name].value for c in report.checks
            if not c.passed and c.name in formats and formats[c.name].is_float
            and not caps.support(formats[c.name]).at_least(Support.EMULATED)
        })
        if not narrow:
            return None
        return (
            f"{self.device.id} declares {', '.join(narrow)} storage-only: it computes in a narrower "
            "format; pass reduced_precision=True to accept that precision, or place the model on a "
            f"device that computes {', '.join(narrow)}"
        )


class _ShapeFailover:
    """``to("auto" or with a fallback, verify="each-shape")``: the first run of a new input-shape
    signature that the chosen device answers wrong (its :class:`ShapeCheckedRunner` raised a
    :class:`VerificationError`) or cannot run moves that signature, and only it, to the next
    device that answers it right, with a WARNING and a ``fallback`` step on the executable.
    Shapes the device answers right stay on it; when no other device does, the first error is
    raised. Devices are placed lazily, on the first shape that needs one, and kept."""

    def __init__(self, exe: Executable, others: Any, place: Any) -> None:
        self.checked: ShapeCheckedRunner = exe.runner  # type: ignore[assignment]
        self._exe = exe
        self._others = others  # () -> devices in the order to try them
        self._place = place  # device -> Executable (verify="each-shape", no failover of its own)
        self._placed: dict[str, Executable | HalError] = {}
        self._routes: dict[Any, Any] = {}  # shape signature -> the runner that answers it
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # close(), abandon(), ... of the device's own runner
        if name == "checked":  # not set yet (a copy being built): no recursion through here
            raise AttributeError(name)
        return getattr(self.checked, name)

    def run(self, feeds: dict[str, Any], output_names: Sequence[str]) -> list[Any]:
        if self._routes:
            routed = self._routes.get(shape_signature(feeds))
            if routed is not None:
                return routed.run(feeds, output_names)
        try:
            return self.checked.run(feeds, output_names)
        except DisputedShape as exc:
            return self._settle(feeds, output_names, exc)
        except VerificationError as exc:
            error: Exception = exc
        except Exception as exc:
            if self.checked.checked(shape_signature(feeds)):  # a shape it ran before: not a shape problem
                raise
            error = exc
        return self._fail_over(feeds, output_names, error)

    def _other_runners(self, tried: list[str]) -> Iterator[tuple[Device, Any]]:
        """Each other device's runner, in order, placed on first use (under ``self._lock``);
        a device that cannot be placed is noted in ``tried`` and skipped."""
        first = self._exe.device.id
        for device in self._others():
            if device.id == first:
                continue
            placed = self._placed.get(device.id)
            if placed is None:
                try:
                    placed = self._place(device)
                except HalError as exc:
                    placed = exc
                self._placed[device.id] = placed
            if isinstance(placed, HalError):
                tried.append(f"{device.id}: {placed}")
                continue
            yield device, placed.runner

    def _route(self, signature: Any, device: Device, runner: Any, why: str) -> None:
        moved = f"inputs of shape {dict(signature)} moved from {self._exe.device.id} to {device.id}: {why}"
        log.warning("fallback: %s", moved)
        self._exe.lowering = (*self._exe.lowering, LoweringStep(StepKind.FALLBACK, moved))
        self._routes[signature] = runner

    def _fail_over(self, feeds: dict[str, Any], output_names: Sequence[str], error: Exception) -> list[Any]:
        signature = shape_signature(feeds)
        with self._lock:  # one failover at a time: placing a device is slow and done once
            routed = self._routes.get(signature)
            if routed is not None:
                return routed.run(feeds, output_names)
            tried: list[str] = []
            for device, runner in self._other_runners(tried):
                try:
                    results = runner.run(feeds, output_names)
                except Exception as exc:  # noqa: BLE001 - wrong or failed there too: the next one
                    tried.append(f"{device.id}: {first_line(exc)}")
                    continue
                self._route(signature, device, runner, first_line(error))
                return results
        if tried:
            log.warning("%s: no other device answers inputs of shape %s: %s", self._exe.device.id, dict(signature), "; ".join(tried))
        raise error

    def _settle(self, feeds: dict[str, Any], output_names: Sequence[str], dispute: DisputedShape) -> list[Any]:
        """A new shape's answer the evaluator disputes, settled as at placement: the first other
        device that agrees with the evaluator takes the shape; one that agrees with the device
        keeps it there; with neither, the run is refused (:class:`VerificationError`)."""
        signature = shape_signature(feeds)
        first = self._exe.device.id
        checked = self.checked
        infos = [checked.outputs[n] for n in output_names]
        mine = dict(zip(output_names, dispute.results))

        def agree(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
            return all(c.passed for c in compare(a, b, infos, reduced_precision=checked.reduced_precision))

        with self._lock:
            routed = self._routes.get(signature)
            if routed is not None:
                return routed.run(feeds, output_names)
            try:
                want, _ = checked.reference.run(feeds)
            except HalError:  # the evaluator answered a moment ago; without it there is no dispute
                want = None
            tried: list[str] = []
            for device, runner in self._other_runners(tried):
                try:
                    results = runner.run(feeds, output_names)
                except Exception as exc:  # noqa: BLE001 - no opinion from it: the next one
                    tried.append(f"{device.id}: {first_line(exc)}")
                    continue
                theirs = dict(zip(output_names, results))
                if want is not None and agree(theirs, want):
                    self._route(signature, device, runner, str(dispute))
                    return results
                if agree(theirs, mine):  # two runtimes against the evaluator: the device stands
                    log.warning("%s; %s answers as %s does, so it stands", dispute, device.id, first)
                    checked.mark_checked(signature)
                    return dispute.results
                tried.append(f"{device.id}: agrees with neither")
        raise _unsettled(str(dispute), "; ".join(tried), first, dispute.report)


def _unsettled(dispute: str, others: str, device_id: str, report: Any, *, or_else: str = "") -> VerificationError:
    """auto's refusal of a device's answer that the evaluator disputes and no other device
    settles (at placement, or at a new shape's first run with ``verify="each-shape"``)."""
    msg = (
        f"{dispute}; no other device settles it ({others or 'no other device can run it'}). The ONNX "
        f"reference evaluator defines what each operator means, so auto does not answer from {device_id} "
        f"here: to use it anyway, ask for it by name, to({device_id!r}){', ' + or_else if or_else else ''}"
    )
    error = VerificationError(msg)
    error.report = report
    return error


def _verdicts() -> CompileCache:
    from hal._paths import cache_root

    return CompileCache(cache_root() / "verified")


def _cached_report(key: str) -> VerificationReport | None:
    payload = _verdicts().get(key)
    if payload is None:
        return None
    try:
        return VerificationReport.from_dict(json.loads(payload))
    except Exception:  # noqa: BLE001 - an entry from another version: verify again
        return None


def _feeds_digest(feeds: Mapping[str, Any]) -> str:
    """sha256 of :func:`seeded_feeds`' names, types, shapes and values (a sequence's elements in
    order; an absent optional as such)."""
    import numpy as np

    h = hashlib.sha256()

    def add(label: str, value: Any) -> None:
        array = np.asarray(value)
        h.update(f"{label}:{array.dtype}:{array.shape}:".encode())
        h.update(array.tobytes() if array.dtype != object else repr(array.tolist()).encode())

    for name in sorted(feeds):
        value = feeds[name]
        if value is None:
            h.update(f"{name}:absent:".encode())
        elif isinstance(value, list):  # seeded_feeds gives arrays for tensors, lists for sequences
            h.update(f"{name}:sequence of {len(value)}:".encode())
            for index, item in enumerate(value):
                add(f"{name}[{index}]", item)
        else:
            add(name, value)
    return h.hexdigest()


def _version_of(backend: Backend) -> str:
    """The backend's version, part of cache keys; a plugin whose ``version`` fails or is empty
    cannot be cached safely, so it cannot compile."""
    try:
        version = backend.version
    except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported under its name
        msg = f"backend {backend.name}: reading its version failed ({type(exc).__name__}: {exc}); it is part of every cache key"
        raise CompileError(msg) from exc
    if not isinstance(version, str) or not version.strip():
        msg = f"backend {backend.name}: version must be a non-empty string, got {version!r}; it is part of every cache key"
        raise CompileError(msg)
    return version


def _check_target(device: Any) -> None:
    """Refuse what ``to()`` cannot take as a device: anything but an id, a Device or a non-empty
    list of them."""
    if isinstance(device, (str, Device)):
        return
    items = device if isinstance(device, (list, tuple)) else None
    if items and all(isinstance(d, (str, Device)) for d in items):
        return
    if items is None:
        got = "None" if device is None else f"{type(device).__name__} {device!r}"
    elif not items:
        got = "an empty list"
    else:
        odd = sorted({type(d).__name__ for d in items if not isinstance(d, (str, Device))})
        got = f"a list holding {', '.join(odd)}"
    msg = (
        f"to() takes a device id such as 'ort:cpu', 'auto', a hal.Device or a non-empty list of them "
        f"(tried in order), not {got}; hal.devices() lists the ids"
    )
    raise DeviceError(msg)


def _writable_file(path: Any) -> Path:
    """``path`` as a Path, or an OutputPathError naming it when no file can be written there."""
    from pathlib import Path

    try:
        target = Path(path)
    except TypeError:
        msg = f"cannot save to {path!r}: pass a file path (str or os.PathLike)"
        raise OutputPathError(msg) from None
    if "\0" in str(target):
        msg = f"cannot save to {str(target)!r}: the path contains a NUL byte"
        raise OutputPathError(msg)
    if target.is_dir():
        msg = f"cannot save to {target}: it is a directory; name a file in it, e.g. {target / 'model.halc.onnx'}"
        raise OutputPathError(msg)
    parent = target.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        msg = f"cannot save to {target}: its directory {parent} {what}; create it first or choose another path"
        raise OutputPathError(msg)
    return target


def _umask() -> int:
    # Nothing reads the umask without setting it; this is the usual pair (pip does the same).
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _no_fallback(device: Device, exc: HalError, strict: bool) -> HalError:
    operators = getattr(exc, "operators", ())
    named = f" (operators: {', '.join(operators)})" if operators else ""
    why = "strict=True" if strict else "fallback=None"
    msg = f"{device.id} cannot run the model{named} and {why} forbids moving it elsewhere: {exc}"
    error = LoweringError(msg)
    error.operators = tuple(operators)  # type: ignore[attr-defined]
    return error


def compile(model: str | os.PathLike[str] | bytes | onnx.ModelProto | Model) -> CompiledModel:
    """Compile a model once: load it safely, optimize it hardware-independently, describe it.

    A file written by :meth:`CompiledModel.save` is not optimized again.
    """
    from hal.compiler import optimize

    loaded = load(model)
    proto = loaded.proto
    manifest = _strip_manifest(proto) if any(p.key == MANIFEST_KEY for p in proto.metadata_props) else None
    if manifest is not None:
        return _from_manifest(Model(proto, path=loaded.path, weights=loaded.weights), manifest)
    source = Model(proto, path=loaded.path, weights=loaded.weights).digest
    optimized, steps = optimize(proto)
    result = Model(optimized, path=loaded.path, weights=loaded.weights)
    manifest = {
        "format": MANIFEST_VERSION,
        "source_digest": source,
        "digest": result.digest,
        "requirements": result.requirements.to_dict(),
        "versions": _versions(),
        "optimizations": [s.to_dict() for s in steps],
    }
    return CompiledModel(result, manifest)


def _from_manifest(model: Model, manifest: dict[str, Any]) -> CompiledModel:
    if manifest.get("format") != MANIFEST_VERSION:
        msg = f"compiled model format {manifest.get('format')!r} is not {MANIFEST_VERSION}; recompile it with this version"
        raise ModelError(msg)
    if manifest.get("digest") != model.digest:
        msg = "the compiled model's content does not match its manifest hash (modified or damaged); recompile it"
        raise ModelError(msg)
    return CompiledModel(model, manifest)


def load_compiled(path: str | os.PathLike[str] | Path) -> CompiledModel:
    """Read a file written by :meth:`CompiledModel.save` (or ``hal compile``)."""
    loaded = load(path)
    manifest = _strip_manifest(loaded.proto)
    if manifest is None:
        msg = f"{path} is an ONNX model but not a compiled one; use hal.compile() on it, or `hal compile` to write one"
        raise ModelError(msg)
    return _from_manifest(Model(loaded.proto, path=loaded.path, weights=loaded.weights), manifest)
