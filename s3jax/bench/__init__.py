"""Benchmark helpers: request traces, the engine replay, peers, report tables."""

from s3jax.bench.replay import ModelAnswers, ReplayRun, compare_tokens, replay
from s3jax.bench.trace import Trace, load_trace

__all__ = ["ModelAnswers", "ReplayRun", "Trace", "compare_tokens", "load_trace", "replay"]
