"""The predictor-free peers and s3 v3, decision by decision on hand-built cases.

Every scheduler here counts one byte per token and pages of 4 tokens, so a budget of B bytes is
B // 4 pages, and a prompt of 4 tokens takes one page.
"""

import math

import pytest
from sched_fake_engine import FakeEngine, run

from s3jax.scheduler import (
  AdmissionOrder,
  Admit,
  LengthDist,
  Policy,
  Preempt,
  SchedRequest,
  Scheduler,
  SchedulerConfig,
)
from s3jax.scheduler import adaptive as sglang
from s3jax.scheduler.eviction import VictimCandidate, fewest_generated_first, least_waste_first, newest_first


def make(policy, pages, max_len=64, **kw):
  if policy is Policy.CONSTANT:
    kw.setdefault("constant_output_len", 1)
  kw.setdefault("max_slots", 8)
  cfg = SchedulerConfig(
    policy=policy, memory_budget_bytes=4 * pages, min_cache_len=8, page_size=4, classes_per_doubling=1, **kw
  )
  sched = Scheduler(cfg, kv_bytes_per_token=1, max_len=max_len)
  return sched, FakeEngine(sched)


def step(sched, engine, arrivals=()):
  """One plan, executed and reported back at once (pipeline depth 0)."""
  for req, true_len in arrivals:
    engine.add(req, true_len)
    sched.submit(req)
  plan = sched.schedule()
  result = engine.execute(plan)
  if plan.expected_tokens:
    sched.update(result)
  return plan


def kinds(plan):
  return [(type(op).__name__, op.request_id) for op in plan.ops]


# ---- on-demand (vLLM v1) ----


def test_on_demand_evicts_the_newest_and_admits_nothing_in_that_step():
  sched, engine = make(Policy.ON_DEMAND, pages=4)
  reqs = [(SchedRequest(rid, prompt_len=4, max_tokens=12), 12) for rid in range(4)]
  plan = step(sched, engine, reqs)
  assert [op.pages for op in plan.ops] == [(0,), (1,), (2,), (3,)]  # FCFS, the prompt's page each
  # Step 1: every row writes position 4, a new page each, and none is free. vLLM preempts
  # running.pop() until the rest fit: request 3 (its own need goes with it), then 2.
  late = (SchedRequest(9, prompt_len=1, max_tokens=5), 5)
  plan = step(sched, engine, [late])
  assert kinds(plan) == [("Preempt", 3), ("Preempt", 2)]
  assert sorted((g.request_id, g.page) for g in plan.grants) == [(0, 2), (1, 3)]  # the freed pages
  assert sched.state(9).value == "waiting"  # admitted nothing in a step that preempted
  # Prepended to the waiting queue: the last one preempted (2) is first, then 3, then the new 9.
  assert [s.req.request_id for s in sched._resumes] == [2, 3]
  run(sched, engine, {})
  assert all(job.output == list(range(job.true_len)) for job in engine.jobs.values())


def test_on_demand_admission_stops_at_the_first_prompt_that_does_not_fit():
  sched, engine = make(Policy.ON_DEMAND, pages=4)
  plan = step(
    sched,
    engine,
    [
      (SchedRequest(0, prompt_len=8, max_tokens=4), 4),  # 2 pages
      (SchedRequest(1, prompt_len=12, max_tokens=4), 4),  # 3 pages: does not fit in the other 2
      (SchedRequest(2, prompt_len=4, max_tokens=4), 4),  # would fit, but waits behind 1 (FCFS)
    ],
  )
  assert kinds(plan) == [("Admit", 0)]


# ---- adaptive (SGLang) ----


def test_sglang_ratio_decays_per_decode_step_and_jumps_back_after_a_retraction():
  ratio = sglang.NewTokenRatio()
  assert ratio.value == 0.7
  for _ in range(300):
    ratio.decay()
  assert ratio.value == pytest.approx(0.7 - 300 * (0.7 - 0.098) / 600)
  for _ in range(1000):
    ratio.decay()
  assert ratio.value == pytest.approx(0.098)  # the floor, 0.14 x 0.7
  # After a retraction: min(1, (generated + 20 x running) / (sum of max_tokens + 1)).
  ratio.after_retraction(generated=100, max_tokens=999, running=5)
  assert ratio.value == pytest.approx((100 + 20 * 5) / 1000)
  ratio.after_retraction(generated=900, max_tokens=999, running=5)
  assert ratio.value == 1.0
  assert ratio.running_charge(max_tokens=5000, generated=0) == 4096  # clipped at 4096, x 1.0
  # A new request needs its prefill + its clipped max_tokens + a page free, charged whole pages.
  assert sglang.admission_need(prefill_tokens=10, max_tokens=30, generated=0, page_size=4) == 44
  assert sglang.admission_charge(prefill_tokens=10, max_tokens=30, page_size=4) == 12 + 4 + 30


def test_adaptive_admission_charges_running_requests_by_the_ratio():
  sched, engine = make(Policy.ADAPTIVE, pages=13)  # 52 tokens
  # A new request needs prompt + max_tokens + one page free: 4 + 20 + 4 = 28 < 52, then is
  # charged 4 + 4 + 20 = 28 for the rest of the step: the second needs 28 >= 52 - 28, refused.
  plan = step(sched, engine, [(SchedRequest(rid, prompt_len=4, max_tokens=20), 20) for rid in range(3)])
  assert kinds(plan) == [("Admit", 0)]
  # Next step request 0 runs, holding 2 pages, and is charged min(20 - 1, 4096) x 0.69900 = 13.3
  # tokens: 44 - 13.3 = 30.7 free, so request 1 (28) fits, and request 2 no longer does.
  plan = step(sched, engine)
  assert kinds(plan) == [("Admit", 1)]
  assert sched.new_token_ratio == pytest.approx(0.7 - (0.7 - 0.098) / 600)  # one decode step so far


def test_victim_orders_of_the_peers():
  candidates = [
    VictimCandidate(admitted=1, prompt_len=4, generated=5, pages=3),
    VictimCandidate(admitted=2, prompt_len=8, generated=2, pages=3),
    VictimCandidate(admitted=3, prompt_len=4, generated=2, pages=2),
    VictimCandidate(admitted=4, prompt_len=4, generated=2, pages=2),
  ]
  assert newest_first(candidates) == [3, 2, 1, 0]  # vLLM: running.pop()
  # SGLang: the fewest generated first, ties the longest prompt, then the later in the batch.
  assert fewest_generated_first(candidates) == [1, 3, 2, 0]


def test_adaptive_retracts_the_fewest_generated_and_admits_nothing_meanwhile():
  # Every answer runs to its max_tokens, more than the ratio's share of it: once the ratio has
  # decayed for a hundred steps the running requests outgrow the pool, and one is retracted.
  sched, engine = make(Policy.ADAPTIVE, pages=32, max_len=256, max_slots=32)
  arrivals = {0: [(SchedRequest(rid, prompt_len=4 + rid % 3, max_tokens=28), 28) for rid in range(40)]}
  plans = []
  run(sched, engine, arrivals, on_step=lambda s, plan: plans.append(plan))
  first = next(i for i, plan in enumerate(plans) if any(isinstance(op, Preempt) for op in plan.ops))
  victims = [op.request_id for op in plans[first].ops if isinstance(op, Preempt)]
  generated = {}
  for plan in plans[:first]:
    for rid in plan.expected_tokens:
      generated[rid] = generated.get(rid, 0) + 1
  running = [rid for _, rid in plans[first - 1].rows if generated[rid] < 28]
  prompt = lambda rid: engine.jobs[rid].req.prompt_len
  expected = min(running, key=lambda rid: (generated[rid], -prompt(rid)))
  assert victims[0] == expected
  assert not any(isinstance(op, Admit) for op in plans[first].ops)  # nothing admitted while retracting
  assert all(job.output == list(range(job.true_len)) for job in engine.jobs.values())


# ---- s3 and the oracle: peak-aware admission ----


def oracle_requests():
  # One long answer and two short ones, all 4-token prompts. Peak of the pool's use: at step 1
  # each holds 2 pages (6 in all); the short ones end after step 3, and the long one reaches 4
  # pages only at step 11, alone. Reservations: 16 + 8 + 8 tokens = 4 + 2 + 2 pages > 6.
  return [
    (SchedRequest(0, prompt_len=4, max_tokens=12, predicted_output_len=12, true_output_len=12), 12),
    (SchedRequest(1, prompt_len=4, max_tokens=12, predicted_output_len=4, true_output_len=4), 4),
    (SchedRequest(2, prompt_len=4, max_tokens=12, predicted_output_len=4, true_output_len=4), 4),
  ]


@pytest.mark.parametrize("depth", [0, 1])
def test_peak_aware_admission_admits_more_than_the_sum_of_reservations(depth):
  oracle, engine = make(Policy.ORACLE, pages=6, admission_order=AdmissionOrder.FCFS)
  plans = []
  run(oracle, engine, {0: oracle_requests()}, depth=depth, on_step=lambda s, plan: plans.append(plan))
  assert kinds(plans[0]) == [("Admit", 0), ("Admit", 1), ("Admit", 2)]  # all three at once
  assert engine.peak_pages == 6 and oracle.stats.preemptions == 0  # the peak, exactly, and never more
  reserve, engine = make(Policy.S3_RESERVE, pages=6)  # the same lengths, reserved
  plan = step(reserve, engine, oracle_requests())
  assert sorted(rid for _, rid in kinds(plan)) == [0, 1]  # 4 + 2 pages: the third does not fit


def test_peak_aware_admission_keeps_a_margin_for_uncertain_lengths():
  # The same three requests, forecast from distributions instead: a wide one makes the peak uncertain.
  sure = [LengthDist.exact(12), LengthDist.exact(4), LengthDist.exact(4)]
  unsure = [LengthDist(math.log1p(12), 0.8), LengthDist(math.log1p(4), 0.8), LengthDist(math.log1p(4), 0.8)]
  admitted = {}
  for name, dists in (("sure", sure), ("unsure", unsure)):
    sched, engine = make(Policy.S3, pages=6, admission_order=AdmissionOrder.FCFS, admission_risk=0.1)
    arrivals = [(SchedRequest(r.request_id, 4, 12, 12, d), n) for (r, n), d in zip(oracle_requests(), dists)]
    admitted[name] = len(step(sched, engine, arrivals).ops)
  assert admitted["sure"] == 3 and admitted["unsure"] < 3


def test_length_dist_is_conditional_on_what_was_generated():
  d = LengthDist(math.log(101), 0.7)  # median 100 tokens
  assert d.quantile_given(0.5, 0) == 100
  assert d.quantile_given(0.9, 0) > d.quantile_given(0.5, 0)
  # A request that outlived its median is re-predicted beyond what it generated, and the further
  # it goes, the further its prediction goes.
  later = [d.quantile_given(0.5, n) for n in (100, 300, 1000, 100_000)]
  assert all(q > n for q, n in zip(later, (100, 300, 1000, 100_000))) and later == sorted(later)
  assert LengthDist.exact(50).quantile_given(0.9, 10) == 50
  with pytest.raises(ValueError):
    LengthDist(1.0, -0.1)


# ---- s3: the aging bound ----


def aging_run(aging_steps, steps=120):
  """Three 6-token requests arrive every step and keep the 8 rows busy; a 40-token one arrives
  at step 5. Shortest first puts the stream ahead of it, as far as aging lets it."""
  sched, engine = make(Policy.ORACLE, pages=32, aging_steps=aging_steps)
  arrivals = {}
  rid = 0
  for s in range(steps):
    for _ in range(3):
      arrivals.setdefault(s, []).append((SchedRequest(rid, 2, 6, true_output_len=6), 6))
      rid += 1
  long_id = 10**6
  arrivals[5].append((SchedRequest(long_id, 2, 40, true_output_len=40), 40))
  arrived = {req.request_id: s for s, reqs in arrivals.items() for req, _ in reqs}
  admitted = {}

  def watch(s, plan):
    for op in plan.ops:
      if isinstance(op, Admit):
        admitted.setdefault(op.request_id, s)

  run(sched, engine, arrivals, on_step=watch)
  assert all(job.output == list(range(job.true_len)) for job in engine.jobs.values())
  return arrived, admitted, long_id


@pytest.mark.parametrize("aging_steps", [0, 16, 64])
def test_no_request_is_overtaken_by_one_that_arrived_more_than_aging_steps_after_it(aging_steps):
  arrived, admitted, long_id = aging_run(aging_steps)
  start = admitted[long_id]
  overtook = [rid for rid, s in admitted.items() if s < start and arrived[rid] > arrived[long_id]]
  assert all(arrived[rid] <= arrived[long_id] + aging_steps for rid in overtook)
  # And the bound is what it says: short requests that arrived within it did overtake it.
  assert (len(overtook) > 0) == (aging_steps > 0)


def test_without_aging_a_stream_of_short_requests_holds_a_long_one_back():
  arrived, admitted, long_id = aging_run(aging_steps=10**9)
  assert admitted[long_id] >= 119  # only once the stream dries up


# ---- s3: eviction ----


def test_least_waste_evicts_the_cheapest_recompute_per_page_step_never_one_about_to_finish():
  candidates = [
    VictimCandidate(admitted=1, prompt_len=10, generated=990, pages=16, page_steps=16 * 2.0, finishing=True),
    VictimCandidate(admitted=2, prompt_len=10, generated=1990, pages=32, page_steps=32 * 100.0),
    VictimCandidate(admitted=3, prompt_len=90, generated=10, pages=2, page_steps=2 * 300 + 300**2 / 128),
  ]
  # Waste per page-step: 1000 / 32 (but finishing), 2000 / 3200, 100 / 1303: the fresh long one
  # first, then the long-running one; the one about to finish last, whatever its score.
  assert least_waste_first(candidates) == [2, 1, 0]
  assert least_waste_first(candidates[:1] + candidates[1:2]) == [1, 0]


def test_s3_pauses_a_row_instead_of_evicting_it_when_a_sequence_is_about_to_end():
  # A (5-token prompt, 8 tokens) and B (4-token prompt, predicted 2 tokens, truly 5) fill the 4
  # pages from step 1. At step 4 A writes position 8 and needs a third page; B has outlived its
  # prediction, so the forecast has it ending now: A waits a step for B's pages rather than
  # being evicted, and B ends on its 5th token in that step.
  sched, engine = make(Policy.S3, pages=4, max_slots=2, admission_order=AdmissionOrder.FCFS)
  a = SchedRequest(0, prompt_len=5, max_tokens=11, predicted_output_len=8, predicted_length=LengthDist.exact(8))
  b = SchedRequest(1, prompt_len=4, max_tokens=12, predicted_output_len=2, predicted_length=LengthDist.exact(2))
  plans = []
  run(sched, engine, {0: [(a, 8), (b, 5)]}, on_step=lambda s, plan: plans.append(plan))
  assert [bool(plan.held) for plan in plans[:6]] == [False, False, False, False, True, False]
  assert plans[4].held == ((0, 0),) and plans[4].decode == ((1, 1),)
  assert sched.stats.holds == 1 and sched.stats.preemptions == 0
  assert all(job.output == list(range(job.true_len)) for job in engine.jobs.values())
