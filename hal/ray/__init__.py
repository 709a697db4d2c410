"""A fleet of chips on Ray: every node's HAL devices, one model placed on many, failover between them.

    import hal, hal.ray

    fleet = hal.ray.Fleet()                       # this process's Ray session, or ray.init(address)
    for d in fleet.devices:                       # every node's hal.devices(), with its node
        print(d.id, d.device.name, d.host)
    exe = fleet.to(hal.compile("model.onnx"), devices="auto", replicas=1)
    outputs = exe.run({"x": x})                   # as Executable.run, with failover across actors

Install with ``pip install 'onnx-hal[ray]'``. Neither ``import hal`` nor ``import hal.ray`` imports Ray;
the first fleet does. Ray schedules each device's actor by the resources it needs (:func:`resources_for`): a node
offers simulated chips by advertising them, ``HAL_SIM_DEVICES=h100 ray start --head
--resources='{"hal_sim_h100": 1}'``.
"""

from __future__ import annotations

from hal.ray._fleet import Fleet, FleetDevice, FleetExecutable, Shipment, model_bytes, resources_for, ship

__all__ = ["Fleet", "FleetDevice", "FleetExecutable", "Shipment", "model_bytes", "resources_for", "ship"]
