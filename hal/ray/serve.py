"""``hal serve``: a compiled model behind HTTP on Ray Serve, speaking the Open Inference Protocol v2.

    GET  /v2                          server metadata
    GET  /v2/health/live              200 while the server runs
    GET  /v2/health/ready             200 once the model is placed and verified on a device, else 503
    GET  /v2/models/{name}            the model's metadata (inputs and outputs: name, datatype, shape)
    GET  /v2/models/{name}/ready      as /v2/health/ready, for the model
    POST /v2/models/{name}/infer      an inference request (JSON tensors, or the binary extension)

Triton's and KServe's clients work unchanged (``tritonclient.http.InferenceServerClient``).

One Serve replica (the ingress, no device of its own) holds a :class:`~hal.ray.FleetExecutable`:
an actor per device, each of which lowered and verified the model on its node, with failover
between them. Placement starts with the replica, in the background, so readiness is false until
a device has verified the model. A bad request gets a 400 (404 for another model's name) with
the HAL's message; a device failure is retried on another device, and only when every device
failed the request does the client get a 503 naming each one. Serve's ``check_health`` runs the
HAL's canaries (:func:`hal.doctor.check`, with the served model as the canary) on every device
and fails only when none is healthy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from hal.errors import FailoverError, HalError, InputError
from hal.ray import protocol

__all__ = ["DEFAULT_PORT", "ModelServer", "application", "run"]

log = logging.getLogger("hal.ray.serve")

#: Triton's HTTP port.
DEFAULT_PORT = 8000
#: Seconds between Serve's health checks of the ingress (each runs the canaries on every device).
HEALTH_CHECK_PERIOD_S = 30.0


class ModelServer:
    """The Serve deployment's class (see the module): ``model`` is the compiled model as
    :func:`hal.ray.ship` packs it (or its bytes), ``name`` the name clients use, ``devices`` and
    ``replicas`` as :meth:`hal.ray.Fleet.to`."""

    def __init__(self, model: Any, name: str, devices: str | Sequence[str] = "auto", replicas: int = 1,
                 deadline_s: float | None = None) -> None:
        from hal.ray._actors import opened

        self.name = name
        self.compiled = opened(model)
        self.metadata = protocol.model_metadata(name, self.compiled.inputs, self.compiled.outputs, "onnx-hal")
        self.exe: Any = None
        self.error: str | None = None
        self._devices = devices
        self._replicas = replicas
        self._deadline_s = deadline_s
        threading.Thread(target=self._place, name="hal-serve-place", daemon=True).start()

    def _place(self) -> None:
        from hal.ray import Fleet
        from hal.ray._fleet import DEFAULT_DEADLINE_S

        try:
            fleet = Fleet()
            self.exe = fleet.to(self.compiled, devices=self._devices, replicas=self._replicas,
                                deadline_s=self._deadline_s or DEFAULT_DEADLINE_S)
            log.info("serving %s on %s", self.name, ", ".join(d.id for d in self.exe.devices))
        except HalError as exc:
            self.error = str(exc)
            log.error("cannot serve %s: %s", self.name, exc)

    # -- Serve's hooks ---------------------------------------------------------------------------

    def check_health(self) -> None:
        if self.error is not None:
            raise RuntimeError(self.error)
        if self.exe is None:
            return  # still placing: readiness says so
        results = self.exe.check_health()
        if not any(r.get("status") == "healthy" for r in results.values()):
            reasons = "; ".join(f"{d}: {r.get('status')} {', '.join(r.get('reasons', []))}" for d, r in results.items())
            msg = f"no device serving {self.name} passed its canaries: {reasons}"
            raise RuntimeError(msg)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        path = request.url.path.rstrip("/")
        method = request.method
        try:
            status, body, headers = await self._route(method, path, request)
        except InputError as exc:
            status, body, headers = 400, _error(str(exc)), {}
        except FailoverError as exc:  # every device failed this request: the server cannot answer it now
            status, body, headers = 503, _error(str(exc)), {}
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    # -- routes ----------------------------------------------------------------------------------

    def _ready(self) -> tuple[bool, str]:
        if self.error is not None:
            return False, f"cannot serve {self.name}: {self.error}"
        if self.exe is None:
            return False, f"{self.name} is being placed and verified on its devices"
        if all(s.breaker == "open" for s in self.exe.stats().values()):
            return False, f"every device of {self.name} has its circuit breaker open; see the server's log"
        return True, "ready"

    async def _route(self, method: str, path: str, request: Any) -> tuple[int, bytes, dict[str, str]]:
        import hal

        model_prefix = f"/v2/models/{self.name}"
        if method == "GET":
            if path == "/v2":
                meta = {"name": "onnx-hal", "version": hal.__version__, "extensions": ["binary_tensor_data"]}
                return 200, json.dumps(meta).encode(), {}
            if path == "/v2/health/live":
                return 200, b'{"live": true}', {}
            if path in ("/v2/health/ready", f"{model_prefix}/ready", f"{model_prefix}/versions/1/ready"):
                ready, why = self._ready()
                return (200 if ready else 503), json.dumps({"ready": ready, "reason": why}).encode(), {}
            if path in (model_prefix, f"{model_prefix}/versions/1"):
                return 200, json.dumps(self.metadata).encode(), {}
        if method == "POST" and path in (f"{model_prefix}/infer", f"{model_prefix}/versions/1/infer"):
            return await self._infer(request)
        if path.startswith("/v2/models/"):
            other = path[len("/v2/models/"):].split("/")[0]
            if other != self.name:
                return 404, _error(f"no model {other!r} here; this server serves {self.name!r}"), {}
        return 404, _error(f"{method} {path} is not a route of the Open Inference Protocol v2 here; see GET /v2/models/{self.name}"), {}

    async def _infer(self, request: Any) -> tuple[int, bytes, dict[str, str]]:
        ready, why = self._ready()
        if not ready:
            return 503, _error(why), {}
        body = await request.body()
        feeds, names, binary, request_id = protocol.decode_request(
            body, self.compiled.inputs, request.headers.get(protocol.HEADER_LENGTH)
        )
        outputs = await asyncio.to_thread(self.exe.run, feeds, names)
        payload, header = protocol.encode_response(self.name, outputs, self.compiled.outputs, binary, request_id)
        headers = {} if header is None else {protocol.HEADER_LENGTH: str(header)}
        return 200, payload, headers


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def application(model: Any, *, name: str | None = None, devices: str | Sequence[str] = "auto", replicas: int = 1,
                deadline_s: float | None = None) -> Any:
    """The Ray Serve application serving ``model`` (a path, bytes, a ModelProto or a compiled model)."""
    from ray import serve

    import hal
    from hal.ray._fleet import ship

    compiled = model if isinstance(model, hal.CompiledModel) else hal.compile(model)
    name = name or compiled.model.name
    deployment = serve.deployment(
        ModelServer, name=f"hal-{name}", num_replicas=1, ray_actor_options={"num_cpus": 0},
        health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_PERIOD_S,
        max_ongoing_requests=64,
    )
    return deployment.bind(ship(compiled), name, devices, replicas, deadline_s)


def run(model: Any, *, name: str | None = None, devices: str | Sequence[str] = "auto", replicas: int = 1,
        port: int = DEFAULT_PORT, host: str = "127.0.0.1", deadline_s: float | None = None) -> str:
    """Deploy ``model`` on the Ray cluster this process is connected to (or a local one) and
    return the server's URL; Serve keeps it running until ``ray.serve.shutdown()``."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init()
    import hal

    compiled = model if isinstance(model, hal.CompiledModel) else hal.compile(model)
    name = name or compiled.model.name
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    app = application(compiled, name=name, devices=devices, replicas=replicas, deadline_s=deadline_s)
    serve.run(app, name=f"hal-{name}", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
