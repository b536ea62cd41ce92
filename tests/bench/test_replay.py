"""The engine replay: offline and with arrivals over time, on the tiny model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from s3jax.bench import load_trace, replay
from s3jax.engine import EngineConfig


@pytest.mark.timing  # submissions within 1 ms of their arrival times
def test_online_replay_submits_each_request_at_its_arrival_and_finishes_all(tiny_runner):
  runner = tiny_runner
  trace = load_trace("alpaca-7b", num_requests=6, seed=0, max_len=runner.cfg.max_seq_len, max_output=12)
  prompt_ids = [
    [int(t) for t in np.random.RandomState(i).randint(0, 50000, n)] for i, n in enumerate(trace.prompt_lens)
  ]
  arrivals = [0.0, 0.0, 0.3, 0.3, 0.6, 0.9]
  # The simulator and engine tests' shapes: the shared runner compiles them once for all three.
  config = EngineConfig.create(policy="oracle", memory_budget=1 << 20, min_cache_len=32, page_size=16)
  start = time.perf_counter()
  run = replay(runner, config, trace, prompt_ids, arrivals_s=arrivals)
  offsets = [r.submitted_at - min(x.submitted_at for x in run.requests) for r in run.requests]
  assert all(o >= a - 1e-3 for o, a in zip(offsets, arrivals))  # never before its arrival
  assert [len(r.output_ids) for r in run.requests] == trace.output_lens.tolist()
  assert run.wall_s >= 0.9 and time.perf_counter() - start >= 0.9
  summary = run.summary()
  assert summary["xla_compilations_in_timed_run"] == 0 and summary["output_tokens"] == sum(trace.output_lens)
  assert {"ttft_p99_s", "tpot_p90_s", "norm_p50_s", "overflow_rate"} <= set(summary)
  assert run.goodput({"ttft": float("inf")}) == summary["requests_per_s"] and run.goodput({"e2e": -1.0}) == 0.0
