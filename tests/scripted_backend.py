"""A backend whose devices misbehave on cue, for the pool and isolation tests.

Each device ``NAME:KEY`` computes ``y = x + 1`` (the model of :func:`plus_one`) with numpy, and
behaves by its mode: ``ok``; ``error`` (raises); ``nan`` (answers NaN); ``hang`` (answers after
``hang_s``); ``crash`` (``os._exit``: only ever in an isolated worker); ``poison`` (crashes when
``x[0, 0] == CRASH``, hangs when it is ``HANG``, else ok). Modes can be changed while running
(``backend.modes[device_id] = ...``) in this process. A module of its own so that a worker
process can unpickle the backend.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from onnx import TensorProto, helper

import hal
from hal.testing.build import make_model

CRASH = 666.0
HANG = 777.0


def plus_one():
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    return make_model(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [("x", TensorProto.FLOAT, [2, 3])],
        [("y", TensorProto.FLOAT, [2, 3])],
        initializers=[one],
    )


class ScriptedRunner:
    def __init__(self, backend: ScriptedBackend, device_id: str) -> None:
        self.backend = backend
        self.device_id = device_id

    def run(self, feeds, names):
        x = feeds["x"]
        mode = self.backend.modes[self.device_id]
        with self.backend.lock:
            self.backend.calls[self.device_id] = self.backend.calls.get(self.device_id, 0) + 1
        if mode == "poison":
            mode = {CRASH: "crash", HANG: "hang"}.get(float(x[0, 0]), "ok")
        if mode == "error":
            msg = f"{self.device_id}: injected error"
            raise RuntimeError(msg)
        if mode == "crash":
            os._exit(3)
        if mode == "hang":
            threading.Event().wait(self.backend.hang_s)
        if mode == "nan":
            return [np.full(x.shape, np.nan, np.float32)]
        return [x + np.float32(1)]


class ScriptedBackend(hal.Backend):
    version = "1"

    def __init__(self, name: str, modes: dict[str, str], hang_s: float = 30.0, unplaceable: tuple[str, ...] = ()) -> None:
        self.name = name
        self.modes = {f"{name}:{key}": mode for key, mode in modes.items()}
        self.hang_s = hang_s
        self.unplaceable = unplaceable
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def discover(self):
        caps = hal.Capabilities.from_levels(native=["float32"])
        return [
            hal.Device(id=device_id, backend=self.name, vendor="test", name=device_id, kind="gpu", capabilities=caps)
            for device_id in self.modes
        ]

    def prepare(self, model, device, options):
        if device.id.partition(":")[2] in self.unplaceable:
            msg = f"{device.id}: this test device cannot compile anything"
            raise hal.errors.CompileError(msg)
        return ScriptedRunner(self, device.id)


def register(reg, backend: ScriptedBackend) -> None:
    class Plugin:
        @hal.hookimpl
        def hal_register_backends(self, register):
            register(backend)

    reg.add_plugin(Plugin(), name=backend.name)

