"""A Ray cluster of two nodes for the session, started here: a head and one worker in this
machine (Ray's own ``ray.cluster_utils.Cluster``), one CPU each, each node with its own simulated
chips (``HAL_SIM_DEVICES`` in the node's environment) and the custom resources that advertise them.

    head    HAL_SIM_DEVICES=h100               resources hal_sim_h100: 1
    worker  HAL_SIM_DEVICES=h100,ascend-910c   resources hal_sim_h100: 1, hal_sim_ascend_910c: 1

Not collected where Ray, hal-sim or tritonclient is not installed (the other tox environments collect ``tests/``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hal
from hal.testing import models

sys.path.append(str(Path(__file__).parent))  # tests_ray_helpers; appended: never shadows another `conftest`

# Other environments collect tests/ too: without Ray (or hal-sim, or tritonclient) these tests
# are not collected at all (a skip raised while a conftest loads would stop the whole session).
_NEEDS = ("ray", "hal_sim", "tritonclient")
if any(importlib.util.find_spec(name) is None for name in _NEEDS):
    collect_ignore_glob = ["test_*.py"]

#: Small: the session starts its own Ray nodes on a shared 2-core machine.
STORE_BYTES = 80 * 2**20


def node_env(cache: Path, devices: str) -> dict[str, str]:
    return {"HAL_LOAD_PLUGINS": "sim", "HAL_SIM_DEVICES": devices, "HAL_CACHE_DIR": str(cache), "HAL_SIM_FAULTS": ""}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    cache = tmp_path_factory.mktemp("hal-cache")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    head = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1, "resources": {"hal_sim_h100": 1}, "env_vars": node_env(cache, "h100"),
            "object_store_memory": STORE_BYTES, "include_dashboard": False,
        },
    )
    try:
        head.add_node(
            num_cpus=1, resources={"hal_sim_h100": 1, "hal_sim_ascend_910c": 1},
            env_vars=node_env(cache, "h100,ascend-910c"), object_store_memory=STORE_BYTES,
        )
        head.wait_for_nodes()
        ray.init(address=head.address, log_to_driver=False)
        head.cache = cache  # type: ignore[attr-defined]
        head.add_sim_node = lambda devices, resources, cpus=0: head.add_node(  # type: ignore[attr-defined]
            num_cpus=cpus, resources=resources, env_vars=node_env(cache, devices), object_store_memory=STORE_BYTES,
        )
        yield head
    finally:
        ray.shutdown()
        head.shutdown()


@pytest.fixture(scope="session")
def fleet(cluster: Any) -> Any:
    import functools

    import hal.ray

    fleet = hal.ray.Fleet()
    # A test that cannot place fails in minutes, not after the default 600 s per placement.
    fleet.to = functools.partial(fleet.to, placement_timeout_s=180)  # type: ignore[method-assign]
    return fleet


@pytest.fixture(scope="session")
def mlp() -> Any:
    """A small float32 MLP, compiled, and ``answer(feeds)``: ort:cpu's outputs in this process."""
    proto = models.mlp(batch=4, width=64, layers=2)
    compiled = hal.compile(proto)
    reference = compiled.to("ort:cpu")
    compiled.answer = reference.run  # type: ignore[attr-defined]
    compiled.feeds = lambda seed: {"x": np.random.default_rng(seed).standard_normal((4, 64), dtype=np.float32)}  # type: ignore[attr-defined]
    return compiled
