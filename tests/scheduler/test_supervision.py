"""Overflow, preemption, truncation, cancellation and submit checks, step by step by hand."""

import pytest

from s3jax.scheduler import (
    Admit, Move, Policy, Preempt, QueueFull, Release, ReleaseReason, RequestState, Resize,
    SchedRequest, Scheduler, SchedulerConfig, StepResult)

from sched_fake_engine import FakeEngine, run


def config(budget, cache_lens=(8, 16, 32), slot_options=(1, 2, 4), policy=Policy.S3, **kw):
  return SchedulerConfig(policy=policy, memory_budget_bytes=budget, kv_bytes_per_token=1,
                         cache_lens=cache_lens, slot_options=slot_options, **kw)


def collect(plans):
  return lambda step, plan: plans.append((step, plan))


def test_overflow_moves_to_the_next_class():
  cfg = config(budget=1000)
  sched, engine = Scheduler(cfg), FakeEngine(cfg)
  # prompt 4 + predicted 2 = 6 -> class 8; the answer is 10 tokens long.
  req = SchedRequest(7, prompt_len=4, max_tokens=50, predicted_output_len=2)
  plans = []
  run(sched, engine, {0: [(req, 10)]}, on_step=collect(plans))
  # step 0 admits (total 5); steps 1-4 decode to total 9 > 8; step 5 moves its 8 positions.
  moves = [(step, op) for step, plan in plans for op in plan.ops if isinstance(op, Move)]
  assert moves == [(5, Move(7, 8, 0, 16, 0, 8))]
  assert engine.jobs[7].output == list(range(10))
  stats = sched.stats
  assert (stats.moves, stats.moved_tokens, stats.preemptions, stats.finished) == (1, 8, 0, 1)
  assert len(plans) == 10  # one token per step, none lost to the move


def test_overflow_without_room_preempts_and_resumes_where_it_left_off():
  # The budget holds two slots of class 8 and one of class 16 (24 tokens), never two arenas of
  # two class-8 slots plus one class-16 slot.
  cfg = config(budget=24, cache_lens=(8, 16), slot_options=(1, 2))
  sched, engine = Scheduler(cfg), FakeEngine(cfg)
  a = SchedRequest(0, prompt_len=4, max_tokens=50, predicted_output_len=1)  # 5 -> class 8
  b = SchedRequest(1, prompt_len=4, max_tokens=50, predicted_output_len=1)
  plans = []
  run(sched, engine, {0: [(a, 10)], 2: [(b, 5)]}, on_step=collect(plans))
  ops = [(step, op) for step, plan in plans for op in plan.ops]
  assert ops[:4] == [(0, Resize(8, 0, 1, ())), (0, Admit(0, 8, 0, False)),
                     (2, Resize(8, 1, 2, ((0, 0),))), (2, Admit(1, 8, 1, False))]
  # A reaches total 9 at step 4's decode. At step 5 a move would need A's class-8 row, B's and a
  # class-16 row at once (8 * 2 + 16 > 24): A is preempted.
  assert ops[4:5] == [(5, Preempt(0, 8, 0))]
  # At step 6 the freed row pays for class 16: shrink class 8 (B moves down), grow, resume A.
  assert ops[5:] == [(6, Resize(8, 2, 1, ((1, 0),))), (6, Resize(16, 0, 1, ())),
                     (6, Admit(0, 16, 0, True)), (7, Resize(8, 1, 0, ()))]
  assert engine.jobs[0].output == list(range(10)) and engine.jobs[1].output == list(range(5))
  stats = sched.stats
  assert (stats.preemptions, stats.resumes, stats.recomputed_tokens) == (1, 1, 8)
  assert engine.peak_bytes == 24


def test_overflow_in_the_largest_usable_class_is_truncated():
  cfg = config(budget=8, cache_lens=(8, 16), slot_options=(1,))  # class 16 never fits
  sched, engine = Scheduler(cfg), FakeEngine(cfg)
  req = SchedRequest(3, prompt_len=4, max_tokens=100, predicted_output_len=1)
  plans = []
  run(sched, engine, {0: [(req, 20)]}, on_step=collect(plans))
  assert plans[-1][1].ops == (Release(3, 8, 0, ReleaseReason.LENGTH), Resize(8, 1, 0, ()))
  job = engine.jobs[3]
  assert job.truncated and job.output == list(range(5))  # total 9: every position of class 8 used
  assert sched.stats.truncated == 1 and not sched.has_work


def test_finish_at_admission():
  cfg = config(budget=100)
  sched, engine = Scheduler(cfg), FakeEngine(cfg)
  req = SchedRequest(1, prompt_len=3, max_tokens=1, predicted_output_len=1)
  engine.add(req, 1)
  sched.submit(req)
  plan = sched.schedule()
  assert plan.decode == {} and plan.expected_tokens == {1}
  result = engine.execute(plan)
  assert result == StepResult(tokens={1: 0}, finished=frozenset({1}))
  sched.update(result)
  assert not sched.has_work and sched.state(1) is None
  assert sched.schedule().ops == (Resize(8, 1, 0, ()),)  # the idle arena goes


def test_submit_rejects_never_fitting_requests_and_bounds_the_queue():
  sched = Scheduler(config(budget=20, max_waiting=2))
  with pytest.raises(ValueError, match="no room"):
    sched.submit(SchedRequest(0, prompt_len=32, max_tokens=5, predicted_output_len=1))
  with pytest.raises(ValueError, match="over the budget"):
    sched.submit(SchedRequest(0, prompt_len=20, max_tokens=5, predicted_output_len=1))  # class 32
  with pytest.raises(ValueError):
    sched.submit(SchedRequest(0, prompt_len=0, max_tokens=5, predicted_output_len=1))
  sched.submit(SchedRequest(1, prompt_len=2, max_tokens=5, predicted_output_len=1))
  with pytest.raises(ValueError, match="already"):
    sched.submit(SchedRequest(1, prompt_len=2, max_tokens=5, predicted_output_len=1))
  sched.submit(SchedRequest(2, prompt_len=2, max_tokens=5, predicted_output_len=1))
  with pytest.raises(QueueFull):
    sched.submit(SchedRequest(3, prompt_len=2, max_tokens=5, predicted_output_len=1))
  sched.schedule()  # admits both: the queue has room again
  sched.submit(SchedRequest(3, prompt_len=2, max_tokens=5, predicted_output_len=1))


def test_cancel_frees_memory():
  cfg = config(budget=64)
  sched, engine = Scheduler(cfg), FakeEngine(cfg)
  for rid in range(3):
    req = SchedRequest(rid, prompt_len=4, max_tokens=4, predicted_output_len=4)
    engine.add(req, 4)
    sched.submit(req)
  sched.update(engine.execute(sched.schedule()))
  assert sched.arena_slots()[8] == 4 and sched.reserved_bytes == 32
  waiting = SchedRequest(9, prompt_len=20, max_tokens=10, predicted_output_len=10)
  sched.submit(waiting)
  assert sched.cancel(9) == [] and sched.state(9) is None and sched.num_waiting == 0
  ops = [op for rid in (0, 1) for op in sched.cancel(rid)]
  assert ops == [Release(0, 8, 0, ReleaseReason.CANCELLED), Release(1, 8, 1, ReleaseReason.CANCELLED)]
  for op in ops:
    engine.apply(op)
  assert sched.cancel(0) == []  # already gone
  plan = sched.schedule()
  # One of four used: shrink to twice the occupancy; the survivor moves down to slot 0.
  assert plan.ops == (Resize(8, 4, 2, ((2, 0),)),)
  assert plan.decode == {8: ((0, 2),)} and sched.reserved_bytes == 16
  with pytest.raises(RuntimeError):
    sched.cancel(2)  # a plan is in flight
  sched.update(engine.execute(plan))
  assert sched.stats.cancelled == 3


def test_idle_shrink_hysteresis():
  cfg = config(budget=1000, cache_lens=(8,), slot_options=(1, 2, 4, 8))
  sched, engine = Scheduler(cfg), FakeEngine(cfg)
  lengths = [1, 2, 3, 4, 5, 6, 7, 7]  # eight requests in one arena of 8, finishing one by one
  for rid, n in enumerate(lengths):
    req = SchedRequest(rid, prompt_len=1, max_tokens=7, predicted_output_len=7)
    engine.add(req, n)
    sched.submit(req)
  sizes = []
  while sched.has_work:
    sched.update(engine.execute(sched.schedule()))
    sizes.append((sched.running_per_class()[8], sched.arena_slots()[8]))
  # Slots are shrunk only when at most a quarter is used, to twice the occupancy.
  assert sizes == [(7, 8), (6, 8), (5, 8), (4, 8), (3, 8), (2, 8), (0, 4)]
  assert sched.schedule().ops == (Resize(8, 4, 0, ()),)


def test_update_checks_the_result_against_the_plan():
  cfg = config(budget=100)
  sched = Scheduler(cfg)
  sched.submit(SchedRequest(1, prompt_len=3, max_tokens=5, predicted_output_len=1))
  with pytest.raises(RuntimeError):
    sched.update(StepResult(tokens={}))
  sched.schedule()
  with pytest.raises(RuntimeError):
    sched.schedule()
  with pytest.raises(ValueError, match="missing"):
    sched.update(StepResult(tokens={}))
  with pytest.raises(ValueError, match="finished"):
    sched.update(StepResult(tokens={1: 0}, finished=frozenset({2})))
  sched.update(StepResult(tokens={1: 0}))
  assert sched.state(1) is RequestState.RUNNING and sched.total_len(1) == 4


def test_cancel_a_preempted_request_and_a_head_of_line_one():
  cfg = config(budget=24, cache_lens=(8, 16), slot_options=(1, 2), starvation_limit=0)
  sched, engine = Scheduler(cfg), FakeEngine(cfg)
  for req, n in ((SchedRequest(0, 4, 50, predicted_output_len=1), 10),
                 (SchedRequest(1, 4, 50, predicted_output_len=1), 5)):
    engine.add(req, n)
  sched.submit(engine.jobs[0].req)
  for step in range(6):
    if step == 2:
      sched.submit(engine.jobs[1].req)
    plan = sched.schedule()
    sched.update(engine.execute(plan))
  assert any(isinstance(op, Preempt) for op in plan.ops)  # step 5 preempted request 0
  assert sched.state(0) is RequestState.WAITING and sched.waiting_per_class()[16] == 1
  assert sched.cancel(0) == [] and sched.num_waiting == 0
  # A request bypassed once (limit 0) becomes head-of-line; cancelling it lifts the hold.
  for req, n in ((SchedRequest(5, 4, 50, predicted_output_len=11), 11),  # class 16: no room now
                 (SchedRequest(6, 1, 2, predicted_output_len=1), 2)):  # class 8: the free row
    engine.add(req, n)
    sched.submit(req)
  plan = sched.schedule()
  assert [op.request_id for op in plan.ops if isinstance(op, Admit)] == [6]
  assert sched.head_of_line == 5
  sched.update(engine.execute(plan))
  assert sched.cancel(5) == [] and sched.head_of_line is None
  engine.add(SchedRequest(7, 1, 2, predicted_output_len=1), 2)
  sched.submit(engine.jobs[7].req)
  plan = sched.schedule()
  assert [op.request_id for op in plan.ops if isinstance(op, Admit)] == [7]
