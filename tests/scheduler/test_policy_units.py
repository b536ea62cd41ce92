"""Hand-checked units: byte parsing, reservations per policy, class choice, packing, op helpers."""

import pytest

from s3jax.scheduler import (
    Admit, Policy, Resize, SchedRequest, Scheduler, SchedulerConfig, StepPlan, class_for,
    parse_bytes, reservation_tokens, reserved_bytes_after_each_op, slots_for)

CACHE_LENS = (256, 512, 1024, 2048)


def config(policy=Policy.S3, budget=10**9, cache_lens=CACHE_LENS, **kw):
  return SchedulerConfig(policy=policy, memory_budget_bytes=budget, kv_bytes_per_token=1,
                         cache_lens=cache_lens, **kw)


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1000000", 10**6),
    ("64 kib", 65536), ("3KB", 3000), ("7b", 7), (" 10 MB ", 10**7), (".5KiB", 512), (42, 42),
])
def test_parse_bytes(text, expected):
  assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "junk", ["", "GiB", "2 GiBs", "1e9", "-5", "1.5", "0.1B", "2 gigabytes", "1,000", -1, True, 2.0])
def test_parse_bytes_rejects_junk(junk):
  with pytest.raises(ValueError):
    parse_bytes(junk)


def test_reservation_per_policy():
  req = SchedRequest(1, prompt_len=100, max_tokens=500, predicted_output_len=50, true_output_len=200)
  assert reservation_tokens(Policy.MAX, req, 2048) == 2048  # the model max, whatever max_tokens
  assert reservation_tokens(Policy.S3, req, 2048) == 150
  assert reservation_tokens(Policy.ORACLE, req, 2048) == 300
  uncapped = SchedRequest(2, prompt_len=100, max_tokens=5000, predicted_output_len=4000, true_output_len=0)
  assert reservation_tokens(Policy.MAX, uncapped, 2048) == 2048
  assert reservation_tokens(Policy.S3, uncapped, 2048) == 2048  # capped at the model max
  assert reservation_tokens(Policy.ORACLE, uncapped, 2048) == 101  # at least prompt + 1
  with pytest.raises(ValueError):
    reservation_tokens(Policy.S3, SchedRequest(3, 10, 10), 2048)
  with pytest.raises(ValueError):
    reservation_tokens(Policy.ORACLE, SchedRequest(3, 10, 10, predicted_output_len=5), 2048)


def test_class_and_slot_rounding():
  assert class_for(CACHE_LENS, 256) == 256
  assert class_for(CACHE_LENS, 257) == 512
  assert class_for(CACHE_LENS, 2049) is None
  opts = (1, 2, 4, 8)
  assert [slots_for(opts, n) for n in (0, 1, 2, 3, 5, 8, 9)] == [0, 1, 2, 4, 8, 8, None]


def test_class_choice_at_admission():
  sched = Scheduler(config())
  sched.submit(SchedRequest(1, prompt_len=100, max_tokens=1000, predicted_output_len=156))  # 256
  sched.submit(SchedRequest(2, prompt_len=100, max_tokens=1000, predicted_output_len=157))  # 512
  sched.submit(SchedRequest(3, prompt_len=100, max_tokens=100, predicted_output_len=5000))  # 200 -> 256
  plan = sched.schedule()
  admits = {op.request_id: op.cache_len for op in plan.ops if isinstance(op, Admit)}
  assert admits == {1: 256, 2: 512, 3: 256}
  assert sched.arena_slots() == {256: 2, 512: 1, 1024: 0, 2048: 0}
  assert sched.reserved_bytes == 2 * 256 + 512


def test_decreasing_first_fit_fills_the_budget_exactly():
  # 1 x 1024 + 2 x 512 + 4 x 256 = 3072 tokens = the budget, exactly.
  cfg = config(policy=Policy.ORACLE, budget=3072, cache_lens=(256, 512, 1024), slot_options=(1, 2, 4, 8))
  sched = Scheduler(cfg)
  rid = 0
  for true_out, count in ((200, 8), (400, 2), (900, 1)):  # the small ones arrive first
    for _ in range(count):
      sched.submit(SchedRequest(rid, prompt_len=10, max_tokens=1000, true_output_len=true_out))
      rid += 1
  plan = sched.schedule()
  admitted = sorted(op.request_id for op in plan.ops if isinstance(op, Admit))
  assert admitted == [0, 1, 2, 3, 8, 9, 10]  # FCFS within class: the first four small ones
  assert sched.reserved_bytes == 3072
  assert sched.arena_slots() == {256: 4, 512: 2, 1024: 1}
  assert sched.waiting_per_class() == {256: 4, 512: 0, 1024: 0}
  # Every op kept the budget.
  assert max(reserved_bytes_after_each_op(plan, {}, 1)) <= 3072


def test_first_fit_skips_a_class_that_does_not_fit_and_fills_smaller_ones():
  cfg = config(policy=Policy.ORACLE, budget=1024 + 512, cache_lens=(256, 512, 1024), slot_options=(1, 2, 4))
  sched = Scheduler(cfg)
  sched.submit(SchedRequest(0, 10, 1000, true_output_len=900))
  sched.submit(SchedRequest(1, 10, 1000, true_output_len=900))  # a second 1024 does not fit
  sched.submit(SchedRequest(2, 10, 1000, true_output_len=200))
  sched.submit(SchedRequest(3, 10, 1000, true_output_len=200))
  plan = sched.schedule()
  assert sorted(op.request_id for op in plan.ops if isinstance(op, Admit)) == [0, 2, 3]
  assert sched.reserved_bytes == 1024 + 2 * 256


def test_max_admissions_per_step():
  sched = Scheduler(config(max_admissions_per_step=3))
  for rid in range(5):
    sched.submit(SchedRequest(rid, 10, 10, predicted_output_len=5))
  plan = sched.schedule()
  assert [op.request_id for op in plan.ops if isinstance(op, Admit)] == [0, 1, 2]


def test_reserved_bytes_after_each_op_counts_resizes():
  plan = StepPlan(ops=(Resize(256, 4, 2, ((0, 0), (3, 1))), Admit(9, 256, 0), Resize(512, 0, 2, ())),
                  decode={}, arena_slots={256: 2, 512: 2})
  assert reserved_bytes_after_each_op(plan, {256: 4}, 2) == [1024, 1024, 1024 + 2048]


def test_config_validation():
  with pytest.raises(ValueError):
    config(cache_lens=(512, 256))
  with pytest.raises(ValueError):
    config(slot_options=())
  with pytest.raises(ValueError):
    SchedulerConfig(policy="s3", memory_budget_bytes=1, kv_bytes_per_token=1, cache_lens=(8,))
  assert config(budget=511).usable_cache_lens == (256,)
  assert config(budget=512).usable_cache_lens == (256, 512)
