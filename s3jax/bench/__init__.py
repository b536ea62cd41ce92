"""Benchmark helpers: request traces, the engine replay, its decode ceiling, and peers."""

from s3jax.bench.replay import ReplayRun, StepSample, compare_tokens, replay
from s3jax.bench.trace import Trace, load_trace

__all__ = ["ReplayRun", "StepSample", "Trace", "compare_tokens", "load_trace", "replay"]
