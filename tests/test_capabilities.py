from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest

import hal
from hal.capabilities import (
    Capabilities,
    E8M0Encoding,
    FormatTable,
    Health,
    Interconnect,
    InterconnectKind,
    Maturity,
    Memory,
    NumberFormat,
    OpsetRange,
    ScaledFormat,
    Stability,
    Support,
    ValueKind,
)


class TestNumberFormat:
    def test_every_onnx_element_type_has_a_format_with_the_same_code(self):
        codes = {v for k, v in onnx.TensorProto.DataType.items() if k != "UNDEFINED"}
        assert {f.onnx_type for f in NumberFormat} == codes
        for name, code in onnx.TensorProto.DataType.items():
            if name == "UNDEFINED":
                continue
            fmt = NumberFormat.from_onnx(code)
            assert fmt.onnx_type == code
            # the helper's numpy mapping agrees with ours wherever onnx has one
            np_type = onnx.helper.tensor_dtype_to_np_dtype(code) if code not in (8,) else None
            if np_type is not None and fmt.bits >= 8 and not fmt.value.startswith("float6"):
                assert np.dtype(np_type).itemsize == fmt.dtype.itemsize

    @pytest.mark.parametrize(
        ("fmt", "dtype"),
        [
            (NumberFormat.FLOAT32, np.float32),
            (NumberFormat.BFLOAT16, ml_dtypes.bfloat16),
            (NumberFormat.FLOAT8_E4M3FN, ml_dtypes.float8_e4m3fn),
            (NumberFormat.FLOAT8_E4M3FNUZ, ml_dtypes.float8_e4m3fnuz),
            (NumberFormat.FLOAT8_E5M2, ml_dtypes.float8_e5m2),
            (NumberFormat.FLOAT8_E5M2FNUZ, ml_dtypes.float8_e5m2fnuz),
            (NumberFormat.FLOAT8_E8M0, ml_dtypes.float8_e8m0fnu),
            (NumberFormat.FLOAT4_E2M1, ml_dtypes.float4_e2m1fn),
            (NumberFormat.INT4, ml_dtypes.int4),
            (NumberFormat.UINT4, ml_dtypes.uint4),
            (NumberFormat.BOOL, np.bool_),
        ],
    )
    def test_maps_both_ways_to_numpy_and_ml_dtypes(self, fmt, dtype):
        assert fmt.dtype == np.dtype(dtype)
        assert NumberFormat.from_dtype(dtype) is fmt

    def test_every_format_but_float6_has_a_dtype_that_maps_back(self):
        for fmt in NumberFormat:
            if fmt in (NumberFormat.FLOAT6_E2M3, NumberFormat.FLOAT6_E3M2):
                with pytest.raises(KeyError):
                    fmt.dtype
                continue
            assert NumberFormat.from_dtype(fmt.dtype) is fmt

    def test_fp8_facts(self):
        assert NumberFormat.FLOAT8_E4M3FN.onnx_type == 17
        assert NumberFormat.FLOAT8_E8M0.onnx_type == 24
        assert NumberFormat.FLOAT4_E2M1.bits == 4
        assert {f for f in NumberFormat if f.is_fp8} >= {
            NumberFormat.FLOAT8_E4M3FN,
            NumberFormat.FLOAT8_E4M3FNUZ,
            NumberFormat.FLOAT8_E5M2,
            NumberFormat.FLOAT8_E5M2FNUZ,
        }

    def test_unknown_codes_and_dtypes_are_errors(self):
        with pytest.raises(ValueError, match="999"):
            NumberFormat.from_onnx(999)
        with pytest.raises(ValueError, match="datetime64"):
            NumberFormat.from_dtype(np.dtype("datetime64[s]"))


class TestSupport:
    def test_levels_are_ordered(self):
        assert Support.NATIVE.at_least(Support.EMULATED)
        assert Support.EMULATED.at_least(Support.STORAGE)
        assert not Support.STORAGE.at_least(Support.EMULATED)
        assert not Support.NONE.at_least(Support.STORAGE)


def h100_like() -> Capabilities:
    return Capabilities.from_levels(
        native=["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"],
        storage=["float8_e4m3fnuz", "float8_e8m0"],
        scaled=[
            ScaledFormat("float8_e4m3fn", "float32", (128, 128)),
            ScaledFormat("float8_e4m3fn", "float32", (1, 128)),
            ScaledFormat("float8_e4m3fn", "float8_e8m0", (1, 32), Support.EMULATED),
        ],
        e8m0_encoding=E8M0Encoding.OCP,
        interconnect=Interconnect(InterconnectKind.NVLINK, 900.0, 18, ("cuda:1",), 1.5),
        stability=Stability(Maturity.STABLE, ("no FNUZ compute",), Health(100, 2, True, 1.1, False)),
        memory=Memory(80 * 10**9, 3350.0),
        peak_tflops={"float8_e4m3fn": 1979.0, "bfloat16": 989.0},
        opsets=OpsetRange(7, 25, max_ir_version=13),
        dynamic_shapes=True,
        movable=["float8_e8m0", "float8_e4m3fnuz"],
    )


class TestCapabilities:
    def test_every_format_has_a_level(self):
        caps = Capabilities.from_levels(native=["float32"])
        assert len(caps.formats) == len(NumberFormat)
        assert caps.support("float32") is Support.NATIVE
        assert caps.support(NumberFormat.FLOAT8_E4M3FNUZ) is Support.NONE

    def test_json_round_trip_keeps_everything(self):
        caps = h100_like()
        text = caps.to_json()
        back = Capabilities.from_json(text)
        assert back == caps
        assert hash(back) == hash(caps)
        data = json.loads(text)
        assert data["formats"]["float8_e4m3fn"] == "native"
        assert data["e8m0_encoding"] == "ocp"
        assert data["scaled"][2] == {"element": "float8_e4m3fn", "scale": "float8_e8m0", "block": [1, 32], "support": "emulated"}
        assert data["interconnect"]["kind"] == "nvlink"
        assert data["stability"]["health"]["failures"] == 2
        assert back.peak("float8_e4m3fn") == 1979.0
        assert data["movable"] == ["float8_e4m3fnuz", "float8_e8m0"]  # in the table's order
        assert back.movable == {NumberFormat.FLOAT8_E8M0, NumberFormat.FLOAT8_E4M3FNUZ}
        assert data["opsets"] == {"min": 7, "max": 25, "max_ir_version": 13, "max_loadable": None, "domains": []}

    def test_io_kinds_round_trip_and_tensors_go_without_saying(self):
        caps = Capabilities(io_kinds=["optional-sequence", ValueKind.SEQUENCE, "tensor"])
        assert caps.io_kinds == {ValueKind.SEQUENCE, ValueKind.OPTIONAL_SEQUENCE}
        data = json.loads(caps.to_json())
        assert data["io_kinds"] == ["sequence", "optional-sequence"]  # in ValueKind's order
        assert Capabilities.from_json(caps.to_json()) == caps
        assert Capabilities().io_kinds == frozenset() and Capabilities.from_dict({}).io_kinds == frozenset()
        with pytest.raises(ValueError, match="'map' is not a valid ValueKind"):
            Capabilities(io_kinds=["map"])

    def test_cann_e8m0_encoding_round_trips(self):
        caps = Capabilities(e8m0_encoding="cann-zero")
        assert Capabilities.from_json(caps.to_json()).e8m0_encoding is E8M0Encoding.CANN_ZERO

    def test_health_error_rate(self):
        assert Health(probes=10, failures=1).error_rate == pytest.approx(0.1)
        assert Health().error_rate is None

    def test_records_are_frozen(self):
        caps = h100_like()
        with pytest.raises(AttributeError):
            caps.dynamic_shapes = False  # type: ignore[misc]

    def test_bad_values_are_refused(self):
        with pytest.raises(ValueError):
            ScaledFormat("float8_e4m3fn", "float32", (0, 32))
        with pytest.raises(ValueError):
            OpsetRange(20, 10)
        with pytest.raises(ValueError):
            FormatTable({"float32": "fast"})
        with pytest.raises(ValueError):
            Capabilities(e8m0_encoding="huawei")


class TestDevice:
    def test_json_round_trip(self):
        device = hal.Device(
            id="sim:ascend-910c:0", backend="sim", vendor="Huawei", name="Ascend 910C", kind="npu",
            capabilities=h100_like(), available=False, reason="simulated: no toolkit", details={"driver": "1.0"},
        )
        back = hal.Device.from_dict(json.loads(json.dumps(device.to_dict())))
        assert back == device

    @pytest.mark.parametrize("bad", ["cpu", "", "ort: cpu", "ort:", ":cpu", "a/b:c"])
    def test_ids_must_be_backend_colon_name(self, bad):
        with pytest.raises(ValueError, match="backend:name"):
            hal.Device(id=bad, backend="ort", vendor="x", name="x", kind="cpu")

    def test_unavailable_needs_a_reason(self):
        with pytest.raises(ValueError, match="reason"):
            hal.Device(id="x:0", backend="x", vendor="x", name="x", kind="gpu", available=False)
