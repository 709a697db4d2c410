"""Failover over simulated chips with injected faults: every request answered once, equal to
ort:cpu's answer; and the crash fault, which ends the process a device runs in (isolated here)."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np

import hal
from hal.errors import FailoverError
from hal.testing.models import mlp
from hal_sim.faults import fault_for
from hal_sim.settings import FaultSpec, parse_faults

FAULTS = (
    "ascend-910c:error=0.05,hang=0.05,nan=0.05,hang_s=2,die_after=150;"
    "h100:error=0.05,hang=0.05,nan=0.05,hang_s=2"
)


def _feeds(exe, rid: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rid)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32) for i in exe.inputs}


class TestCrashFault:
    def test_parsed_and_drawn_last(self):
        assert parse_faults("h100:crash=0.25") == {"h100": {"crash": 0.25}}
        spec = FaultSpec(crash=1.0)
        assert spec.describe() == "crash=1" and spec.any
        assert fault_for(0, "sim:h100:0", 3, spec) == "crash"
        # crash is cut from [0, 1) after the others: adding it moves no error, hang, nan or slow
        old = FaultSpec(error=0.2, nan=0.2)
        new = FaultSpec(error=0.2, nan=0.2, crash=0.3)
        for k in range(200):
            if fault_for(0, "d", k, old) is not None:
                assert fault_for(0, "d", k, new) == fault_for(0, "d", k, old)

    def test_an_isolated_device_that_crashes_fails_over_and_the_host_lives(self, sim):
        sim(HAL_SIM_DEVICES="h100", HAL_SIM_FAULTS="h100:crash=0.2")
        compiled = hal.compile(mlp(batch=2, width=16, layers=2))
        pool = compiled.to(["sim:h100:0", "ort:cpu"], isolate=["sim:h100:0"], verify=False, deadline_s=60,
                           breaker=hal.BreakerSettings(failures=1000))
        reference = compiled.to("ort:cpu")
        for rid in range(20):
            feeds = _feeds(pool, rid)
            np.testing.assert_array_equal(pool.run(feeds)["y"], reference.run(feeds)["y"])
        runner = pool.executables[0].runner
        h100 = pool.stats()["sim:h100:0"]
        assert h100.failed >= 1 and "exit code 70" in h100.last_error
        assert runner.crashes >= 1 and h100.served >= 1
        pool.close()


class TestLoad:
    def test_faulty_chips_lose_nothing_and_answer_as_the_cpu_does(self, sim):
        sim(HAL_SIM_DEVICES="h100,ascend-910c", HAL_SIM_FAULTS=FAULTS)
        compiled = hal.compile(mlp(batch=2, width=16, layers=2))
        pool = compiled.to(["sim:ascend-910c:0", "sim:h100:0", "ort:cpu"], verify=False, deadline_s=3.0,
                           breaker=hal.BreakerSettings(failures=3, cool_down_s=0.2))
        reference = compiled.to("ort:cpu")
        delivered: Counter[int] = Counter()
        problems: list[str] = []
        lock = threading.Lock()

        def client(thread: int) -> None:
            for i in range(40):
                rid = thread * 1000 + i
                feeds = _feeds(pool, rid)
                try:
                    out = pool.run(feeds)["y"]
                except FailoverError as exc:
                    problems.append(str(exc))
                    continue
                ok = np.array_equal(out, reference.run(feeds)["y"])
                with lock:
                    delivered[rid] += 1
                    if not ok:
                        problems.append(f"request {rid} answered differently")

        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not problems
        assert len(delivered) == 320 and set(delivered.values()) == {1}
        stats = pool.stats()
        assert sum(s.served for s in stats.values()) == 320
        assert stats["sim:ascend-910c:0"].failed > 0 and stats["sim:h100:0"].failed > 0
        assert "device died" in (stats["sim:ascend-910c:0"].last_error or "") or stats["sim:ascend-910c:0"].breaker != "closed"
