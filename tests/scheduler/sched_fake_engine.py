"""A fake engine for scheduler tests: plain Python, arithmetic checkable by hand.

Each request has a scripted true output length T. Its output token number i has id i, so a
complete answer is exactly ``list(range(T))``: a lost token leaves a gap, a repeated one a
duplicate. A row is modelled as the list of token ids whose keys/values are written (position p
holds the sequence's token p), so a resume that skips a token or a decode at the wrong position
shows up as a wrong row. Pages are modelled too, with the token each position of each page holds:
an admission gets exactly the pages its sequence needs, a grant the page its row starts, every
decoded position lies in a page its row alone holds, and a row reads its whole sequence from its
pages. With prefix caching (``run(prefix_caching=True)`` gives every request its prompt's page
keys, and every prompt starts with the same tokens) an admission's first ``start`` tokens are read
from pages other sequences wrote, which must hold exactly those tokens; a page is written only
while one sequence holds it. Every op is checked as it runs: the pages in use (and,
under a reserving policy, the reservations) after it against the budget, one request per row, a
row freed only by its own request.

With ``depth=1`` (``run``), results reach the scheduler one plan late, as with the real engine:
a request that ended may then be planned once more; its row decodes nothing and it reports no
token for it, as the real engine drops such tokens.
"""

from __future__ import annotations

import dataclasses

from s3jax.scheduler import (
  Admit,
  Grant,
  Grow,
  MoveRow,
  Preempt,
  PrefillChunk,
  Release,
  ReleaseReason,
  SchedRequest,
  Scheduler,
  StepPlan,
  StepResult,
  prefix_hashes,
)


@dataclasses.dataclass
class Job:
  req: SchedRequest
  true_len: int  # tokens the model will produce (EOS after them), <= max_tokens
  output: list[int] = dataclasses.field(default_factory=list)
  done: bool = False
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
  cache_len: int  # the class reserved; 0 under a policy that reserves nothing
  pages: list[int]


class FakeEngine:
  """Executes plans op by op against rows, checking every invariant."""

  def __init__(self, scheduler: Scheduler):
    self.layout = scheduler.layout
    self.reserves = scheduler.config.policy.reserves
    self.rows: list[_Row | None] = [None] * self.layout.max_slots
    self.readers: dict[int, set[int]] = {}  # page in use -> the requests holding it
    self.content: dict[int, list[int | None]] = {}  # page -> the token at each of its positions (kept when freed)
    self.jobs: dict[int, Job] = {}
    self.step = 0
    self.peak_bytes = 0
    self.peak_pages = 0
    self.ops_seen: list = []
    self.chunked: dict[int, tuple[tuple[int, ...], int]] = {}  # request -> (its pages, tokens prefilled)
    self.chunk_classes: dict[int, int] = {}  # request -> the class it reserves while its prompt is prefilled

  def add(self, req: SchedRequest, true_len: int) -> Job:
    job = Job(req=req, true_len=min(true_len, req.max_tokens))
    self.jobs[req.request_id] = job
    return job

  def reserved_bytes(self) -> int:
    """What the scheduler's ``reserved_bytes`` must equal: classes' pages, or pages in use."""
    pages = len(self.readers)
    if self.reserves:  # pages in use, plus what each class may still take
      pages += sum(self.layout.pages_for(row.cache_len) - len(row.pages) for row in self.rows if row is not None)
      pages += sum(self.layout.pages_for(c) - len(self.chunked[rid][0]) for rid, c in self.chunk_classes.items())
    return pages * self.layout.page_bytes

  def _check_budget(self) -> None:
    used = self.reserved_bytes()
    self.peak_bytes = max(self.peak_bytes, used)
    self.peak_pages = max(self.peak_pages, len(self.readers))
    assert used <= self.layout.num_pages * self.layout.page_bytes, used
    assert len(self.readers) <= self.layout.num_pages

  def _take(self, page: int, rid: int) -> None:
    assert 0 <= page < self.layout.num_pages and page not in self.readers, (page, rid, self.readers.get(page))
    self.readers[page] = {rid}
    self.content[page] = [None] * self.layout.page_size

  def _share(self, pages: tuple[int, ...], rid: int, seq: list[int]) -> None:
    """``rid`` reads these pages, already holding its first tokens, without writing them."""
    g = self.layout.page_size
    for i, page in enumerate(pages):
      assert self.content.get(page) == seq[i * g : (i + 1) * g], (rid, page, self.content.get(page), seq[: (i + 1) * g])
      self.readers.setdefault(page, set()).add(rid)

  def _write(self, rid: int, pages, start: int, tokens: list[int]) -> None:
    """Writes ``tokens`` at positions ``start ..`` of the sequence whose pages these are."""
    g = self.layout.page_size
    for position, token in enumerate(tokens, start):
      page = pages[position // g]
      assert self.readers[page] == {rid}, f"request {rid} writes page {page}, which {self.readers[page]} hold"
      self.content[page][position % g] = token

  def _release_pages(self, pages, rid: int) -> None:
    for page in pages:
      self.readers[page].remove(rid)
      if not self.readers[page]:
        del self.readers[page]

  def _free(self, row: _Row) -> None:
    self._release_pages(row.pages, row.rid)

  def _sample(self, job: Job, tokens: dict[int, int], finished: set[int]) -> None:
    token = len(job.output)  # token id = its index in the answer
    job.output.append(token)
    tokens[job.req.request_id] = token
    if len(job.output) >= job.true_len:
      job.done = True
      job.finished_step = self.step
      finished.add(job.req.request_id)

  def _row(self, slot: int, rid: int) -> _Row:
    row = self.rows[slot]
    assert row is not None and row.rid == rid, (slot, rid, row)
    return row

  def apply(self, op) -> None:
    self.ops_seen.append(op)
    if isinstance(op, Release) and op.request_id in self.chunked:  # cancelled while its prompt is prefilled
      pages, _ = self.chunked.pop(op.request_id)
      self.chunk_classes.pop(op.request_id, None)
      self._release_pages(pages, op.request_id)
      assert op.reason is ReleaseReason.CANCELLED, op
      self.jobs[op.request_id].done = self.jobs[op.request_id].cancelled = True
    elif isinstance(op, PrefillChunk):
      job = self.jobs[op.request_id]
      seq = job.sequence
      assert 0 <= op.start < op.end < len(seq), (op, len(seq))  # the last chunk is the Admit's
      if op.request_id not in self.chunked:  # its first chunk: after its cached prefix
        assert len(op.pages) == -(-len(seq) // self.layout.page_size), (op, len(seq))
        self._admit_pages(op.request_id, op.pages, op.start, seq)
      else:
        assert self.chunked[op.request_id] == (op.pages, op.start), (op, self.chunked.get(op.request_id))
      self._write(op.request_id, op.pages, op.start, seq[op.start : op.end])
      self.chunked[op.request_id] = (op.pages, op.end)
      if self.reserves:
        assert self.chunk_classes.setdefault(op.request_id, op.cache_len) == op.cache_len > len(seq), op
    elif isinstance(op, MoveRow) and op.request_id in self.chunked:  # its row is not live yet: nothing moves
      assert self.rows[op.dst_slot] is None, op
    elif isinstance(op, (Release, Preempt)):
      assert op.request_id not in self.chunked, op  # a prompt being prefilled is never evicted
      row = self._row(op.slot, op.request_id)
      self._free(row)
      self.rows[op.slot] = None
      job = self.jobs[op.request_id]
      if isinstance(op, Release):
        if op.reason is ReleaseReason.CANCELLED:
          job.done = job.cancelled = True
        assert job.done, op
    elif isinstance(op, Grow):
      row = self._row(op.slot, op.request_id)
      assert self.reserves and row.cache_len == op.cache_len < op.new_cache_len, (op, row)
      row.cache_len = op.new_cache_len
    elif isinstance(op, MoveRow):
      row = self._row(op.src_slot, op.request_id)
      assert self.rows[op.dst_slot] is None and op.dst_slot < op.src_slot, op
      self.rows[op.src_slot], self.rows[op.dst_slot] = None, row
    elif isinstance(op, Admit):
      assert self.rows[op.slot] is None, op
      job = self.jobs[op.request_id]
      assert not job.done, op
      assert op.resume == bool(job.output), (op, job.output)
      seq = job.sequence
      assert len(op.pages) == -(-len(seq) // self.layout.page_size), (op, len(seq))  # what its prefill writes
      if op.request_id in self.chunked:  # the last chunk: its pages were taken by the first
        assert self.chunked.pop(op.request_id) == (op.pages, op.start), op
        assert self.chunk_classes.pop(op.request_id, 0) == op.cache_len, op
      else:
        self._admit_pages(op.request_id, op.pages, op.start, seq)
      self._write(op.request_id, op.pages, op.start, seq[op.start :])
      if self.reserves:
        assert len(seq) < op.cache_len, (op, len(seq))  # prefill writes seq; its next decode one more
      else:
        assert op.cache_len == 0, op
      self.rows[op.slot] = _Row(op.request_id, list(seq), op.cache_len, list(op.pages))
      if job.admitted_step is None:
        job.admitted_step = self.step
    else:
      raise AssertionError(f"unknown op {op!r}")
    self._check_budget()

  def _admit_pages(self, rid: int, pages: tuple[int, ...], start: int, seq: list[int]) -> None:
    """An admission's pages: its cached prefix's (``start`` tokens, whole pages) read, the rest taken."""
    g = self.layout.page_size
    assert start % g == 0 and start < len(seq), (rid, start, len(seq))
    self._share(pages[: start // g], rid, seq)
    for page in pages[start // g :]:
      self._take(page, rid)

  def grant(self, grant: Grant) -> None:
    row = self._row(grant.slot, grant.request_id)
    assert grant.index == len(row.pages), (grant, row.pages)
    self._take(grant.page, grant.request_id)
    row.pages.append(grant.page)
    self._check_budget()

  def execute(self, plan: StepPlan) -> StepResult:
    """Runs the ops in order, the grants, then prefill tokens and one decode step."""
    tokens: dict[int, int] = {}
    finished: set[int] = set()
    for op in plan.ops:
      self.apply(op)
    for grant in plan.grants:
      self.grant(grant)
    assert plan.scan_pages == max(self.readers, default=-1) + 1, (plan.scan_pages, sorted(self.readers))
    admitted = [op.request_id for op in plan.ops if isinstance(op, Admit)]
    for rid in admitted:  # the prefill's token
      self._sample(self.jobs[rid], tokens, finished)
    occupied = {s: row.rid for s, row in enumerate(self.rows) if row is not None and row.rid not in admitted}
    assert {**dict(plan.decode), **dict(plan.held)} == occupied, (plan.decode, plan.held, occupied)
    assert not set(dict(plan.decode)) & set(dict(plan.held)), plan  # a held row neither decodes nor samples
    # A prompt being prefilled in chunks holds a row too, not live yet.
    holding = len(occupied) + len(admitted) + len(self.chunked)
    assert max(occupied, default=-1) < self.layout.batch_size_for(holding), plan
    for s, rid in plan.decode:
      row, job = self.rows[s], self.jobs[rid]
      # Every decoded row holds the page of the position it writes, ended or not.
      position = len(row.kv)
      assert position < len(row.pages) * self.layout.page_size, f"request {rid} writes position {position} unpaged"
      if job.done:  # ended in an earlier step the scheduler has not heard of yet
        continue
      seq = job.sequence
      assert row.kv == seq[:-1], (rid, row.kv, seq)  # positions 0 .. total_len - 2 written
      g = self.layout.page_size
      assert [self.content[row.pages[p // g]][p % g] for p in range(position)] == row.kv, rid  # ... in its pages
      if self.reserves:
        assert len(seq) <= row.cache_len, f"request {rid} decodes position {len(seq) - 1} in class {row.cache_len}"
      self._write(rid, row.pages, position, [seq[-1]])
      row.kv.append(seq[-1])
      self._sample(job, tokens, finished)
    self.step += 1
    return StepResult(tokens=tokens, finished=frozenset(finished))


def run(
  scheduler: Scheduler,
  engine: FakeEngine,
  arrivals: dict[int, list[tuple[SchedRequest, int]]],
  max_steps: int = 10_000,
  on_step=None,
  depth: int = 0,
  prefix_caching: bool = False,
) -> int:
  """Drives submit/schedule/execute/update until all work is done; returns the step count.

  Args:
    arrivals: step -> ``(request, true_len)`` submitted before that step's schedule.
    on_step: called as ``on_step(step, plan)`` after each schedule.
    depth: plans executed before their result is given to ``update`` (0 or 1).
    prefix_caching: every request carries its prompt's page keys (every prompt starts alike).
  """
  last = max(arrivals, default=0)
  pending: list[StepResult] = []
  while engine.step <= last or scheduler.has_work or pending:
    assert engine.step < max_steps, "workload did not finish"
    for req, true_len in arrivals.get(engine.step, ()):
      if prefix_caching:
        req = dataclasses.replace(req, page_hashes=prefix_hashes(Job(req, 0).prompt, engine.layout.page_size))
      engine.add(req, true_len)
      scheduler.submit(req)
    step = engine.step
    plan = scheduler.schedule()
    result = engine.execute(plan)
    if plan.expected_tokens:
      pending.append(result)
    # Between a plan and the next update the books agree (later, ends wait for the next plan).
    assert scheduler.reserved_bytes == engine.reserved_bytes()
    if on_step is not None:
      on_step(step, plan)
    while len(pending) > depth:
      scheduler.update(pending.pop(0))
    if not scheduler.has_work:
      while pending:
        scheduler.update(pending.pop(0))
  return engine.step
