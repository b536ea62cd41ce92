"""A simulator of the engine: the same scheduler, a roofline cost model in place of the device.

``simulate`` replays a trace through ``s3jax.scheduler.Scheduler`` exactly as the engine drives
it; ``CostModel`` times each iteration for a model on a device (this CPU, fitted by
``calibrate``; A100 and H100 from data sheets), with pipeline stages across several devices.
"""

from s3jax.sim.cost import A100_80GB, GPUS, H100_80GB, CostModel, DeviceSpec
from s3jax.sim.simulator import SimRequest, SimRun, simulate

__all__ = ["A100_80GB", "GPUS", "H100_80GB", "CostModel", "DeviceSpec", "SimRequest", "SimRun", "simulate"]
