"""The ``ascend`` backend: Huawei Ascend NPUs through ACL, models run by onnxruntime-cann.

Discovery loads ACL (``libascendcl.so`` from the CANN toolkit) with ctypes and asks it for the
device count and SoC name (``aclInit``, ``aclrtGetDeviceCount``, ``aclrtGetSocName``); without ACL
it falls back to parsing ``npu-smi info`` (the driver's tool), which can list NPUs but not run
anything on them. Capabilities come from :mod:`hal_ascend.chips` by SoC name.

The hazard this backend exists to stop: onnxruntime-cann lists ``CANNExecutionProvider`` whether
or not the CANN toolkit is installed; without it, creating the provider fails
(``libascendcl.so: cannot open shared object file``), onnxruntime prints "Falling back to
['CPUExecutionProvider'] and retrying" and the model runs on the CPU. Here a device is available
only when onnxruntime-cann's provider library really loads; otherwise it is listed unavailable
with the loader's message, and preparing a model for it raises a :class:`~hal.plugin.HalError`.
Sessions are created without the CPU provider, with ``session.disable_cpu_ep_fallback = 1``, and
their providers are checked (the guard is :class:`hal.plugin.OrtBackend`'s).

Without any NPU, driver or toolkit, as every backend does when it can see nothing, it lists the
device a user would name, ``ascend:0``, unavailable, declaring nothing, with the reason; no
further NPU is invented.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from attrs import evolve, frozen

from hal.plugin import CompileOptions, Device, DeviceKind, Memory, OrtBackend, fit_capabilities
from hal_ascend import chips

__all__ = [
    "NO_NPU_ID",
    "AclError",
    "AscendBackend",
    "NpuInfo",
    "parse_npu_smi",
    "provider_library_problem",
    "read_acl",
]

#: Id of the one device listed, unavailable, when no NPU can be seen at all.
NO_NPU_ID = "ascend:0"

_ACL_SUCCESS = 0
_ACL_ERROR_REPEAT_INITIALIZE = 100002

_PROVIDER = "CANNExecutionProvider"

_INSTALL_ADVICE = (
    "install the CANN toolkit (and the Ascend driver) and `source /usr/local/Ascend/ascend-toolkit/set_env.sh` "
    "so that libascendcl.so is on the library path"
)


class AclError(RuntimeError):
    """An ACL call returned an error code."""


@frozen
class NpuInfo:
    """One NPU as ACL or npu-smi describes it."""

    index: int
    soc_name: str
    health: str = ""
    bus_id: str = ""
    hbm_bytes: int | None = None


def _acl_candidates() -> list[str]:
    """Where libascendcl.so may be: the loader path first (set_env.sh puts it there), then the
    toolkit's usual homes."""
    out = ["libascendcl.so"]
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        home = os.environ.get(var)
        if home:
            out.append(os.path.join(home, "lib64", "libascendcl.so"))
    out.append("/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so")
    return out


def load_acl() -> tuple[Any | None, str]:
    """``(library, "")`` or ``(None, why)``; ``why`` is the loader's message for the first try."""
    first_error = ""
    for candidate in _acl_candidates():
        try:
            return ctypes.CDLL(candidate), ""
        except OSError as exc:
            first_error = first_error or str(exc)
    return None, first_error


def read_acl(acl: Any) -> list[NpuInfo]:
    """Ask an ACL library (or a stand-in with the same functions) for its NPUs.

    ACL is initialised and deliberately not finalised: ACL cannot be initialised again in a
    process after ``aclFinalize``, and onnxruntime-cann needs it later in this process.
    """
    acl.aclInit.restype = ctypes.c_int
    acl.aclrtGetDeviceCount.restype = ctypes.c_int
    acl.aclrtGetSocName.restype = ctypes.c_char_p
    ret = acl.aclInit(None)
    if ret not in (_ACL_SUCCESS, _ACL_ERROR_REPEAT_INITIALIZE):
        msg = f"aclInit failed with ACL error {ret}"
        raise AclError(msg)
    count = ctypes.c_uint32(0)
    ret = acl.aclrtGetDeviceCount(ctypes.pointer(count))
    if ret != _ACL_SUCCESS:
        msg = f"aclrtGetDeviceCount failed with ACL error {ret} (is the Ascend driver loaded?)"
        raise AclError(msg)
    raw = acl.aclrtGetSocName()
    soc = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    # One SoC name per machine: ACL reports the SoC of the host's NPUs, which are all alike.
    return [NpuInfo(index=i, soc_name=soc) for i in range(int(count.value))]


_NPU_ROW = re.compile(r"^\|\s*(\d+)\s+(\S+)\s*\|\s*(OK|Warning|Alarm|Critical|\S+)\s*\|")
_CHIP_ROW = re.compile(r"^\|\s*\d+(?:\s+\d+)?\s*\|\s*([0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d)\s*\|(.*)\|")
_USAGE = re.compile(r"(\d+)\s*/\s*(\d+)")


def parse_npu_smi(text: str) -> list[NpuInfo]:
    """NPUs from ``npu-smi info`` output: a name row (``| 0  910B3 | OK | ...``) followed by a
    chip row (``| 0  | 0000:C1:00.0 | ... 3161 / 65536 |``) whose last used/total pair is HBM MB.
    """
    npus: list[NpuInfo] = []
    pending: tuple[str, str] | None = None
    for line in text.splitlines():
        line = line.strip()
        name_row = _NPU_ROW.match(line)
        if name_row and not _CHIP_ROW.match(line):
            name = name_row.group(2)
            soc = name if name.lower().startswith("ascend") else f"Ascend{name}"
            pending = (soc, name_row.group(3))
            continue
        chip_row = _CHIP_ROW.match(line)
        if chip_row and pending is not None:
            usages = _USAGE.findall(chip_row.group(2))
            hbm = int(usages[-1][1]) * 2**20 if usages and int(usages[-1][1]) else None
            npus.append(NpuInfo(len(npus), pending[0], pending[1], chip_row.group(1), hbm))
            pending = None
    return npus


def _run_npu_smi() -> tuple[list[NpuInfo] | None, str]:
    """NPUs from ``npu-smi info``, or None and why not."""
    exe = shutil.which("npu-smi")
    if exe is None:
        return None, "npu-smi not found"
    try:
        done = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"npu-smi info failed: {exc}"
    if done.returncode != 0:
        return None, f"npu-smi info exited {done.returncode}: {done.stderr.strip()[:200]}"
    return parse_npu_smi(done.stdout), ""


def provider_library_problem() -> str | None:
    """Why onnxruntime-cann's CANN provider library cannot load here (None if it loads).

    This is the check onnxruntime skips before falling back to the CPU: loading the library gives
    the loader's message, ``libascendcl.so: cannot open shared object file``.
    """
    return AscendBackend().library_problem(_PROVIDER)


class AscendBackend(OrtBackend):
    """Huawei Ascend NPUs through ACL and onnxruntime-cann. Backend name ``ascend``.

    ``CompileOptions.extra`` keys: ``cann_options`` (a dict passed to CANNExecutionProvider, e.g.
    ``precision_mode``) and the keys :class:`~hal.backends.onnxruntime.OrtBackend` reads.
    """

    name = "ascend"
    distribution = "onnxruntime-cann"
    provider_libraries = {_PROVIDER: "libonnxruntime_providers_cann.so"}
    install_advice = _INSTALL_ADVICE
    cpu_fallback = False

    def __init__(
        self,
        acl_loader: Callable[[], tuple[Any | None, str]] | None = None,
        npu_smi: Callable[[], tuple[list[NpuInfo] | None, str]] | None = None,
    ) -> None:
        # Tests hand in stand-ins; by default ACL is loaded and npu-smi run in discover() only.
        self._acl_loader = acl_loader or load_acl
        self._npu_smi = npu_smi or _run_npu_smi

    def _placeholder(self, reason: str) -> Device:
        return self.unavailable(reason, vendor="Huawei", kind=DeviceKind.NPU, name="no Ascend NPU found")

    def discover(self) -> list[Device]:
        acl, acl_error = self._acl_loader()
        source = "acl"
        if acl is not None:
            try:
                npus = read_acl(acl)
            except (AclError, AttributeError) as exc:
                # AttributeError: a libascendcl.so without one of the three functions (very old CANN).
                return [self._placeholder(f"ACL: {exc}; check the Ascend driver with `npu-smi info`")]
            problem = None
        else:
            found, smi_error = self._npu_smi()
            if not found:
                return [
                    self._placeholder(
                        f"CANN toolkit not found ({acl_error}) and no NPU listed by the driver "
                        f"({smi_error or 'npu-smi lists no NPU'}); {_INSTALL_ADVICE}, or pick another device"
                    )
                ]
            npus, source = found, "npu-smi"
            problem = f"the driver lists this NPU but the CANN toolkit is missing ({acl_error}); {_INSTALL_ADVICE}"
        if not npus:
            return [self._placeholder("ACL reports no NPU; check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES")]
        runtime_problem, ort_version = self._runtime_problem()
        problem = problem or runtime_problem
        devices = []
        for npu in npus:
            profile = chips.profile_for(npu.soc_name)
            caps = profile.capabilities
            if ort_version:  # what the installed onnxruntime-cann reads (IR version, opsets)
                caps = fit_capabilities(caps, cpu_kernels=False)
            if npu.hbm_bytes and caps.memory.capacity_bytes is None:
                # npu-smi's HBM total is measured on the device; the table only fills gaps.
                caps = evolve(caps, memory=Memory(npu.hbm_bytes, caps.memory.bandwidth_gbps))
            details = {
                "soc": npu.soc_name,
                "profile": f"{profile.model}: {profile.source}",
                "found_by": source,
                "onnxruntime": ort_version,
            }
            if npu.health:
                details["health"] = npu.health
            if npu.bus_id:
                details["pci_bus_id"] = npu.bus_id
            devices.append(
                Device(
                    id=f"{self.name}:{npu.index}",
                    backend=self.name,
                    vendor="Huawei",
                    name=profile.model if profile is not chips.UNKNOWN else npu.soc_name,
                    kind=DeviceKind.NPU,
                    capabilities=caps,
                    available=problem is None,
                    reason=problem,
                    details=details,
                    handle=npu.index,  # the device_id CANNExecutionProvider takes
                )
            )
        return devices

    def _runtime_problem(self) -> tuple[str | None, str]:
        """Why onnxruntime-cann cannot run CANNExecutionProvider here (None if it can)."""
        # onnxruntime-cann fails to import under numpy 2 ("import numpy failed").
        return self.runtime_problem(_PROVIDER, install="onnxruntime-cann 'numpy<2'")

    # -- compiling -------------------------------------------------------------------------------

    def providers(self, device: Device, options: CompileOptions) -> list[tuple[str, dict[str, Any]]]:
        # No CPUExecutionProvider: with session.disable_cpu_ep_fallback onnxruntime rejects a list
        # naming it, and without it no node may land on the CPU.
        index = self.handle_of(device, int)
        return [(_PROVIDER, {"device_id": index, **dict(options.extra.get("cann_options", {}))})]
