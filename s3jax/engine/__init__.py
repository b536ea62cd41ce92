"""The device side of s3jax: bucketed KV arenas driven by the host scheduler."""

from s3jax.engine.config import EngineConfig
from s3jax.engine.engine import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Engine, EngineRequest
from s3jax.engine.metrics import EngineMetrics

__all__ = ["Engine", "EngineConfig", "EngineMetrics", "EngineRequest", "FINISH_CANCELLED", "FINISH_LENGTH",
           "FINISH_STOP"]
