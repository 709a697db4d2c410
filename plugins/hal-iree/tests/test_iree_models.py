"""Generated models run on iree:local-task and match onnxruntime's CPU backend."""

from __future__ import annotations

import numpy as np
import pytest
from iree_helpers import attention_model, conv_model, feeds_for, make, mlp_model, to_strict
from onnx import TensorProto, helper

import hal
from hal.errors import CompileError

DEVICE = "iree:local-task"


def _compare(model, rtol: float = 1e-4, atol: float = 1e-4, **extra):  # type: ignore[no-untyped-def]
    compiled = hal.compile(model)
    feeds = feeds_for(compiled)
    exe = to_strict(compiled, DEVICE, **extra)
    assert exe.device.id == DEVICE and all(p.device == DEVICE for p in exe.placement)  # no fallback
    got = exe.run(feeds)
    want = compiled.to("ort:cpu").run(feeds)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)
    return compiled


@pytest.fixture(scope="module")
def mlp_exe():  # type: ignore[no-untyped-def]
    compiled = hal.compile(mlp_model())
    return compiled, to_strict(compiled, DEVICE)


def test_mlp_matches_onnxruntime(mlp_exe) -> None:  # type: ignore[no-untyped-def]
    compiled, exe = mlp_exe
    feeds = feeds_for(compiled, seed=3)
    got = exe.run(feeds)
    want = compiled.to("ort:cpu").run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_output_subset_and_order(mlp_exe) -> None:  # type: ignore[no-untyped-def]
    compiled, exe = mlp_exe
    feeds = feeds_for(compiled, seed=4)
    full = exe.run(feeds)
    reordered = exe.run(feeds, ["logits", "y"])
    assert list(reordered) == ["logits", "y"]
    only = exe.run(feeds, ["logits"])
    assert list(only) == ["logits"]
    np.testing.assert_array_equal(only["logits"], full["logits"])
    np.testing.assert_array_equal(reordered["y"], full["y"])


def test_outputs_are_host_copies(mlp_exe) -> None:  # type: ignore[no-untyped-def]
    compiled, exe = mlp_exe
    feeds = feeds_for(compiled, seed=5)
    first = exe.run(feeds)["y"]
    kept = first.copy()
    exe.run(feeds_for(compiled, seed=6))
    np.testing.assert_array_equal(first, kept)  # a later run does not overwrite earlier results
    assert isinstance(first, np.ndarray) and first.flags.owndata


def test_conv_net_matches_onnxruntime() -> None:
    _compare(conv_model())


def test_conv_net_channels_last_matches_onnxruntime() -> None:
    _compare(conv_model(), channels_last=True)


def test_attention_block_matches_onnxruntime() -> None:
    _compare(attention_model())


def test_opset11_batchnorm_is_converted() -> None:
    """IREE's importer takes opset 17 on: the backend declares it and the core converts the model
    (a lowering step, shown by hal explain), not the plugin behind the core's back."""
    compiled = _compare(conv_model(opset=11, batchnorm=True))
    steps = to_strict(compiled, DEVICE).lowering
    assert any(s.kind == "convert-opset" and "opset 11 -> 17" in s.detail for s in steps), steps


def test_uncompilable_model_raises_compile_error() -> None:
    # Cast to int16 has no lowering in IREE 3.13's ONNX frontend.
    model = make(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT16)],
        [("x", TensorProto.FLOAT, [4])],
        [("y", TensorProto.INT16, [4])],
    )
    with pytest.raises(CompileError) as info:
        to_strict(hal.compile(model), DEVICE)
    text = str(info.value)
    assert DEVICE in text and "Cast" in text
    assert "\n" not in text and "Traceback" not in text and len(text) < 300


def test_importer_rejection_raises_compile_error() -> None:
    model = make(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT4E2M1)],
        [("x", TensorProto.FLOAT, [4])],
        [("y", TensorProto.FLOAT4E2M1, [4])],
        opset=23,
    )
    with pytest.raises(CompileError, match=DEVICE):
        to_strict(hal.compile(model), DEVICE)


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(CompileError, match="channels_last"):
        to_strict(hal.compile(mlp_model()), DEVICE, chanels_last=True)


def test_bad_iree_flag_is_a_compile_error() -> None:
    with pytest.raises(CompileError, match=DEVICE):
        to_strict(hal.compile(mlp_model(batch=3)), DEVICE, iree_flags=["--no-such-iree-flag"])
