"""Benchmark helpers: request traces, the engine replay, peers, report tables."""

from s3jax.bench.replay import ReplayRun, compare_tokens, replay
from s3jax.bench.trace import Trace, load_trace

__all__ = ["ReplayRun", "Trace", "compare_tokens", "load_trace", "replay"]
