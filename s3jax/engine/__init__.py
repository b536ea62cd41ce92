"""The device side of s3jax: a paged KV pool driven by the host scheduler, one decode call per step."""

from s3jax.engine.config import EngineConfig
from s3jax.engine.engine import Engine
from s3jax.engine.metrics import EngineMetrics
from s3jax.engine.request import EngineOutput, EngineRequest, FinishReason, TokenLogprobs

__all__ = ["Engine", "EngineConfig", "EngineMetrics", "EngineOutput", "EngineRequest", "FinishReason", "TokenLogprobs"]
