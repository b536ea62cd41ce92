"""Benchmark helpers: request traces replayed against the engine."""

from s3jax.bench.trace import Trace, load_trace

__all__ = ["Trace", "load_trace"]
