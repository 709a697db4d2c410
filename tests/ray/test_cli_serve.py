"""`hal serve MODEL --ray ADDRESS --port P`, the command itself, joining the session's cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray")
http = pytest.importorskip("tritonclient.http")

from tests_ray_helpers import free_port  # noqa: E402  (conftest puts it on the path)


def test_hal_serve_answers_tritonclient_and_stops_on_ctrl_c(cluster: Any, mlp: Any, tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    mlp.save(path)
    port = free_port()
    command = [sys.executable, "-m", "hal", "serve", str(path), "--ray", cluster.address, "--port", str(port),
               "--name", "cli-mlp", "--devices", "sim:ascend-910c:0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = None
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        start = time.monotonic()
        deadline = start + 300  # a cold machine: Serve, the proxy and a verified placement
        ready = False
        while time.monotonic() < deadline and process.poll() is None and not ready:
            try:
                ready = client.is_server_ready()
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
        if not ready:  # say why: the command's own output, whether it exited or still runs
            state = f"exited with {process.returncode}" if process.poll() is not None else "still running"
            output = _stop(process)
            pytest.fail(f"hal serve not ready after {time.monotonic() - start:.0f} s ({state}); its output:\n{output}")
        feeds = mlp.feeds(3)
        given = http.InferInput("x", [4, 64], "FP32")
        given.set_data_from_numpy(feeds["x"])
        out = client.infer("cli-mlp", [given])
        np.testing.assert_array_equal(out.as_numpy("y"), mlp.answer(feeds)["y"])
    finally:
        if output is None:
            output = _stop(process)
        _forget_app("hal-cli-mlp")  # whatever happened, its actors must not hold the nodes' resources
    assert process.returncode == 0, output
    assert f"serving 'cli-mlp' at http://127.0.0.1:{port}/v2/models/cli-mlp" in output


def _stop(process: subprocess.Popen[str]) -> str:
    """Ctrl-C ``process`` (``hal serve`` shuts down on it) and return everything it printed."""
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def _forget_app(name: str) -> None:
    """Delete the Serve application ``name`` from the session's cluster if the command left it."""
    try:
        from ray import serve

        serve.delete(name, _blocking=True)
    except Exception:  # noqa: BLE001 - absent (the command cleaned up) or Serve not running: nothing to free
        pass
