"""`hal serve` (hal.ray.serve) on the session's two-node cluster, driven by Triton's own HTTP client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests_ray_helpers import free_port  # noqa: E402

from hal.ray import protocol  # noqa: E402
from hal.ray import serve as hal_serve  # noqa: E402


@pytest.fixture(scope="module")
def server(cluster: Any, mlp: Any) -> Iterator[Any]:
    from ray import serve

    port = free_port()
    try:
        hal_serve.run(mlp, name="mlp", devices="auto", port=port, deadline_s=30)
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001, S110 - the proxy is not up yet
                pass
            time.sleep(0.5)
        assert client.is_server_ready()
        yield client
    finally:
        serve.shutdown()


def _device_worker_pids() -> list[int]:
    """The processes of the device actors (Ray titles an actor's process ``ray::<class>``; this
    session started every Ray process on this machine, and the fleet tests closed theirs)."""
    from pathlib import Path

    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::DeviceWorker"):
                pids.append(int(entry.name))
    return sorted(pids)


def _input(x: np.ndarray, binary: bool = True) -> Any:
    given = http.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=binary)
    return given


class TestServe:
    def test_metadata(self, server: Any) -> None:
        assert server.is_server_live()
        assert server.is_model_ready("mlp")
        meta = server.get_model_metadata("mlp")
        assert meta["name"] == "mlp"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [4, 64]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [4, 64]}]

    @pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
    def test_inference_answers_as_ort_cpu(self, server: Any, mlp: Any, binary: bool) -> None:
        feeds = mlp.feeds(7)
        out = server.infer("mlp", [_input(feeds["x"], binary)], outputs=[http.InferRequestedOutput("y", binary_data=binary)])
        np.testing.assert_array_equal(out.as_numpy("y"), mlp.answer(feeds)["y"])

    def test_a_wrong_shape_is_a_400_with_the_hals_message(self, server: Any) -> None:
        with pytest.raises(InferenceServerException) as info:
            server.infer("mlp", [_input(np.zeros((3, 64), np.float32))])
        assert info.value.status() == "400"
        assert "input 'x' has shape [3, 64], expected [4, 64]" in info.value.message()

    def test_another_models_name_is_a_404(self, server: Any) -> None:
        with pytest.raises(InferenceServerException) as info:
            server.get_model_metadata("resnet")
        assert info.value.status() == "404"
        assert "this server serves 'mlp'" in info.value.message()

    def test_a_crashed_device_is_no_5xx_while_another_answers(self, server: Any, mlp: Any) -> None:
        workers = _device_worker_pids()
        assert len(workers) >= 2
        os.kill(workers[0], signal.SIGKILL)  # a device process dies as a crashing driver would take it
        for seed in range(12):
            feeds = mlp.feeds(seed)
            out = server.infer("mlp", [_input(feeds["x"])])
            np.testing.assert_array_equal(out.as_numpy("y"), mlp.answer(feeds)["y"])


class TestReadiness:
    def _get(self, server: Any, path: str) -> tuple[int, dict[str, Any]]:
        status, body, _ = asyncio.run(server._route("GET", path, None))  # noqa: SLF001 - the route alone
        return status, json.loads(body)

    def test_not_ready_until_placed_and_never_when_placement_failed(self, cluster: Any, mlp: Any) -> None:
        from hal.ray._fleet import model_bytes

        server = hal_serve.ModelServer(model_bytes(mlp), "mlp", devices=["sim:b200:0"])
        status, body = self._get(server, "/v2/health/ready")
        if server.error is None:  # still placing
            assert (status, body["ready"]) == (503, False)
            assert "being placed" in body["reason"]
        deadline = time.monotonic() + 60
        while server.error is None and time.monotonic() < deadline:
            time.sleep(0.2)
        status, body = self._get(server, "/v2/health/ready")
        assert (status, body["ready"]) == (503, False)
        assert "no node of the fleet lists a device 'sim:b200:0'" in body["reason"]
        with pytest.raises(RuntimeError, match="sim:b200:0"):
            server.check_health()


class TestProtocol:
    def test_a_datatype_the_protocol_cannot_carry_is_named(self) -> None:
        import hal

        info = hal.TensorInfo("w", hal.NumberFormat.FLOAT8_E4M3FN, (4,))
        with pytest.raises(hal.errors.InputError, match="'w' has element type float8_e4m3fn"):
            protocol.datatype(info)

    def test_bad_requests_are_input_errors(self, mlp: Any) -> None:
        from hal.errors import InputError

        for body, match in [
            (b"not json", "not JSON"),
            (b"{}", "no 'inputs' list"),
            (b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}', "datatype 'FP99'"),
            (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}', "has 1 elements"),
            (b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1], "data": [1]}]}', "no input 'z'"),
        ]:
            with pytest.raises(InputError, match=match):
                protocol.decode_request(body, mlp.inputs)
