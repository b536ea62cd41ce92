"""What every replay reports, measured by the engine (``s3jax.bench``) or simulated (``s3jax.sim``).

The engine's benchmark and the simulator share these so that their numbers mean the same: one
sample of the engine's state per iteration, latency percentiles as ``vllm bench serve`` reports
them, and goodput as it defines it.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSample:
  """Engine state after one iteration (for plots over time)."""

  t_s: float
  running: int
  waiting: int
  reserved_bytes: int
  used_bytes: int


def latency_percentiles(
  arrived: Sequence[float], first_token: Sequence[float], finished: Sequence[float], tokens: Sequence[int]
) -> dict[str, float]:
  """``{ttft,tpot,e2e,norm}_{mean,p50,p90,p99}_s`` of requests given their times (s) and output tokens.

  TTFT: arrival to first token; TPOT: first token to the end over the tokens after the first
  (``vllm bench serve``'s); e2e: arrival to the end; norm: e2e per output token (vLLM's
  normalized latency, queueing included).
  """
  e2e = [end - start for start, end in zip(arrived, finished)]
  series = {
    "ttft": [first - start for start, first in zip(arrived, first_token)],
    "tpot": [(end - first) / max(n - 1, 1) for first, end, n in zip(first_token, finished, tokens)],
    "e2e": e2e,
    "norm": [t / max(n, 1) for t, n in zip(e2e, tokens)],
  }
  pct = lambda xs, q: statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]
  out = {f"{name}_p{q}_s": pct(xs, q) for name, xs in series.items() for q in (50, 90, 99)}
  return out | {f"{name}_mean_s": statistics.fmean(xs) for name, xs in series.items()}


def goodput(
  arrived: Sequence[float],
  first_token: Sequence[float],
  finished: Sequence[float],
  tokens: Sequence[int],
  duration_s: float,
  slo: dict[str, float],
) -> float:
  """Requests per second that met every SLO in ``slo`` (``ttft``, ``tpot``, ``e2e``: seconds), over
  ``duration_s``: ``vllm bench serve --goodput``'s definition."""
  good = 0
  for start, first, end, n in zip(arrived, first_token, finished, tokens):
    measured = {"ttft": first - start, "tpot": (end - first) / max(n - 1, 1), "e2e": end - start}
    good += all(measured[k] <= limit for k, limit in slo.items())
  return good / duration_s
