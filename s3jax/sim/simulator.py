"""Drives the engine's own ``Scheduler`` with a cost model in place of the device.

Everything but the device is the engine's: the scheduler (policy, classes, supervisor, rows, page
ids), the prefill packing, the batch sizes and the one-iteration-late read of tokens
(``pipeline_depth``); like the engine, the simulator only applies the scheduler's plans. Each
iteration costs what ``CostModel`` says its prefill calls and its decode call take, and the clock
advances by that. So a simulated run makes the same scheduling decisions
as the engine on the same trace and budget (tested), and its times are the cost model's.

Answers end at each request's ``output_len`` (the engine's ``eos_at``), which the scheduler never
sees: the same trace replay as ``s3jax.bench.replay``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from s3jax.engine.config import EngineConfig
from s3jax.executor.step_state import StepShapes
from s3jax.scheduler import (
  Admit,
  Grow,
  LengthDist,
  MoveRow,
  Preempt,
  PrefillChunk,
  Release,
  SchedRequest,
  Scheduler,
  StepPlan,
  StepResult,
)
from s3jax.sim.cost import CostModel
from s3jax.stats import StepSample, latency_percentiles


@dataclasses.dataclass(kw_only=True)
class SimRequest:
  """One request of a simulated trace.

  Attributes:
    prompt_len: prompt tokens.
    output_len: tokens the answer has (where it ends; invisible to the scheduler).
    max_tokens: the user's cap (default: the room the model leaves).
    predicted_output_len: what the predictor reserves for the answer (s3-reserve; s3 counts
      mispredictions against it).
    predicted_length: the predictor's distribution of the answer's length (s3).
    arrival_s: when it arrives (0: all at once).
    page_hashes: the keys of its prompt's full pages (``s3jax.scheduler.prefix_hashes``), for
      prefix caching: equal keys share KV pages, and a cached prefix is not prefilled.
    first_token_s, finished_s, generated: what the simulation recorded (in ``SimRun.requests``).
  """

  prompt_len: int
  output_len: int
  max_tokens: int | None = None
  predicted_output_len: int | None = None
  predicted_length: LengthDist | None = None
  arrival_s: float = 0.0
  page_hashes: tuple[int, ...] = ()
  first_token_s: float | None = None
  finished_s: float | None = None
  generated: int = 0


@dataclasses.dataclass(kw_only=True)
class SimRun:
  """One simulated replay."""

  policy: str
  requests: list[SimRequest]
  wall_s: float
  steps: int
  rows_decoded: int  # live rows summed over decode calls
  prefill_s: float
  decode_s: float
  stats: object  # the scheduler's ``SchedulerStats``
  timeline: list[StepSample]
  plans: list[StepPlan] | None

  @property
  def output_tokens(self) -> int:
    return sum(r.generated for r in self.requests)

  def summary(self) -> dict:
    reqs = self.requests
    s = self.stats
    return {
      "policy": self.policy,
      "wall_s": self.wall_s,
      "output_tokens": self.output_tokens,
      "tokens_per_s": self.output_tokens / self.wall_s,
      "steps": self.steps,
      "mean_batch": self.rows_decoded / max(self.steps, 1),
      "prefill_s": self.prefill_s,
      "decode_s": self.decode_s,
      "mispredictions": s.mispredictions,
      "grows": s.grows,
      "preemptions": s.preemptions,
      "recomputed_tokens": s.recomputed_tokens,
      "holds": s.holds,
      **latency_percentiles(
        [r.arrival_s for r in reqs],
        [r.first_token_s for r in reqs],
        [r.finished_s for r in reqs],
        [r.generated for r in reqs],
      ),
    }


def simulate(
  requests: Sequence[SimRequest], config: EngineConfig, cost: CostModel, *, record_plans: bool = False
) -> SimRun:
  """Replays ``requests`` (copied) through a scheduler of ``config`` on ``cost``'s device.

  Args:
    requests: the trace, in submission order.
    config: the engine's settings (policy, budget, pages, batch sizes, packing, pipeline depth).
    cost: the model's shape and the device's times.
    record_plans: keep every ``StepPlan`` (to compare decisions with the engine's).
  """
  max_len = cost.model.max_seq_len
  sched = Scheduler(config.scheduler, kv_bytes_per_token=cost.kv_bytes_per_token, max_len=max_len)
  layout = sched.layout
  shapes = StepShapes.create(
    max_seq_len=max_len,
    num_pages=layout.num_pages,
    page_size=layout.page_size,
    batch_sizes=layout.batch_sizes,
    max_admissions=config.scheduler.max_admissions_per_step,
    min_prefill_len=config.min_prefill_len,
    scan_chunk=config.scan_chunk_pages,
  )
  reqs = [dataclasses.replace(r) for r in requests]
  for r in reqs:
    if r.max_tokens is None:
      r.max_tokens = sched.max_total_len - r.prompt_len
  order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
  active: set[int] = set()
  inflight: collections.deque[tuple[tuple[tuple[int, int], ...], float]] = collections.deque()
  clock, steps, rows_decoded, prefill_total, decode_total = 0.0, 0, 0, 0.0, 0.0
  timeline, plans = [], [] if record_plans else None
  arrived = 0

  def collect(rows, done_at):
    finished, tokens = set(), {}
    for _, rid in rows:
      if rid not in active:
        continue  # ended on an earlier token: the engine drops this one
      r = reqs[rid]
      r.generated += 1
      tokens[rid] = 0
      if r.first_token_s is None:
        r.first_token_s = done_at
      if r.generated >= r.max_tokens or r.generated >= r.output_len:
        r.finished_s = done_at
        finished.add(rid)
        active.discard(rid)
    sched.update(StepResult(tokens=tokens, finished=frozenset(finished)))

  while arrived < len(reqs) or active or inflight or sched.has_work:
    if not active and not inflight and not sched.has_work:
      clock = max(clock, reqs[order[arrived]].arrival_s)  # idle until the next arrival
    while arrived < len(reqs) and reqs[order[arrived]].arrival_s <= clock:
      rid = order[arrived]
      r = reqs[rid]
      sched.submit(
        SchedRequest(
          request_id=rid,
          prompt_len=r.prompt_len,
          max_tokens=r.max_tokens,
          predicted_output_len=r.predicted_output_len,
          predicted_length=r.predicted_length,
          true_output_len=r.output_len,
          page_hashes=r.page_hashes,
        )
      )
      active.add(rid)
      arrived += 1
    plan = sched.schedule()
    if plans is not None:
      plans.append(plan)
    admitted, continues = [], []
    for op in plan.ops:
      if isinstance(op, Admit):
        r = reqs[op.request_id]
        admitted.append(r.prompt_len + r.generated - op.start)  # a resumed request re-prefills its answer so far
        continues.append(op.start > 0)
      elif isinstance(op, PrefillChunk):
        admitted.append(op.end - op.start)
        continues.append(op.start > 0)
      elif not isinstance(op, (Release, Preempt, Grow, MoveRow)):
        raise TypeError(f"unknown op {op!r}")
    t_prefill = sum(
      cost.prefill_s(shapes.prefill_len_for(sum(admitted[i] for i in group)), len(group))
      for group in shapes.group_prefills(admitted, config.prefill_pack_tokens, continues)
    )
    clock += t_prefill
    prefill_total += t_prefill
    dispatched = bool(plan.rows)
    if dispatched:
      batch = shapes.batch_size_for(max(slot for slot, _ in plan.rows) + 1)
      scanned = min(shapes.chunks_for(plan.scan_pages) * shapes.scan_chunk, shapes.num_pages) * shapes.page_size
      t_decode = cost.decode_s(batch, scanned)
      clock += t_decode
      decode_total += t_decode
      steps += 1
      rows_decoded += len(plan.decode)
      inflight.append((plan.rows, clock))
    keep = config.pipeline_depth if dispatched else 0
    while len(inflight) > keep:
      collect(*inflight.popleft())
    timeline.append(
      StepSample(
        t_s=clock,
        running=sched.num_running,
        waiting=sched.num_waiting,
        reserved_bytes=sched.reserved_bytes,
        used_bytes=sched.used_bytes,
      )
    )
  return SimRun(
    policy=config.policy.value,
    requests=reqs,
    wall_s=clock,
    steps=steps,
    rows_decoded=rows_decoded,
    prefill_s=prefill_total,
    decode_s=decode_total,
    stats=sched.stats,
    timeline=timeline,
    plans=plans,
  )
