"""Whole workloads against the fake engine: every token delivered once, budget kept, no starvation."""

import math
import random

import pytest
from sched_fake_engine import FakeEngine, run

from s3jax.scheduler import (
  AdmissionOrder,
  Admit,
  LengthDist,
  Policy,
  PrefillChunk,
  SchedRequest,
  Scheduler,
  SchedulerConfig,
)

KV_BYTES = 3  # classes 16, 32, 64, 128 in pages of 8 tokens


def make(policy, budget_tokens=512, classes_per_doubling=1, **kw):
  if policy is Policy.CONSTANT:
    kw.setdefault("constant_output_len", 8)
  cfg = SchedulerConfig(
    policy=policy,
    memory_budget_bytes=budget_tokens * KV_BYTES,
    min_cache_len=16,
    page_size=8,
    classes_per_doubling=classes_per_doubling,
    **kw,
  )
  sched = Scheduler(cfg, kv_bytes_per_token=KV_BYTES, max_len=128)
  return sched, FakeEngine(sched)


def workload(seed, n=60, predictor="smallest"):
  """``n`` requests over 30 steps; true lengths fit the model max (no truncation)."""
  rng = random.Random(seed)
  arrivals = {}
  for rid in range(n):
    prompt = rng.randint(1, 24)
    true_len = rng.choice([rng.randint(1, 12), rng.randint(1, 128 - prompt)])
    max_tokens = rng.choice([true_len, rng.randint(true_len, 128 - prompt)])
    if predictor == "smallest":  # far short of most answers, and sure of it
      predicted, length = 1, LengthDist(math.log(2), 0.1)
    else:
      predicted, length = true_len, LengthDist.exact(true_len)
    req = SchedRequest(
      rid,
      prompt_len=prompt,
      max_tokens=max_tokens,
      predicted_output_len=predicted,
      predicted_length=length,
      true_output_len=true_len,
    )
    arrivals.setdefault(rng.randint(0, 30), []).append((req, true_len))
  return arrivals


SYSTEMS = [(p, None) for p in Policy] + [
  (Policy.S3_RESERVE, AdmissionOrder.SHORTEST_FIRST),
  (Policy.S3, AdmissionOrder.FCFS),
  (Policy.MAX, AdmissionOrder.FCFS),
]


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("policy, order", SYSTEMS)
@pytest.mark.parametrize("seed, prefix_caching", [(seed, seed % 2 == 1) for seed in range(6)])
def test_every_request_gets_exactly_its_tokens(policy, order, seed, prefix_caching, depth):
  """With prefix caching on (odd seeds; every prompt starts alike) the fake engine also checks that
  every cached page read holds the reader's tokens and that no shared page is written."""
  sched, engine = make(policy, admission_order=order)
  arrivals = workload(seed)
  run(sched, engine, arrivals, depth=depth, prefix_caching=prefix_caching)
  for job in engine.jobs.values():
    assert job.done and not job.cancelled
    assert job.output == list(range(job.true_len)), job.req
  assert engine.peak_pages <= sched.layout.num_pages  # also asserted after every op
  assert engine.peak_bytes <= sched.config.memory_budget_bytes
  stats = sched.stats
  assert stats.finished == len(engine.jobs) and not sched.has_work and sched.plans_in_flight == 0
  assert sched.used_bytes == 0 and sched.reserved_bytes == 0  # every page back
  assert (stats.cached_tokens > 0 and sched.cached_pages > 0) == prefix_caching  # cached pages stay, free
  if policy in (Policy.S3_RESERVE, Policy.CONSTANT):  # 1 and 8 tokens underestimate most lengths
    assert stats.grows > 0 and stats.mispredictions > 0
  elif policy in (Policy.MAX, Policy.ORACLE):
    # Worst-case lengths fit, and the oracle's peak forecast is exact: it never evicts.
    assert stats.grows == stats.preemptions == stats.mispredictions == 0
  elif policy is Policy.S3:
    assert stats.grows == 0 and stats.mispredictions > 0


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("policy, order", SYSTEMS)
@pytest.mark.parametrize("max_prefill_tokens, prefix_caching", [(5, False), (16, False), (5, True)])
def test_chunked_prefill_delivers_every_token_within_the_budget(
  policy, order, max_prefill_tokens, prefix_caching, depth
):
  """Prompts (and resumed sequences) prefilled at most ``max_prefill_tokens`` a step, one in chunks
  at a time: every token once, pages and budget kept after every op (the fake engine checks each
  chunk's pages and positions), and never more prompt tokens in a step than the limit."""
  sched, engine = make(policy, admission_order=order, max_prefill_tokens=max_prefill_tokens)

  def on_step(step, plan):
    prefilled = 0
    for op in plan.ops:
      if isinstance(op, PrefillChunk):
        prefilled += op.end - op.start
      elif isinstance(op, Admit):
        prefilled += len(engine.jobs[op.request_id].sequence) - 1 - op.start  # on_step runs after its token
    assert prefilled <= max_prefill_tokens, plan
    assert sum(isinstance(op, PrefillChunk) for op in plan.ops) <= 1, plan

  run(sched, engine, workload(1), depth=depth, on_step=on_step, prefix_caching=prefix_caching)
  for job in engine.jobs.values():
    assert job.done and not job.cancelled and job.output == list(range(job.true_len)), job.req
  assert sched.stats.prefill_chunks > 0 and not engine.chunked
  assert (sched.stats.cached_tokens > 0) == prefix_caching
  assert sched.used_bytes == 0 and sched.reserved_bytes == 0


def test_a_prompt_cancelled_between_its_chunks_gives_back_its_row_and_pages():
  sched, engine = make(Policy.ON_DEMAND, max_prefill_tokens=4)
  req = SchedRequest(0, prompt_len=20, max_tokens=5)
  engine.add(req, 5)
  sched.submit(req)
  for _ in range(2):
    plan = sched.schedule()
    engine.execute(plan)
    assert not plan.expected_tokens and engine.chunked[0][1] == 4 * (engine.step)
  sched.cancel(0)
  engine.execute(sched.schedule())
  assert not engine.chunked and not engine.readers and sched.used_bytes == 0 and not sched.has_work


@pytest.mark.parametrize("classes_per_doubling", [1, 16])
@pytest.mark.parametrize("depth", [0, 1])
def test_bad_predictor_under_pressure_preempts_and_still_completes(depth, classes_per_doubling):
  totals = {"preemptions": 0, "resumes": 0}
  for seed in range(8):
    sched, engine = make(Policy.S3_RESERVE, budget_tokens=256, classes_per_doubling=classes_per_doubling)
    run(sched, engine, workload(seed, n=80), depth=depth)
    assert all(job.output == list(range(job.true_len)) for job in engine.jobs.values())
    totals["preemptions"] += sched.stats.preemptions
    totals["resumes"] += sched.stats.resumes
    assert sched.stats.recomputed_tokens >= sched.stats.resumes
  assert totals["preemptions"] > 0
  # One step behind, a request may be preempted in the plan after the one that ended it: it is
  # then never resumed. In step, every preempted request resumes.
  if depth:
    assert totals["resumes"] <= totals["preemptions"]
  else:
    assert totals["preemptions"] == totals["resumes"]


def plans_of(policy, seed, predictor):
  sched, engine = make(policy)
  trace = []
  run(sched, engine, workload(seed, predictor=predictor), on_step=lambda step, plan: trace.append(plan))
  return trace


@pytest.mark.parametrize("seed", range(4))
def test_s3_with_a_perfect_predictor_schedules_like_oracle(seed):
  s3 = plans_of(Policy.S3, seed, predictor="perfect")
  oracle = plans_of(Policy.ORACLE, seed, predictor="perfect")
  assert s3 == oracle  # the same forecasts, so the same plans, step for step
  worst = plans_of(Policy.MAX, seed, predictor="perfect")
  assert len(s3) <= len(worst)  # and it finishes no later than reserving the worst case

  def peak_running(trace):
    return max(len(plan.rows) for plan in trace)

  assert peak_running(s3) >= peak_running(worst)


class SpyRequest:
  """A request whose forbidden fields fail the test when read."""

  def __init__(self, forbidden, **fields):
    self._forbidden, self._fields = forbidden, fields

  def __getattr__(self, name):
    if name in self._forbidden:
      raise AssertionError(f"the policy read {name}")
    return self._fields[name]


HINTS = {"predicted_output_len", "predicted_length", "true_output_len"}


@pytest.mark.parametrize(
  "policy, forbidden",
  [
    (Policy.MAX, HINTS),
    (Policy.CONSTANT, HINTS),
    (Policy.ON_DEMAND, HINTS),
    (Policy.ADAPTIVE, HINTS),
    (Policy.S3_RESERVE, {"predicted_length", "true_output_len"}),
    (Policy.S3, {"true_output_len"}),
    (Policy.ORACLE, {"predicted_output_len", "predicted_length"}),
  ],
)
def test_policies_read_only_their_own_hints(policy, forbidden):
  sched, engine = make(policy)
  arrivals = {
    step: [
      (
        SpyRequest(
          forbidden,
          request_id=r.request_id,
          prompt_len=r.prompt_len,
          max_tokens=r.max_tokens,
          predicted_output_len=r.predicted_output_len,
          predicted_length=r.predicted_length,
          true_output_len=r.true_output_len,
          page_hashes=r.page_hashes,
        ),
        t,
      )
      for r, t in reqs
    ]
    for step, reqs in workload(0).items()
  }
  run(sched, engine, arrivals)
  assert all(job.output == list(range(job.true_len)) for job in engine.jobs.values())


def starvation_run(limit, steps=150, admissions=16):
  """Three 4-token requests per step keep class 8 busy; one long request needs the whole budget."""
  cfg = SchedulerConfig(
    policy=Policy.S3_RESERVE,
    memory_budget_bytes=64,
    min_cache_len=8,
    page_size=8,
    classes_per_doubling=1,
    starvation_limit=limit,
    max_admissions_per_step=admissions,
  )
  sched = Scheduler(cfg, kv_bytes_per_token=1, max_len=64)
  engine = FakeEngine(sched)
  arrivals = {}
  rid = 0
  for step in range(steps):
    for _ in range(3):
      arrivals.setdefault(step, []).append((SchedRequest(rid, 2, 4, predicted_output_len=4), 4))
      rid += 1
  long_id = 10**6
  arrivals[1].append((SchedRequest(long_id, 2, 40, predicted_output_len=40), 40))
  became_head = []

  def watch(step, plan):
    if sched.head_of_line == long_id and not became_head:
      became_head.append(step)  # head-of-line from the next step's schedule on

  run(sched, engine, arrivals, on_step=watch)
  return sched, engine.jobs[long_id], became_head


def test_without_the_limit_the_long_request_starves():
  sched, job, _ = starvation_run(limit=10**9)
  assert job.admitted_step > 150  # admitted only once the stream of short requests dries up
  assert sched.stats.max_bypass > 100


@pytest.mark.parametrize("limit, admissions", [(0, 16), (5, 16), (20, 2)])
def test_starvation_bound(limit, admissions):
  sched, job, became_head = starvation_run(limit, admissions=admissions)
  assert job.output == list(range(40))
  # Bypassed at most L + max_admissions_per_step times...
  assert sched.stats.max_bypass <= limit + admissions
  # ...then admitted within U + 1 steps of becoming head-of-line (U = 64 here).
  assert became_head and job.admitted_step - (became_head[0] + 1) <= sched.layout.usable_cache_lens[-1] + 1
  # Here the short requests drain in at most 4 steps (their length), so it is far quicker.
  assert job.admitted_step - became_head[0] <= 5
  assert sched.stats.head_of_line_admissions >= 1
