"""hal.ray.Fleet on a real two-node Ray cluster (conftest.py): listing, placement, failover."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import hal
from hal.errors import CompileError, InputError

ray = pytest.importorskip("ray")

import hal.ray  # noqa: E402
from hal.ray import FleetDevice, resources_for  # noqa: E402


def _device(id_: str, kind: str, name: str = "chip", backend: str | None = None) -> hal.Device:
    return hal.Device(id=id_, backend=backend or id_.split(":")[0], vendor="v", name=name, kind=kind)


class TestResources:
    def test_simulated_chips_need_their_custom_resource(self) -> None:
        assert resources_for(_device("sim:ascend-910c:0", "simulated")) == {
            "num_cpus": 0, "resources": {"hal_sim_ascend_910c": 1.0},
        }

    def test_gpus_npus_and_cpus(self) -> None:
        assert resources_for(_device("cuda:0", "gpu")) == {"num_cpus": 0, "num_gpus": 1.0}
        npu = resources_for(_device("ascend:0", "npu", name="Ascend 910B"))
        assert npu == {"num_cpus": 0, "resources": {"NPU": 1.0}, "accelerator_type": "Ascend910B"}
        assert resources_for(_device("ort:cpu", "cpu")) == {"num_cpus": 1}


def test_neither_import_hal_nor_import_hal_ray_imports_ray() -> None:
    code = "import sys, hal, hal.ray; hal.devices(); assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class TestFleet:
    def test_lists_every_nodes_devices_with_its_node(self, fleet: Any, cluster: Any) -> None:
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        by_node: dict[str, set[str]] = {}
        for d in fleet.devices:
            assert isinstance(d, FleetDevice)
            assert d.id == f"ray:{d.node[:8]}:{d.device.id}"
            by_node.setdefault(d.node, set()).add(d.device.id)
        assert set(by_node) == nodes
        listed = sorted(sorted(ids) for ids in by_node.values())
        assert listed == [["ort:cpu", "sim:ascend-910c:0", "sim:h100:0"], ["ort:cpu", "sim:h100:0"]]

    def test_auto_places_one_verified_actor_per_chip_answering_as_ort_cpu(self, fleet: Any, mlp: Any) -> None:
        with fleet.to(mlp, devices="auto") as exe:
            described = exe.describe()
            assert sorted(d["id"].split(":", 2)[2] for d in described) == ["sim:ascend-910c:0", "sim:h100:0", "sim:h100:0"]
            assert len({d["node"] for d in described}) == 2
            assert all("matches" in d["verified"] for d in described)
            assert exe.inputs == mlp.inputs and exe.outputs == mlp.outputs
            for seed in range(6):  # in turn: every actor answers some
                feeds = mlp.feeds(seed)
                out = exe.run(feeds)
                np.testing.assert_array_equal(out["y"], mlp.answer(feeds)["y"])
            assert all(s.served == 2 for s in exe.stats().values())

    def test_a_device_id_means_that_device_on_every_node(self, fleet: Any, mlp: Any) -> None:
        with fleet.to(mlp, devices=["sim:ascend-910c:0"]) as exe:
            assert [d.id.split(":", 2)[2] for d in exe.devices] == ["sim:ascend-910c:0"]

    def test_bad_requests_name_the_problem_and_reach_no_actor(self, fleet: Any, mlp: Any) -> None:
        with pytest.raises(InputError, match="no node of the fleet lists a device 'sim:b200:0'"):
            fleet.to(mlp, devices=["sim:b200:0"])
        with fleet.to(mlp, devices=["sim:ascend-910c:0"]) as exe:
            with pytest.raises(InputError, match="input 'x'"):
                exe.run({"x": np.zeros((3, 64), np.float32)})
            assert exe.totals()["requests"] == 0

    def test_a_device_that_cannot_take_the_model_is_left_out(self, fleet: Any, mlp: Any) -> None:
        # Resources no node offers: the actor never starts, and the error says what was asked.
        with pytest.raises(CompileError, match="no device of the fleet could take.*hal_sim_nothing.*ray start --resources"):
            fleet.to(mlp, devices=["sim:ascend-910c:0"], resources={"sim:ascend-910c:0": {"num_cpus": 0, "resources": {"hal_sim_nothing": 1}}},
                     placement_timeout_s=5)


def _load(exe: Any, mlp: Any, threads: int, per_thread: int, during: Any) -> tuple[dict[int, Any], list[BaseException]]:
    """``threads`` threads each send ``per_thread`` requests (distinct feeds); ``during()`` runs
    once a third of them are answered. Returns every answer by request seed, and the errors."""
    answers: dict[int, Any] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    third = threading.Event()

    def send(t: int) -> None:
        for i in range(per_thread):
            seed = t * per_thread + i
            try:
                out = exe.run(mlp.feeds(seed))
            except BaseException as exc:  # noqa: BLE001 - counted as lost
                with lock:
                    errors.append(exc)
                continue
            with lock:
                assert seed not in answers
                answers[seed] = out
                if len(answers) >= threads * per_thread // 3:
                    third.set()

    workers = [threading.Thread(target=send, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    assert third.wait(120)
    during()
    for w in workers:
        w.join(300)
    return answers, errors


class TestFailover:
    THREADS, PER_THREAD = 6, 40

    def _check(self, exe: Any, mlp: Any, answers: dict[int, Any], errors: list[BaseException]) -> None:
        total = self.THREADS * self.PER_THREAD
        assert not errors, errors[:3]
        assert sorted(answers) == list(range(total))  # none lost
        assert exe.totals() == {"requests": total, "answered": total, "failed": 0}  # none twice
        for seed, out in answers.items():
            np.testing.assert_array_equal(out["y"], mlp.answer(mlp.feeds(seed))["y"])

    def test_killing_one_nodes_actors_mid_load_loses_nothing(self, fleet: Any, mlp: Any, cluster: Any) -> None:
        with fleet.to(mlp, devices="auto", deadline_s=60) as exe:
            worker = next(n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])
            doomed = [m for m in exe.describe() if m["node"] == worker["NodeID"]]
            assert len(doomed) == 2

            def kill() -> None:
                for m in doomed:
                    ray.kill(exe.actors[m["id"]], no_restart=False)  # Ray restarts them

            answers, errors = _load(exe, mlp, self.THREADS, self.PER_THREAD, kill)
            self._check(exe, mlp, answers, errors)
            stats = exe.stats()
            assert sum(stats[m["id"]].failed for m in doomed) >= 1
            assert sum(s.retried for s in stats.values()) >= 1
            # Ray restarted the killed actors: after the breakers' cool-down they answer again.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                exe.run(mlp.feeds(0))
                if all(exe.stats()[m["id"]].breaker == "closed" for m in doomed):
                    break
                time.sleep(0.5)
            assert all(exe.stats()[m["id"]].breaker == "closed" for m in doomed)

    def test_a_node_failing_mid_load_loses_nothing(self, fleet: Any, mlp: Any, cluster: Any) -> None:
        node = cluster.add_sim_node("h100", {"hal_sim_h100": 1})
        cluster.wait_for_nodes()
        fleet.refresh()
        # The H100 of every node: no free hal_sim_h100 is left, so Ray cannot restart the lost
        # node's actor elsewhere and its requests must fail over.
        with fleet.to(mlp, devices=["sim:h100:0"], deadline_s=15) as exe:
            lost = next(m["id"] for m in exe.describe() if m["node"] == node.node_id)
            answers, errors = _load(exe, mlp, self.THREADS, self.PER_THREAD, lambda: cluster.remove_node(node, allow_graceful=False))
            self._check(exe, mlp, answers, errors)
            assert sum(s.served for s in exe.stats().values()) == self.THREADS * self.PER_THREAD
            # The lost node's actor process can outlive its raylet for a moment and keep
            # answering; once it is gone its requests fail over, and every answer stays right.
            deadline = time.monotonic() + 60
            seed = 10_000
            while exe.stats()[lost].failed == 0 and time.monotonic() < deadline:
                feeds = mlp.feeds(seed)
                np.testing.assert_array_equal(exe.run(feeds)["y"], mlp.answer(feeds)["y"])
                seed += 1
            assert exe.stats()[lost].failed >= 1
        # Leave the cluster as the other tests know it: wait until Ray has marked the node dead.
        deadline = time.monotonic() + 90
        while node.node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]} and time.monotonic() < deadline:
            time.sleep(1)
        fleet.refresh()


class TestHungActors:
    def test_a_hung_actor_is_killed_ray_restarts_it_and_nothing_is_lost(self, fleet: Any, mlp: Any) -> None:
        from hal.pool import BreakerSettings

        # The H100s' actors hang on every request (hal-sim's injected fault, for their processes
        # only; verify=False: placement would hang too); the 910C answers.
        h100 = next(d.device for d in fleet.devices if d.device.id == "sim:h100:0")
        hanging = {**resources_for(h100), "runtime_env": {"env_vars": {"HAL_SIM_FAULTS": "h100:hang=1,hang_s=600"}}}
        with fleet.to(mlp, devices=["sim:h100:0", "sim:ascend-910c:0"], resources={"sim:h100:0": hanging},
                      verify=False, deadline_s=6, breaker=BreakerSettings(failures=2, cool_down_s=120)) as exe:
            hung = [m["id"] for m in exe.describe() if m["id"].endswith("sim:h100:0")]
            assert len(hung) == 2
            pids = {name: ray.get(exe.actors[name].describe.remote(), timeout=60)["pid"] for name in hung}
            for seed in range(10):
                feeds = mlp.feeds(seed)
                np.testing.assert_array_equal(exe.run(feeds)["y"], mlp.answer(feeds)["y"])
            stats = exe.stats()
            assert all(stats[name].timed_out == 2 and stats[name].breaker == "open" for name in hung)
            assert exe.restarts() == {**dict.fromkeys(hung, 1), next(m for m in exe.actors if m not in hung): 0}
            # A new process each: the stuck one's threads would still hold the old (for 600 s).
            for name in hung:
                assert _pid_once_restarted(exe.actors[name]) != pids[name]
            assert exe.totals() == {"requests": 10, "answered": 10, "failed": 0}


def _pid_once_restarted(actor: Any) -> int:
    """The actor's process id, once Ray has restarted it (calls fail while it restarts)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return ray.get(actor.describe.remote(), timeout=60)["pid"]
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class TestExternalWeights:
    def test_a_model_with_external_weights_ships_with_them(self, fleet: Any, mlp: Any, tmp_path: Any) -> None:
        import onnx

        from hal.testing import models

        proto = models.mlp(batch=4, width=64, layers=2)  # the session's mlp, its weights in a file
        onnx.save_model(proto, tmp_path / "mlp.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                        location="mlp.onnx.data", size_threshold=0)
        compiled = hal.compile(tmp_path / "mlp.onnx")
        assert compiled.model.weights is not None
        shipment = hal.ray.ship(compiled)
        assert shipment.data is not None and shipment.data.nbytes >= 2 * 64 * 64 * 4
        with pytest.raises(InputError, match=r"hal.ray.ship"):
            hal.ray.model_bytes(compiled)
        with fleet.to(compiled, devices=["sim:ascend-910c:0", "sim:h100:0"]) as exe:
            assert all("matches" in d["verified"] for d in exe.describe())
            for seed in range(6):
                feeds = mlp.feeds(seed)
                np.testing.assert_array_equal(exe.run(feeds)["y"], mlp.answer(feeds)["y"])
            assert all(s.served == 2 for s in exe.stats().values())
