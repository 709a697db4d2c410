"""Tests of the ``ascend`` backend (hal-ascend).

The test machines have no Ascend NPU, driver or CANN toolkit. The no-CANN path is tested for real
against the installed onnxruntime-cann: that is the situation where it silently runs on the CPU.
Tests that need ACL's answers use :class:`fake_acl.FakeAcl` instead of libascendcl.so because we
cannot have the hardware; they check what the plugin makes of ACL's answers, and say so.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import onnx
import pytest
from attrs import evolve
from fake_acl import NPU_SMI_910B, FakeAcl
from hal_ascend import chips
from hal_ascend.backend import NO_NPU_ID, AscendBackend, NpuInfo, parse_npu_smi, provider_library_problem
from onnx import TensorProto, helper

import hal
from hal.errors import CompileError, HalError, UnavailableDeviceError
from hal.plugin import (
    CompileOptions, Device, E8M0Encoding, InterconnectKind, LoweredModel, Maturity, NumberFormat,
    ScaledFormat, Support, reload_plugins, runtime_limits,
)

F = NumberFormat


def _cann_present() -> bool:
    try:
        ctypes.CDLL("libascendcl.so")
    except OSError:
        return False
    return True


no_cann = pytest.mark.skipif(_cann_present(), reason="the CANN toolkit is installed: the no-CANN path cannot be seen")


def _add_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _with_acl(acl: FakeAcl) -> AscendBackend:
    return AscendBackend(acl_loader=lambda: (acl, ""), npu_smi=lambda: pytest.fail("npu-smi must not run"))


# -- real: onnxruntime-cann without the CANN toolkit -------------------------------------------------


def test_onnxruntime_is_the_cann_build() -> None:
    """The environment has onnxruntime-cann's module (they share it with onnxruntime)."""
    import onnxruntime as ort

    assert "CANNExecutionProvider" in ort.get_available_providers()
    assert int(np.__version__.split(".")[0]) < 2  # onnxruntime-cann does not import under numpy 2


@no_cann
def test_onnxruntime_cann_alone_falls_back_to_cpu() -> None:
    """Real: the hazard this plugin exists for. Asked for CANN without the toolkit, onnxruntime-cann
    builds a CPU session without raising. If this ever fails, onnxruntime fixed it upstream."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    session = ort.InferenceSession(_add_model().SerializeToString(), so, providers=["CANNExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]


@no_cann
def test_no_cann_lists_an_unavailable_placeholder() -> None:
    """Real (ACL load and npu-smi lookup): no toolkit, no driver -> ascend:none with the loader's message."""
    devices = AscendBackend().discover()
    assert [(d.id, d.available) for d in devices] == [(NO_NPU_ID, False)]
    reason = devices[0].reason or ""
    assert "libascendcl.so: cannot open shared object file" in reason
    assert "set_env.sh" in reason
    assert devices[0].capabilities.formats.at_least(Support.STORAGE) == ()  # claims nothing


@no_cann
def test_compiling_for_ascend_raises_through_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real, through the public API: the placeholder is listed and compiling for it raises."""
    monkeypatch.setenv("HAL_LOAD_PLUGINS", "ascend")
    reload_plugins()
    try:
        devices = {d.id: d for d in hal.devices()}
        assert not devices[NO_NPU_ID].available
        with pytest.raises(UnavailableDeviceError, match="libascendcl"):
            hal.compile(_add_model()).to(NO_NPU_ID)
    finally:
        reload_plugins()


@no_cann
def test_npu_seen_but_no_cann_is_unavailable() -> None:
    """Mocked ACL (a 910B answering through a stand-in library) + real onnxruntime-cann without
    the toolkit: the NPU is listed with its profile but unavailable, with the loader's message."""
    (dev,) = _with_acl(FakeAcl(1, "Ascend910B3")).discover()
    assert dev.id == "ascend:0" and not dev.available
    assert "libascendcl.so: cannot open shared object file" in (dev.reason or "")
    assert dev.capabilities.support(F.BFLOAT16) is Support.NATIVE


@no_cann
def test_prepare_raises_instead_of_running_on_cpu() -> None:
    """Real onnxruntime-cann: even for a device claimed available, prepare raises CompileError with
    the missing library, and never hands back a CPU session."""
    (dev,) = _with_acl(FakeAcl(1, "Ascend910B3")).discover()
    dev = evolve(dev, available=True, reason=None)
    with pytest.raises(CompileError) as info:
        AscendBackend().prepare(LoweredModel.from_proto(_add_model()), dev, CompileOptions())
    assert "libascendcl.so: cannot open shared object file" in str(info.value)
    assert provider_library_problem() is not None


def test_prepare_refuses_an_unavailable_device() -> None:
    dev = AscendBackend(acl_loader=lambda: (None, "no acl"), npu_smi=lambda: (None, "no npu-smi")).discover()[0]
    with pytest.raises(UnavailableDeviceError) as info:
        AscendBackend().prepare(LoweredModel.from_proto(_add_model()), dev, CompileOptions())
    assert isinstance(info.value, HalError)


def test_sessions_forbid_the_cpu() -> None:
    """Real onnxruntime: CPU fallback disabled and no CPU provider in the list."""
    backend = AscendBackend()
    (dev,) = _with_acl(FakeAcl(1, "Ascend910B3")).discover()
    so = backend.session_options(dev, CompileOptions())
    assert so.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    opts = CompileOptions(extra={"cann_options": {"precision_mode": "force_fp32"}})
    assert backend.providers(dev, opts) == [("CANNExecutionProvider", {"device_id": 0, "precision_mode": "force_fp32"})]


# -- mocked ACL: profiles ---------------------------------------------------------------------------------


def test_910b_profile_mocked_acl() -> None:
    """Mocked ACL (no 910B here): two devices, no FP8 at all, HCCS, fp16 peak from chips.md."""
    acl = FakeAcl(2, "Ascend910B3")
    devices = _with_acl(acl).discover()
    assert [d.id for d in devices] == ["ascend:0", "ascend:1"]
    caps = devices[0].capabilities
    assert devices[0].name == "Ascend 910B (Atlas A2)"
    assert caps.support(F.BFLOAT16) is Support.NATIVE
    assert caps.support(F.FLOAT16) is Support.NATIVE
    for fmt in (F.FLOAT8_E4M3FN, F.FLOAT8_E5M2, F.FLOAT8_E4M3FNUZ, F.FLOAT8_E5M2FNUZ, F.FLOAT8_E8M0, F.FLOAT4_E2M1):
        assert caps.support(fmt) is Support.NONE
    assert caps.scaled == () and caps.e8m0_encoding is None
    assert caps.interconnect.kind is InterconnectKind.HCCS
    assert caps.peak(F.FLOAT16) == 320
    assert caps.memory.capacity_bytes == 64 * 10**9
    assert any("FP8" in reason for reason in caps.stability.incompatibilities)
    assert "secondary" in dict(devices[0].details)["profile"]
    assert acl.calls == ["aclInit", "aclrtGetDeviceCount", "aclrtGetSocName"]  # no aclFinalize


def test_910c_profile_mocked_acl() -> None:
    """Mocked ACL (no 910C here): SoC Ascend910_9391 -> 910C, no FP8, HCCS 784 GB/s (secondary),
    memory left unknown because the sources conflict."""
    (dev,) = _with_acl(FakeAcl(1, "Ascend910_9391")).discover()
    caps = dev.capabilities
    assert dev.name == "Ascend 910C (Atlas A3)"
    assert caps.support(F.FLOAT8_E4M3FN) is Support.NONE
    assert caps.interconnect.kind is InterconnectKind.HCCS
    assert caps.interconnect.bandwidth_gbps == 784
    assert caps.peak(F.BFLOAT16) == 780
    assert caps.memory.capacity_bytes is None


def test_950_profile_mocked_acl() -> None:
    """Mocked ACL (no 950 here): FP8 E4M3FN/E5M2 native, E8M0 scales with CANN's zero encoding."""
    (dev,) = _with_acl(FakeAcl(1, "Ascend950PR_9599")).discover()
    caps = dev.capabilities
    assert caps.support(F.FLOAT8_E4M3FN) is Support.NATIVE
    assert caps.support(F.FLOAT8_E5M2) is Support.NATIVE
    assert caps.support(F.FLOAT8_E8M0) is Support.NATIVE
    assert caps.support(F.FLOAT8_E4M3FNUZ) is Support.NONE
    assert caps.e8m0_encoding is E8M0Encoding.CANN_ZERO
    assert ScaledFormat("float8_e4m3fn", "float8_e8m0", (1, 32), Support.NATIVE) in caps.scaled
    assert caps.stability.maturity is Maturity.EXPERIMENTAL
    assert caps.peak(F.FLOAT8_E4M3FN) == 1000
    # onnxruntime-cann's loader limits narrow the table (1.24 reads at most IR 13); the chip's own
    # formats stay (the CPU provider's missing e8m0 kernels say nothing about CANN's).
    assert caps.opsets.max_ir_version == runtime_limits().max_ir_version


def test_unknown_soc_gets_no_figures() -> None:
    """Mocked ACL: a SoC without a profile (Ascend310P3) gets base types and no invented figures."""
    (dev,) = _with_acl(FakeAcl(1, "Ascend310P3")).discover()
    assert dev.name == "Ascend310P3"
    assert dev.capabilities.peak_tflops == ()
    assert dev.capabilities.support(F.FLOAT8_E4M3FN) is Support.NONE
    assert dev.capabilities.interconnect.kind is InterconnectKind.PCIE


@pytest.mark.parametrize(
    ("soc", "key"),
    [
        ("Ascend910B1", "910b"),
        ("Ascend910B4", "910b"),
        ("Ascend910_9391", "910c"),
        ("Ascend910_9382", "910c"),
        ("Ascend950DT", "950"),
        ("Ascend910A", "unknown"),
        ("Ascend910B3x", "unknown"),
    ],
)
def test_profile_matching(soc: str, key: str) -> None:
    assert chips.profile_for(soc).key == key


def test_acl_errors_give_a_placeholder() -> None:
    """Mocked ACL whose aclrtGetDeviceCount fails (driver not loaded): no devices invented."""
    (dev,) = _with_acl(FakeAcl(2, "Ascend910B3", count_error=507033)).discover()
    assert dev.id == NO_NPU_ID and not dev.available
    assert "507033" in (dev.reason or "")
    (dev,) = _with_acl(FakeAcl(0, "Ascend910B3")).discover()
    assert dev.id == NO_NPU_ID and "no NPU" in (dev.reason or "")


def test_repeat_initialize_is_not_an_error() -> None:
    """Mocked ACL: aclInit answering ACL_ERROR_REPEAT_INITIALIZE (100002) still lists the NPUs."""
    devices = _with_acl(FakeAcl(2, "Ascend910B3", init_error=100002)).discover()
    assert [d.id for d in devices] == ["ascend:0", "ascend:1"]


def test_npu_smi_fallback() -> None:
    """Mocked npu-smi output (no driver here): NPUs listed from it are unavailable (no toolkit),
    with health, bus id and HBM size read from the table."""
    npus = parse_npu_smi(NPU_SMI_910B)
    assert npus == [
        NpuInfo(0, "Ascend910B3", "OK", "0000:C1:00.0", 65536 * 2**20),
        NpuInfo(1, "Ascend910B3", "Warning", "0000:C2:00.0", 65536 * 2**20),
    ]
    backend = AscendBackend(
        acl_loader=lambda: (None, "libascendcl.so: cannot open shared object file"),
        npu_smi=lambda: (npus, ""),
    )
    devices = backend.discover()
    assert [(d.id, d.available) for d in devices] == [("ascend:0", False), ("ascend:1", False)]
    assert "CANN toolkit is missing" in (devices[0].reason or "")
    assert dict(devices[1].details)["health"] == "Warning"
    assert devices[0].capabilities.memory.capacity_bytes == 64 * 10**9  # the profile's figure stays


def test_capabilities_survive_json() -> None:
    (dev,) = _with_acl(FakeAcl(1, "Ascend950PR_9599")).discover()
    assert Device.from_dict(dev.to_dict()) == dev


def test_import_is_cheap() -> None:
    """Importing and registering the plugin imports no onnxruntime and loads no ACL."""
    code = (
        "import sys, hal_ascend; hal_ascend.hal_register_backends(register=lambda b: None); "
        "assert 'onnxruntime' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_acl_without_a_function_gives_a_placeholder() -> None:
    """Mocked ACL lacking aclrtGetSocName (as a very old CANN would): a reason, no raise."""
    acl = FakeAcl(2, "Ascend910B3")
    del acl.aclrtGetSocName
    (dev,) = _with_acl(acl).discover()
    assert dev.id == NO_NPU_ID and "aclrtGetSocName" in (dev.reason or "")
