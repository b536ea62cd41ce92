"""Overflow, preemption, finishing, cancellation, row packing and submit checks, step by step by hand.

Every scheduler here counts one byte per token and pages of 4 tokens, so a class of 8 reserves
2 pages and a budget of B bytes is B // 4 pages.
"""

import pytest
from sched_fake_engine import FakeEngine, run

from s3jax.errors import QueueFullError
from s3jax.scheduler import (
  Admit,
  Grow,
  MoveRow,
  Policy,
  Preempt,
  Release,
  ReleaseReason,
  RequestState,
  SchedRequest,
  Scheduler,
  SchedulerConfig,
  StepResult,
)

FINISHED, CANCELLED = ReleaseReason.FINISHED, ReleaseReason.CANCELLED


def make(budget, max_len=32, min_cache_len=8, policy=Policy.S3_RESERVE, **kw):
  cfg = SchedulerConfig(
    policy=policy, memory_budget_bytes=budget, min_cache_len=min_cache_len, page_size=4, classes_per_doubling=1, **kw
  )
  sched = Scheduler(cfg, kv_bytes_per_token=1, max_len=max_len)
  return sched, FakeEngine(sched)


def ops_by_step(plans):
  return [(step, op) for step, plan in plans for op in plan.ops]


def collect(plans):
  return lambda step, plan: plans.append((step, plan))


def test_overflow_grows_into_the_next_class_without_copying():
  sched, engine = make(budget=1000)
  # prompt 4 + predicted 2 = 6 -> class 8; the answer is 10 tokens long.
  req = SchedRequest(7, prompt_len=4, max_tokens=20, predicted_output_len=2)
  plans = []
  run(sched, engine, {0: [(req, 10)]}, on_step=collect(plans))
  # Step 0 admits (total 5); steps 1-4 decode to total 9 > 8; step 5 grows before decoding.
  assert ops_by_step(plans) == [(0, Admit(7, 0, (0,), 8)), (5, Grow(7, 0, 8, 16)), (10, Release(7, 0, FINISHED))]
  # Pages are granted as the decodes cross page boundaries: positions 4, 8 and 12.
  assert [(step, g.index, g.page) for step, plan in plans for g in plan.grants] == [(1, 1, 1), (5, 2, 2), (9, 3, 3)]
  assert engine.jobs[7].output == list(range(10))
  stats = sched.stats
  assert (stats.grows, stats.mispredictions, stats.preemptions, stats.recomputed_tokens, stats.finished) == (
    1,
    1,
    0,
    0,
    1,
  )
  assert sum(bool(plan.expected_tokens) for _, plan in plans) == 10  # one token per step, none lost


def test_overflow_without_room_preempts_and_resumes_where_it_left_off():
  # 5 pages: A and B take 2 each; A's growth to class 16 needs 2 more, B's would leave 1.
  sched, engine = make(budget=20, max_len=16)
  a = SchedRequest(0, prompt_len=4, max_tokens=12, predicted_output_len=1)  # 5 -> class 8
  b = SchedRequest(1, prompt_len=4, max_tokens=12, predicted_output_len=1)
  plans = []
  run(sched, engine, {0: [(a, 10)], 2: [(b, 5)]}, on_step=collect(plans))
  # A reaches total 9 in step 4 (5 tokens). At step 5 the free page and A's own two fall short
  # of class 16's four: A is preempted. B ends at step 6 (5 tokens); step 7 releases it, and its
  # pages pay for A's resumption in class 16, whose prefill samples A's token 5; decodes at
  # steps 8-11 give tokens 6-9.
  assert ops_by_step(plans) == [
    (0, Admit(0, 0, (0,), 8)),
    (2, Admit(1, 1, (2,), 8)),
    (5, Preempt(0, 0)),
    (7, Release(1, 1, FINISHED)),
    (7, Admit(0, 0, (0, 1, 2), 16, resume=True)),  # prompt + 5 tokens: 9 positions, 3 pages
    (12, Release(0, 0, FINISHED)),
  ]
  assert engine.jobs[0].output == list(range(10)) and engine.jobs[1].output == list(range(5))
  stats = sched.stats
  assert (stats.preemptions, stats.resumes, stats.recomputed_tokens, stats.mispredictions) == (1, 1, 8, 1)
  assert engine.peak_bytes == 16


def test_max_tokens_releases_without_waiting_for_the_result():
  sched, engine = make(budget=100)
  req = SchedRequest(1, prompt_len=3, max_tokens=1, predicted_output_len=1)
  engine.add(req, 1)
  sched.submit(req)
  plan = sched.schedule()
  assert plan.decode == () and plan.expected_tokens == {1}
  first = engine.execute(plan)
  assert first == StepResult(tokens={1: 0}, finished=frozenset({1}))
  # The next plan is made before the first one's result arrives: max_tokens alone ends it.
  assert sched.schedule().ops == (Release(1, 0, FINISHED),)
  assert not sched.has_work and sched.state(1) is None
  sched.update(first)  # its token arrives late and is accepted
  assert sched.stats.finished == 1 and sched.plans_in_flight == 0


def test_submit_rejects_never_fitting_requests_and_bounds_the_queue():
  sched, _ = make(budget=20, max_waiting=2)  # 5 pages: class 16 (4 pages) is the largest that fits
  with pytest.raises(ValueError, match="exceeds 16 tokens"):
    sched.submit(SchedRequest(0, prompt_len=12, max_tokens=5, predicted_output_len=1))
  with pytest.raises(ValueError):
    sched.submit(SchedRequest(0, prompt_len=0, max_tokens=5, predicted_output_len=1))
  sched.submit(SchedRequest(1, prompt_len=2, max_tokens=5, predicted_output_len=1))
  with pytest.raises(ValueError, match="already"):
    sched.submit(SchedRequest(1, prompt_len=2, max_tokens=5, predicted_output_len=1))
  sched.submit(SchedRequest(2, prompt_len=2, max_tokens=5, predicted_output_len=1))
  with pytest.raises(QueueFullError):
    sched.submit(SchedRequest(3, prompt_len=2, max_tokens=5, predicted_output_len=1))
  sched.schedule()  # admits both: the queue has room again
  sched.submit(SchedRequest(3, prompt_len=2, max_tokens=5, predicted_output_len=1))


def test_cancel_frees_memory_and_rows_in_the_next_plan():
  sched, engine = make(budget=64, max_slots=4, batch_sizes=(2, 4))
  for rid in range(3):
    req = SchedRequest(rid, prompt_len=4, max_tokens=4, predicted_output_len=4)
    engine.add(req, 4)
    sched.submit(req)
  plan = sched.schedule()
  assert sched.reserved_bytes == 24  # three class-8 reservations
  waiting = SchedRequest(9, prompt_len=20, max_tokens=10, predicted_output_len=10)
  sched.submit(waiting)
  sched.cancel(9)
  assert sched.state(9) is None and sched.num_waiting == 0
  sched.cancel(0)  # allowed while a plan is in flight
  sched.cancel(1)
  assert sched.reserved_bytes == 8 and sched.stats.cancelled == 3
  sched.update(engine.execute(plan))  # tokens of cancelled requests are accepted and dropped
  plan = sched.schedule()
  # The releases come first; the survivor in row 2 moves down so that batch size 2 holds it.
  assert plan.ops == (Release(0, 0, CANCELLED), Release(1, 1, CANCELLED), MoveRow(2, 2, 0))
  assert plan.decode == ((0, 2),)
  sched.cancel(0)  # already gone: ignored
  sched.update(engine.execute(plan))


def test_rows_stay_packed_as_sequences_finish():
  sched, engine = make(budget=1000, max_slots=8, batch_sizes=(2, 4, 8))
  lengths = [1, 2, 3, 4, 5, 6, 7, 7]  # eight requests finishing one by one
  for rid, n in enumerate(lengths):
    req = SchedRequest(rid, prompt_len=1, max_tokens=7, predicted_output_len=7)
    engine.add(req, n)
    sched.submit(req)
  shapes = []
  run(
    sched,
    engine,
    {},
    on_step=lambda step, plan: shapes.append((len(plan.rows), max((s for s, _ in plan.rows), default=-1) + 1)),
  )
  # (sequences, rows spanned) per plan: once 4 sequences are left, batch size 4 holds them, so the
  # four in rows 4-7 move down into the rows the finished ones left.
  assert shapes == [(8, 8), (7, 8), (6, 8), (5, 8), (4, 4), (3, 3), (2, 2), (0, 0)]
  assert [op for op in engine.ops_seen if isinstance(op, MoveRow)] == [
    MoveRow(7, 7, 0),
    MoveRow(6, 6, 1),
    MoveRow(5, 5, 2),
    MoveRow(4, 4, 3),
  ]
  assert sched.stats.row_moves == 4


def test_update_checks_the_result_against_the_plan():
  sched, _ = make(budget=100)
  sched.submit(SchedRequest(1, prompt_len=3, max_tokens=5, predicted_output_len=1))
  with pytest.raises(RuntimeError):
    sched.update(StepResult(tokens={}))
  sched.schedule()
  with pytest.raises(ValueError, match="missing"):
    sched.update(StepResult(tokens={}))
  with pytest.raises(ValueError, match="unexpected"):
    sched.update(StepResult(tokens={1: 0, 2: 0}))
  with pytest.raises(ValueError, match="finished"):
    sched.update(StepResult(tokens={1: 0}, finished=frozenset({2})))
  assert sched.plans_in_flight == 1
  sched.update(StepResult(tokens={1: 0}))
  assert sched.state(1) is RequestState.RUNNING and sched.total_len(1) == 4


def test_cancel_a_preempted_request_and_a_head_of_line_one():
  sched, engine = make(budget=20, max_len=16, starvation_limit=0)
  for req, n in (
    (SchedRequest(0, 4, 12, predicted_output_len=1), 10),
    (SchedRequest(1, 4, 12, predicted_output_len=1), 5),
  ):
    engine.add(req, n)
  sched.submit(engine.jobs[0].req)
  for step in range(6):
    if step == 2:
      sched.submit(engine.jobs[1].req)
    plan = sched.schedule()
    sched.update(engine.execute(plan))
  assert plan.ops == (Preempt(0, 0),)  # step 5, as in the preemption test above
  assert sched.state(0) is RequestState.WAITING and sched.waiting_per_class()[16] == 1
  sched.cancel(0)
  assert sched.num_waiting == 0
  # A request bypassed once (limit 0) becomes head-of-line; cancelling it lifts the hold.
  for req, n in (
    (SchedRequest(5, 4, 12, predicted_output_len=11), 11),  # class 16: no room now
    (SchedRequest(6, 1, 2, predicted_output_len=1), 2),
  ):  # class 8: fits
    engine.add(req, n)
    sched.submit(req)
  plan = sched.schedule()
  assert [op.request_id for op in plan.ops if isinstance(op, Admit)] == [6]
  assert sched.head_of_line == 5
  sched.update(engine.execute(plan))
  sched.cancel(5)
  assert sched.head_of_line is None
  engine.add(SchedRequest(7, 1, 2, predicted_output_len=1), 2)
  sched.submit(engine.jobs[7].req)
  plan = sched.schedule()
  assert [op.request_id for op in plan.ops if isinstance(op, Admit)] == [7]
