"""Hand-checked units: byte parsing, layouts, reservations per policy, class choice, packing, rows."""

import pytest

from s3jax.scheduler import (
  AdmissionOrder,
  Admit,
  Policy,
  SchedRequest,
  Scheduler,
  SchedulerConfig,
  class_for,
  parse_bytes,
  reservation_tokens,
)
from s3jax.scheduler.rows import Rows


def scheduler(policy=Policy.S3_RESERVE, budget=10**9, min_cache_len=256, max_len=2048, page_size=64, **kw):
  cfg = SchedulerConfig(
    policy=policy,
    memory_budget_bytes=budget,
    min_cache_len=min_cache_len,
    page_size=page_size,
    classes_per_doubling=1,
    **kw,
  )
  return Scheduler(cfg, kv_bytes_per_token=1, max_len=max_len)


def admitted(plan):
  return sorted(op.request_id for op in plan.ops if isinstance(op, Admit))


@pytest.mark.parametrize(
  "text, expected",
  [
    ("2GiB", 2 * 2**30),
    ("512MiB", 512 * 2**20),
    ("1.5GB", 1_500_000_000),
    ("1000000", 10**6),
    ("64 kib", 65536),
    ("3KB", 3000),
    ("7b", 7),
    (" 10 MB ", 10**7),
    (".5KiB", 512),
    (42, 42),
  ],
)
def test_parse_bytes(text, expected):
  assert parse_bytes(text) == expected


@pytest.mark.parametrize(
  "junk", ["", "GiB", "2 GiBs", "1e9", "-5", "1.5", "0.1B", "2 gigabytes", "1,000", -1, True, 2.0]
)
def test_parse_bytes_rejects_junk(junk):
  with pytest.raises(ValueError):
    parse_bytes(junk)


def test_layout_in_pages_and_rows():
  cfg = SchedulerConfig(
    policy=Policy.S3, memory_budget_bytes=10_000, min_cache_len=128, page_size=64, classes_per_doubling=1
  )
  layout = cfg.layout(kv_bytes_per_token=2, max_len=1000)
  assert layout.cache_lens == (128, 256, 512, 1000)
  assert layout.num_pages == 78  # 10,000 // (64 * 2)
  assert layout.pages_for(1000) == 16 and layout.pages_for(128) == 2
  assert layout.usable_cache_lens == (128, 256, 512, 1000)
  assert layout.max_slots == 39  # 78 pages * 64 tokens // 128
  assert layout.batch_sizes == (4, 8, 12, 16, 24, 32, 39)
  assert [layout.batch_size_for(n) for n in (0, 1, 4, 5, 9, 17, 33, 39)] == [4, 4, 4, 8, 12, 24, 39, 39]
  small = SchedulerConfig(policy=Policy.S3, memory_budget_bytes=100, min_cache_len=128, page_size=64)
  assert small.layout(kv_bytes_per_token=1, max_len=1000).usable_cache_lens == ()
  fixed = SchedulerConfig(policy=Policy.S3, memory_budget_bytes=10_000, max_slots=6, batch_sizes=(2, 6))
  assert fixed.layout(kv_bytes_per_token=1, max_len=1000).batch_sizes == (2, 6)


def test_classes_grow_geometrically_in_whole_pages():
  layout = lambda n: SchedulerConfig(policy=Policy.S3, memory_budget_bytes=10**9, classes_per_doubling=n).layout(
    kv_bytes_per_token=1, max_len=2048
  )
  assert layout(1).cache_lens == (128, 256, 512, 1024, 2048)
  # 128 * 2^(k/4), rounded up to pages of 64: at most 19% (plus a page) above any length.
  assert layout(4).cache_lens == (128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1472, 1728, 2048)
  # The default, 16: 2^(1/16) is 4.4%, less than a page up to 1,472 tokens: every page but one.
  assert layout(16).cache_lens == tuple(range(128, 1728 + 1, 64)) + (1856, 1920, 1984, 2048)


def test_reservation_per_policy():
  req = SchedRequest(1, prompt_len=100, max_tokens=500, predicted_output_len=50, true_output_len=200)
  assert reservation_tokens(Policy.MAX, req, 2048) == 2048  # the model max, whatever max_tokens
  assert reservation_tokens(Policy.S3_RESERVE, req, 2048) == 150
  uncapped = SchedRequest(2, prompt_len=100, max_tokens=5000, predicted_output_len=4000, true_output_len=0)
  assert reservation_tokens(Policy.MAX, uncapped, 2048) == 2048
  assert reservation_tokens(Policy.S3_RESERVE, uncapped, 2048) == 2048  # capped at the model max
  tiny = SchedRequest(2, prompt_len=100, max_tokens=5000, predicted_output_len=0)
  assert reservation_tokens(Policy.S3_RESERVE, tiny, 2048) == 101  # at least prompt + 1
  with pytest.raises(ValueError):
    reservation_tokens(Policy.S3_RESERVE, SchedRequest(3, 10, 10), 2048)
  for policy in (Policy.S3, Policy.ORACLE, Policy.ON_DEMAND, Policy.ADAPTIVE):
    with pytest.raises(ValueError, match="reserves nothing"):
      reservation_tokens(policy, req, 2048)


def test_constant_policy_reserves_its_length_for_every_request():
  req = SchedRequest(1, prompt_len=100, max_tokens=500, predicted_output_len=50, true_output_len=200)
  assert reservation_tokens(Policy.CONSTANT, req, 2048, constant_output_len=300) == 400
  assert reservation_tokens(Policy.CONSTANT, req, 2048, constant_output_len=900) == 600  # max_tokens caps it
  with pytest.raises(ValueError, match="constant_output_len"):
    reservation_tokens(Policy.CONSTANT, req, 2048)
  # Through the scheduler: every request lands in the class of prompt + the constant, whatever
  # its prediction or true length says.
  sched = scheduler(Policy.CONSTANT, constant_output_len=200)
  for rid, (prompt, predicted, true) in enumerate([(40, 5, 1000), (50, 1500, 3), (300, 1, 1)]):
    sched.submit(
      SchedRequest(rid, prompt_len=prompt, max_tokens=1500, predicted_output_len=predicted, true_output_len=true)
    )
  plan = sched.schedule()
  assert sorted((op.request_id, op.cache_len) for op in plan.ops) == [(0, 256), (1, 256), (2, 512)]
  # The largest class first, each prompt's pages (40, 50 and 300 tokens) lowest id first.
  assert {op.request_id: op.pages for op in plan.ops} == {2: (0, 1, 2, 3, 4), 0: (5,), 1: (6,)}
  with pytest.raises(ValueError, match="exactly when policy is 'constant'"):
    SchedulerConfig(policy=Policy.CONSTANT, memory_budget_bytes=10**6)
  with pytest.raises(ValueError, match="exactly when policy is 'constant'"):
    SchedulerConfig(policy=Policy.S3, memory_budget_bytes=10**6, constant_output_len=10)


def test_shortest_first_admits_the_smallest_reservations_first():
  def order(admission_order):
    sched = scheduler(budget=1024 + 512, max_len=1024, admission_order=admission_order)
    for rid, predicted in enumerate((900, 400, 200, 200, 900)):
      sched.submit(SchedRequest(rid, 10, 1000, predicted_output_len=predicted))
    return admitted(sched.schedule())

  assert order(AdmissionOrder.PACK) == [0, 1]  # 1024 + 512: the budget, largest first
  assert order(AdmissionOrder.SHORTEST_FIRST) == [1, 2, 3]  # 256 + 256 + 512, then 1024 no longer fits


def test_class_rounding():
  cache_lens = (256, 512, 1024, 2048)
  assert class_for(cache_lens, 256) == 256
  assert class_for(cache_lens, 257) == 512
  assert class_for(cache_lens, 2049) is None


def test_class_choice_at_admission():
  sched = scheduler()
  sched.submit(SchedRequest(1, prompt_len=100, max_tokens=1000, predicted_output_len=156))  # 256
  sched.submit(SchedRequest(2, prompt_len=100, max_tokens=1000, predicted_output_len=157))  # 512
  sched.submit(SchedRequest(3, prompt_len=100, max_tokens=100, predicted_output_len=5000))  # 200 -> 256
  plan = sched.schedule()
  # Decreasing first-fit: the 512 reservation first, then the 256 ones in arrival order.
  assert [(op.request_id, op.slot, op.cache_len) for op in plan.ops] == [(2, 0, 512), (1, 1, 256), (3, 2, 256)]
  assert [op.pages for op in plan.ops] == [(0, 1), (2, 3), (4, 5)]  # each prompt's 100 tokens
  assert plan.scan_pages == 6 and sched.used_bytes == 6 * 64
  assert sched.running_per_class() == {256: 2, 512: 1, 1024: 0, 2048: 0}
  assert sched.reserved_bytes == 2 * 256 + 512


def test_decreasing_first_fit_fills_the_budget_exactly():
  # 1 x 1024 + 2 x 512 + 4 x 256 = 3072 tokens = the budget, exactly.
  sched = scheduler(budget=3072, max_len=1024)
  rid = 0
  for predicted, count in ((200, 8), (400, 2), (900, 1)):  # the small ones arrive first
    for _ in range(count):
      sched.submit(SchedRequest(rid, prompt_len=10, max_tokens=1000, predicted_output_len=predicted))
      rid += 1
  plan = sched.schedule()
  assert admitted(plan) == [0, 1, 2, 3, 8, 9, 10]  # FCFS within class: the first four small ones
  assert sched.reserved_bytes == 3072
  assert sched.waiting_per_class() == {256: 4, 512: 0, 1024: 0}
  assert plan.decode == ()  # admitted requests take their token from the prefill


def test_first_fit_skips_a_class_that_does_not_fit_and_fills_smaller_ones():
  sched = scheduler(budget=1024 + 512, max_len=1024)
  sched.submit(SchedRequest(0, 10, 1000, predicted_output_len=900))
  sched.submit(SchedRequest(1, 10, 1000, predicted_output_len=900))  # a second 1024 does not fit
  sched.submit(SchedRequest(2, 10, 1000, predicted_output_len=200))
  sched.submit(SchedRequest(3, 10, 1000, predicted_output_len=200))
  assert admitted(sched.schedule()) == [0, 2, 3]
  assert sched.reserved_bytes == 1024 + 2 * 256


def test_admissions_are_bounded_per_step_and_by_rows():
  sched = scheduler(max_admissions_per_step=3)
  for rid in range(5):
    sched.submit(SchedRequest(rid, 10, 10, predicted_output_len=5))
  assert admitted(sched.schedule()) == [0, 1, 2]
  rows = scheduler(max_slots=2, batch_sizes=(2,))
  for rid in range(3):
    rows.submit(SchedRequest(rid, 10, 10, predicted_output_len=5))
  assert admitted(rows.schedule()) == [0, 1] and rows.num_waiting == 1


def test_rows_pack_moves_the_highest_into_the_lowest_free():
  rows = Rows(8)
  for rid in range(6):
    rows.place(rid)
  for slot in (0, 2, 3):
    rows.vacate(slot, slot)
  assert rows.pack(below=4) == [(5, 5, 0), (4, 4, 2)]
  assert list(rows.occupants()) == [(0, 5), (1, 1), (2, 4)]
  assert rows.place(9) == 3 and rows.free == 4


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of page_size"):
    SchedulerConfig(policy=Policy.S3, memory_budget_bytes=1, min_cache_len=100, page_size=64)
  with pytest.raises(ValueError):
    SchedulerConfig(policy=Policy.S3, memory_budget_bytes=1, batch_sizes=(8, 4))
  with pytest.raises(ValueError):
    SchedulerConfig(policy="s3", memory_budget_bytes=1)
  with pytest.raises(ValueError, match="reserves none"):
    SchedulerConfig(policy=Policy.ON_DEMAND, memory_budget_bytes=1, admission_order=AdmissionOrder.PACK)
  with pytest.raises(ValueError, match="needs a predicted length"):
    SchedulerConfig(policy=Policy.ADAPTIVE, memory_budget_bytes=1, admission_order=AdmissionOrder.SHORTEST_FIRST)
  with pytest.raises(ValueError, match="admission_risk"):
    SchedulerConfig(policy=Policy.S3, memory_budget_bytes=1, admission_risk=0.0)
  orders = {
    p: SchedulerConfig(policy=p, memory_budget_bytes=1, constant_output_len=1 if p is Policy.CONSTANT else None).order
    for p in Policy
  }
  assert orders == {
    Policy.MAX: AdmissionOrder.PACK,
    Policy.CONSTANT: AdmissionOrder.PACK,
    Policy.S3_RESERVE: AdmissionOrder.PACK,
    Policy.S3: AdmissionOrder.SHORTEST_FIRST,
    Policy.ORACLE: AdmissionOrder.SHORTEST_FIRST,
    Policy.ON_DEMAND: AdmissionOrder.FCFS,
    Policy.ADAPTIVE: AdmissionOrder.FCFS,
  }
  with pytest.raises(ValueError, match="equal max_slots"):
    SchedulerConfig(policy=Policy.S3, memory_budget_bytes=10**6, max_slots=8, batch_sizes=(4,)).layout(
      kv_bytes_per_token=1, max_len=512
    )
  assert scheduler(budget=511, max_len=512).max_total_len == 256
  with pytest.raises(ValueError, match="holds no sequence"):
    scheduler(budget=255)
  with pytest.raises(ValueError, match="policy 'max'"):
    scheduler(policy=Policy.MAX, budget=2047)
