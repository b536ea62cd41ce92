"""A fake engine for scheduler tests: plain Python, arithmetic checkable by hand.

Each request has a scripted true output length T. Its output token number i has id i, so a
complete answer is exactly ``list(range(T))``: a lost token leaves a gap, a repeated one a
duplicate. A KV row is modelled as the list of token ids whose keys/values are written (position
p holds the sequence's token p), so a Move that drops positions, a resume that skips a token, or
a decode at the wrong position shows up as a wrong row. Every op is checked as it runs: the
budget after it, one request per slot, the rows a Resize drops being empty.
"""

from __future__ import annotations

import dataclasses

from s3jax.scheduler import (
    Admit, Move, Preempt, Release, ReleaseReason, Resize, SchedRequest, Scheduler, SchedulerConfig,
    StepPlan, StepResult)


@dataclasses.dataclass
class Job:
  req: SchedRequest
  true_len: int  # tokens the model will produce (EOS after them), <= max_tokens
  output: list[int] = dataclasses.field(default_factory=list)
  done: bool = False
  truncated: bool = False
  cancelled: bool = False
  admitted_step: int | None = None  # first admission
  finished_step: int | None = None

  @property
  def prompt(self) -> list[int]:
    return [-1 - i for i in range(self.req.prompt_len)]  # negative ids: never confused with output

  @property
  def sequence(self) -> list[int]:
    return self.prompt + self.output


@dataclasses.dataclass
class _Row:
  rid: int
  kv: list[int]


class FakeEngine:
  """Executes plans op by op against arenas of rows, checking every invariant."""

  def __init__(self, config: SchedulerConfig):
    self.config = config
    self.arenas: dict[int, list[_Row | None]] = {c: [] for c in config.cache_lens}
    self.jobs: dict[int, Job] = {}
    self.step = 0
    self.peak_bytes = 0
    self.ops_seen: list = []

  def add(self, req: SchedRequest, true_len: int) -> Job:
    job = Job(req=req, true_len=min(true_len, req.max_tokens))
    self.jobs[req.request_id] = job
    return job

  def reserved_bytes(self) -> int:
    return sum(len(rows) * c * self.config.kv_bytes_per_token for c, rows in self.arenas.items())

  def _check_budget(self) -> None:
    used = self.reserved_bytes()
    self.peak_bytes = max(self.peak_bytes, used)
    assert used <= self.config.memory_budget_bytes, (used, self.config.memory_budget_bytes)

  def _sample(self, job: Job, tokens: dict[int, int], finished: set[int]) -> None:
    token = len(job.output)  # token id = its index in the answer
    job.output.append(token)
    tokens[job.req.request_id] = token
    if len(job.output) >= job.true_len:
      job.done = True
      job.finished_step = self.step
      finished.add(job.req.request_id)

  def apply(self, op) -> None:
    """Applies one op (also used for the ops ``cancel`` returns)."""
    self.ops_seen.append(op)
    if isinstance(op, Resize):
      rows = self.arenas[op.cache_len]
      assert len(rows) == op.old_slots, (op, len(rows))
      assert op.new_slots == 0 or op.new_slots in self.config.slot_options, op
      kept = dict(op.row_map)
      assert len(set(kept.values())) == len(kept), op
      for s, row in enumerate(rows):
        assert (row is not None) == (s in kept), f"{op}: row {s} holds {row}"
      new_rows: list[_Row | None] = [None] * op.new_slots
      for old, new in op.row_map:
        new_rows[new] = rows[old]
      self.arenas[op.cache_len] = new_rows
    elif isinstance(op, Move):
      row = self.arenas[op.src_cache_len][op.src_slot]
      assert row is not None and row.rid == op.request_id, op
      assert self.arenas[op.dst_cache_len][op.dst_slot] is None, op
      assert op.dst_cache_len > op.src_cache_len, op
      assert len(row.kv) == op.num_tokens, (op, len(row.kv))
      self.arenas[op.src_cache_len][op.src_slot] = None
      self.arenas[op.dst_cache_len][op.dst_slot] = _Row(op.request_id, list(row.kv))
    elif isinstance(op, (Preempt, Release)):
      row = self.arenas[op.cache_len][op.slot]
      assert row is not None and row.rid == op.request_id, op
      self.arenas[op.cache_len][op.slot] = None
      job = self.jobs[op.request_id]
      if isinstance(op, Release):
        job.done = True
        job.cancelled = op.reason is ReleaseReason.CANCELLED
        job.truncated = op.reason is ReleaseReason.LENGTH
    elif isinstance(op, Admit):
      assert self.arenas[op.cache_len][op.slot] is None, op
      job = self.jobs[op.request_id]
      assert not job.done, op
      assert op.resume == bool(job.output), (op, job.output)
      seq = job.sequence
      assert len(seq) <= op.cache_len, (op, len(seq))  # prefill writes every position of seq
      self.arenas[op.cache_len][op.slot] = _Row(op.request_id, list(seq))
      if job.admitted_step is None:
        job.admitted_step = self.step
    else:
      raise AssertionError(f"unknown op {op!r}")
    self._check_budget()

  def execute(self, plan: StepPlan) -> StepResult:
    """Runs the ops in order, then prefill tokens and one decode step."""
    tokens: dict[int, int] = {}
    finished: set[int] = set()
    admitted = []
    for op in plan.ops:
      self.apply(op)
      if isinstance(op, Admit):
        admitted.append(op.request_id)
    assert {c: len(r) for c, r in self.arenas.items()} == dict(plan.arena_slots)
    for rid in admitted:  # the prefill's token
      self._sample(self.jobs[rid], tokens, finished)
    occupied = {(c, s): row.rid for c, rows in self.arenas.items() for s, row in enumerate(rows)
                if row is not None}
    planned = {(c, s): rid for c, pairs in plan.decode.items() for s, rid in pairs}
    assert planned == {k: v for k, v in occupied.items() if v not in admitted}, (planned, occupied)
    for (c, s), rid in planned.items():
      row, job = self.arenas[c][s], self.jobs[rid]
      seq = job.sequence
      assert row.kv == seq[:-1], (rid, row.kv, seq)  # positions 0 .. total_len - 2 written
      assert len(seq) <= c, f"request {rid} decodes position {len(seq) - 1} in class {c}"
      row.kv.append(seq[-1])
      self._sample(job, tokens, finished)
    for c, rows in self.arenas.items():  # finished sequences leave their rows; no op says so
      for s, row in enumerate(rows):
        if row is not None and row.rid in finished:
          rows[s] = None
    self.step += 1
    return StepResult(tokens=tokens, finished=frozenset(finished))


def run(scheduler: Scheduler, engine: FakeEngine, arrivals: dict[int, list[tuple[SchedRequest, int]]],
        max_steps: int = 10_000, on_step=None) -> int:
  """Drives submit/schedule/execute/update until all work is done; returns the step count.

  Args:
    arrivals: step -> ``(request, true_len)`` submitted before that step's schedule.
    on_step: called as ``on_step(step, plan)`` after each update.
  """
  last = max(arrivals, default=0)
  while engine.step <= last or scheduler.has_work:
    assert engine.step < max_steps, "workload did not finish"
    for req, true_len in arrivals.get(engine.step, ()):
      engine.add(req, true_len)
      scheduler.submit(req)
    step = engine.step
    plan = scheduler.schedule()
    result = engine.execute(plan)
    scheduler.update(result)
    assert scheduler.reserved_bytes == engine.reserved_bytes()
    if on_step is not None:
      on_step(step, plan)
  return engine.step
