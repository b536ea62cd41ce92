"""The length-aware, iteration-level scheduler: plans each step, consumes its result.

Plain host code, no tensors. The engine thread owns the scheduler and calls, per iteration,
``schedule()`` and, for the oldest plan in flight, ``update()``; ``submit`` and ``cancel`` are
called on that same thread between those calls. Nothing here locks.

A step (``schedule``) runs in this order:

1. Finishes: a sequence that has produced ``max_tokens`` tokens is released (its count is exact
   even while its last tokens are in flight). Releases of sequences that ``update`` or ``cancel``
   ended since the last plan come first.
2. Reserving policies only, the supervisor (``supervisor_policy``): every running sequence that
   outgrew its class grows into a larger class or is preempted.
3. Pages: every decoded row that starts a new page this step is granted one. When the pool has
   too few free, the policy's victims (``eviction``) are evicted until the rest fit (never under
   a reserving policy, whose reservations hold every page its sequences can write).
4. Admission, unless the step evicted (vLLM's rule, for every policy that evicts): preempted
   requests first (oldest first), then the waiting ones in the policy's ``AdmissionOrder``, while
   a row is free, at most ``max_admissions_per_step``, and while the policy's test passes:
   reservations within the budget (reserving policies), the prompt's pages free (on-demand),
   SGLang's ratio-charged tokens free (adaptive), or the predicted peak of the pool's use within
   it at the configured risk (s3, oracle: ``peak``). Each admission takes its prefill's pages.
   With ``prefix_caching``, an admission first reads the longest run of its prompt's full pages
   that are cached (``pages``): those cost it nothing, it prefills only the rest (``Admit.start``),
   and a prompt whose next page another admission is writing this step waits one step to read it.
   Every test counts a page that several sequences read once.
   With ``max_prefill_tokens``, the prompt being prefilled in chunks gets its next chunk first,
   then admissions take what is left of the iteration's prefill tokens: a prompt that does not
   fit starts as a chunk if no other prompt is being chunked, else it waits (and those after it).
   A prompt in chunks holds its row and all its pages, is never evicted, and decodes from the
   iteration of its last chunk.
5. Rows: when fewer rows are live than the highest occupied row, the highest ones move down so
   the smallest batch size holding them is used; admissions take the lowest free rows.

Emission order: Release/Preempt ops, Grows, MoveRows, Admits; then the page grants.

Starvation: the admission order's bounds are stated in ``admission``.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

from s3jax.errors import QueueFullError, RequestError
from s3jax.scheduler import adaptive, eviction
from s3jax.scheduler.admission import AdmissionBudget, note_bypasses, order_key
from s3jax.scheduler.config import AdmissionOrder, MemoryLayout, Policy, SchedulerConfig, check_budget
from s3jax.scheduler.pages import PageAllocator
from s3jax.scheduler.peak import PeakForecast
from s3jax.scheduler.plan import (
  Admit,
  Grant,
  Grow,
  MoveRow,
  Op,
  Preempt,
  PrefillChunk,
  Release,
  ReleaseReason,
  SchedRequest,
  StepPlan,
  StepResult,
)
from s3jax.scheduler.reservation import class_for, reservation_tokens
from s3jax.scheduler.rows import Rows
from s3jax.scheduler.sequence import RequestState, SchedulerStats, Seq, length_for
from s3jax.scheduler.supervisor_policy import Overflow, decide_overflows, resume_cache_len


class Scheduler:
  """Decides admissions, rows, pages and evictions each iteration; see the module docstring."""

  def __init__(self, config: SchedulerConfig, *, kv_bytes_per_token: int, max_len: int):
    self._config = config
    self._policy = config.policy
    self._order = config.order
    self._layout = config.layout(kv_bytes_per_token=kv_bytes_per_token, max_len=max_len)
    self._usable = self._layout.usable_cache_lens
    check_budget(config, self._layout)
    self._rows = Rows(self._layout.max_slots)
    self._pages = PageAllocator(self._layout.num_pages)
    self._seqs: dict[int, Seq] = {}
    self._waiting: list[Seq] = []  # fresh, sorted by key
    self._resumes: list[Seq] = []  # preempted, by arrival
    self._starving: set[Seq] = set()  # PACK: waiting, bypassed more than starvation_limit times
    self._hol: Seq | None = None  # the oldest of them
    self._arrivals = 0
    self._admissions = 0
    self._steps = 0
    self._ratio = adaptive.NewTokenRatio() if config.policy is Policy.ADAPTIVE else None
    self._pending: list[Release] = []  # rows freed by update() or cancel(), for the next plan
    self._inflight: collections.deque[frozenset[int]] = collections.deque()
    self._stats = SchedulerStats()

  # ---- requests in ----

  @property
  def max_total_len(self) -> int:
    """The longest prompt + answer a request may ask for: the largest class the budget holds
    under a reserving policy, the whole pool (at most the model's maximum) under the others."""
    if self._policy.reserves:
      return self._usable[-1]
    return min(self._layout.max_len, self._layout.num_pages * self._layout.page_size)

  def check_lengths(self, prompt_len: int, max_tokens: int) -> None:
    """Raises ValueError unless a prompt of ``prompt_len`` tokens can run to ``max_tokens`` tokens.

    Every accepted request then fits the budget alone, so none is cut short.
    """
    if prompt_len < 1:
      raise RequestError("prompt", "prompt is empty: give at least one token of prompt")
    if max_tokens < 1:
      raise RequestError("max_tokens", f"max_tokens must be >= 1, got {max_tokens}")
    if prompt_len + max_tokens > self.max_total_len:
      raise RequestError(
        "prompt",  # OpenAI's param of a context-length error: the prompt is what overflows it
        f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds {self.max_total_len} tokens, the "
        f"longest sequence this engine holds (model maximum {self._layout.max_len}, memory budget "
        f"{self._config.memory_budget_bytes} bytes); shorten the prompt, lower max_tokens or raise the "
        f"memory budget",
      )

  def submit(self, req: SchedRequest) -> None:
    """Queues a request.

    Raises:
      ValueError: a duplicate id, a non-positive length, a prompt + ``max_tokens`` that no class
        the budget holds can take (then it could never finish without being cut short), or a
        request without the length hint its policy reads.
      QueueFullError: ``max_waiting`` requests are waiting already.
    """
    cfg = self._config
    rid = req.request_id
    if rid in self._seqs:
      raise ValueError(f"request {rid} is already scheduled")
    self.check_lengths(req.prompt_len, req.max_tokens)
    if cfg.max_waiting is not None and self.num_waiting >= cfg.max_waiting:
      raise QueueFullError(f"{self.num_waiting} requests waiting (max_waiting={cfg.max_waiting})")
    length = length_for(self._policy, req)
    fresh_class = class_for(self._layout.cache_lens, req.prompt_len + 1)
    if self._policy.reserves:
      fresh_class = class_for(
        self._layout.cache_lens, reservation_tokens(self._policy, req, self._layout.max_len, cfg.constant_output_len)
      )
    seq = Seq(req=req, arrival=self._arrivals, key=(), length=length, fresh_class=fresh_class, total_len=req.prompt_len)
    seq.key = order_key(self._order, seq, self._steps, self._config.aging_steps, self._layout.max_len)
    self._arrivals += 1
    self._seqs[rid] = seq
    bisect.insort(self._waiting, seq, key=lambda s: s.key)

  def cancel(self, request_id: int) -> None:
    """Forgets a request; a running one's row is released in the next plan.

    Unknown (e.g. already finished) ids are ignored. Tokens of plans in flight that name it are
    accepted and dropped by ``update``.
    """
    seq = self._seqs.get(request_id)
    if seq is not None:
      self._stats.cancelled += 1
      self._forget(seq, ReleaseReason.CANCELLED)

  # ---- one iteration ----

  def schedule(self) -> StepPlan:
    """Plans one iteration; ``update`` must follow, once per plan that runs a request, in order."""
    self._steps += 1
    ops: list[Op] = list(self._pending)
    self._pending.clear()
    running, prefilling = [], []
    for seq in sorted((s for s in self._seqs.values() if s.state is RequestState.RUNNING), key=lambda s: s.admitted):
      if seq.prefilling:
        prefilling.append(seq)
      elif seq.generated >= seq.req.max_tokens:
        self._stats.finished += 1
        ops.append(self._release(seq, ReleaseReason.FINISHED))
      else:
        running.append(seq)
        self._note_outlived(seq)
    if self._policy.reserves:
      running = self._supervise(running, ops)

    needy = [s for s in running if s.total_len > len(s.pages) * self._layout.page_size]
    short = len(needy) - self._pages.free
    may_admit = bool(self._resumes or self._waiting) and self._rows.free > 0
    forecast = None
    if self._policy.forecasts and (short > 0 or may_admit):
      forecast = self._forecast(running + prefilling)  # running first: eviction indexes them
    held = []
    if forecast is not None and short > 0:
      held = eviction.rows_to_pause(running, needy, forecast, short, self._sole_pages(running))
    if held:
      needy = [s for s in needy if s not in held]
    for seq in running:
      seq.held_steps = seq.held_steps + 1 if seq in held else 0
    self._stats.holds += len(held)
    evicted = len(needy) > self._pages.free and self._evict(running, needy, forecast, ops)
    if evicted:
      running = [s for s in running if s.state is RequestState.RUNNING]
      needy = [s for s in needy if s.state is RequestState.RUNNING]
    for seq in needy:
      seq.pages += self._pages.take(1)
    if self._ratio is not None:
      if evicted:
        self._ratio.after_retraction(
          sum(s.generated for s in running), sum(s.req.max_tokens for s in running), len(running)
        )
      elif running:
        self._ratio.decay()

    prefill_budget = self._config.max_prefill_tokens or float("inf")
    finals, chunks = [], []  # the chunked prompt's last chunk, or its next one
    for seq in prefilling:
      n = min(seq.total_len - seq.prefilled, prefill_budget)
      prefill_budget -= n
      self._cache_prompt(seq, seq.prefilled + n)
      if seq.prefilled + n == seq.total_len:
        finals.append(seq)
      else:
        chunks.append(
          PrefillChunk(seq.req.request_id, tuple(seq.pages), seq.prefilled, seq.prefilled + n, seq.chunked.cache_len)
        )
        seq.prefilled += n
    admissions = [] if evicted or held else self._choose_admissions(running, forecast, len(finals))
    admissions = self._within_prefill_budget(admissions, prefill_budget, chunking=bool(chunks))
    if self._ratio is not None and not running and not admissions:
      self._ratio.reset()  # SGLang: idle
    target = self._layout.batch_size_for(self._rows.occupied + len(admissions))
    for rid, src, dst in self._rows.pack(below=target):
      self._seqs[rid].slot = dst
      ops.append(MoveRow(rid, src, dst))
      self._stats.row_moves += 1
    idle = {s.req.request_id for s in held + prefilling}
    decode = tuple((slot, rid) for slot, rid in self._rows.occupants() if rid not in idle)
    for seq in finals:
      ops.append(dataclasses.replace(seq.chunked, slot=seq.slot, start=seq.prefilled))
      seq.chunked, seq.prefilled = None, 0
      self._stats.prefill_chunks += 1
    ops += chunks
    self._stats.prefill_chunks += len(chunks)
    for seq, cache_len, chunk in admissions:
      admit = self._admit(seq, cache_len)
      if chunk is None:
        ops.append(admit)
        self._cache_prompt(seq, seq.total_len)
      else:
        seq.chunked, seq.prefilled = admit, admit.start + chunk
        ops.append(PrefillChunk(admit.request_id, admit.pages, admit.start, seq.prefilled, admit.cache_len))
        self._cache_prompt(seq, seq.prefilled)
        self._stats.prefill_chunks += 1
    if self._order is AdmissionOrder.PACK and admissions:
      waiting = (*self._resumes, *self._waiting)
      limit = self._config.starvation_limit
      self._starving.update(note_bypasses([seq for seq, _, _ in admissions], waiting, limit, self._stats))
      self._hol = min(self._starving, key=lambda s: s.arrival, default=None)
    grants = tuple(Grant(s.req.request_id, s.slot, len(s.pages) - 1, s.pages[-1]) for s in needy)

    plan = StepPlan(
      ops=tuple(ops),
      decode=decode,
      grants=grants,
      held=tuple((s.slot, s.req.request_id) for s in held),
      scan_pages=self._pages.high_water,
    )
    expected = plan.expected_tokens
    for rid in expected:
      self._seqs[rid].total_len += 1
    if expected:  # a plan that runs nothing (only releases) has no result
      self._inflight.append(expected)
    return plan

  def update(self, result: StepResult) -> None:
    """Consumes the outcome of the oldest plan in flight: its tokens, and which requests ended.

    Raises:
      RuntimeError: no plan is in flight.
      ValueError: the result lacks a token of a request the plan ran and the scheduler still
        holds, names a request the plan did not run, or finishes one the plan did not run.
    """
    if not self._inflight:
      raise RuntimeError("update() without schedule()")
    planned = self._inflight[0]
    got = frozenset(result.tokens)
    missing = {rid for rid in planned - got if rid in self._seqs}
    if missing or not got <= planned:
      raise ValueError(
        f"step result tokens do not match the plan: missing {sorted(missing)}, unexpected {sorted(got - planned)}"
      )
    if not result.finished <= planned:
      raise ValueError(f"finished requests not in the plan: {sorted(result.finished - planned)}")
    self._inflight.popleft()
    for rid in result.finished:
      seq = self._seqs.get(rid)
      if seq is not None:
        self._stats.finished += 1
        self._forget(seq, ReleaseReason.FINISHED)

  # ---- the supervisor of reserving policies ----

  def _supervise(self, running: list[Seq], ops: list[Op]) -> list[Seq]:
    """Grows or preempts every sequence that outgrew its class; returns those still running."""
    outgrown = sorted((s for s in running if s.total_len > s.cache_len), key=lambda s: s.arrival)
    overflows = [
      Overflow(request_id=s.req.request_id, cache_len=s.cache_len, total_len=s.total_len, shared_pages=shared)
      for s, shared in zip(outgrown, self._shared_pages(outgrown))
    ]
    if not overflows:
      return running
    decision = decide_overflows(overflows, self._layout.num_pages - self._reserved(), self._layout)
    for o in decision.preempts:
      seq = self._seqs[o.request_id]
      seq.outgrown = seq.cache_len
      self._note_misprediction(seq)
      ops.append(self._preempt(seq))
    for o, dst in decision.grows:
      seq = self._seqs[o.request_id]
      ops.append(Grow(o.request_id, seq.slot, seq.cache_len, dst))
      seq.cache_len = dst
      self._stats.grows += 1
      self._note_misprediction(seq)
    return [s for s in running if s.state is RequestState.RUNNING]

  # ---- pages and eviction ----

  def _forecast(self, running: list[Seq]) -> PeakForecast:
    """The running sequences' forecast, its grid holding the ends of the next candidates; the
    cached prefix pages they read are counted once, as held throughout."""
    cap = self._config.max_admissions_per_step
    cached = [[p for p in s.pages if self._pages.is_cached(p)] for s in running]
    return PeakForecast(
      [s.forecast(shared_pages=len(c)) for s, c in zip(running, cached)],
      [s.forecast() for s in (self._resumes + self._waiting)[:cap]],
      num_pages=self._layout.num_pages,
      page_size=self._layout.page_size,
      max_len=self._layout.max_len,
      risk=self._config.admission_risk,
      lag=len(self._inflight),
      shared_pages=len(set().union(*cached)),
    )

  def _evict(self, running: list[Seq], needy: list[Seq], forecast: PeakForecast | None, ops: list[Op]) -> bool:
    """Evicts the policy's victims until the pages the ``needy`` rows start this step are free."""
    if self._policy.reserves:
      raise AssertionError(f"{len(needy)} pages needed, {self._pages.free} free, under reservations that hold them")
    freed = self._sole_pages(running)
    for seq in eviction.choose_victims(self._policy, running, needy, self._pages.free, forecast, freed):
      ops.append(self._preempt(seq))
    return True

  def _preempt(self, seq: Seq) -> Preempt:
    """Evicts a running sequence; it waits to resume where its policy puts it: vLLM prepends it
    to the waiting queue, SGLang appends it as a new arrival, the others resume the oldest first."""
    op = Preempt(seq.req.request_id, seq.slot)
    self._vacate(seq)
    self._stats.preemptions += 1
    seq.state, seq.preempted, seq.bypassed, seq.preempted_at = RequestState.WAITING, True, 0, self._steps
    if self._policy is Policy.ON_DEMAND:
      self._resumes.insert(0, seq)
    elif self._policy is Policy.ADAPTIVE:
      seq.key = (self._arrivals,)
      self._arrivals += 1
      self._waiting.append(seq)
    else:
      self._resumes.insert(bisect.bisect([s.arrival for s in self._resumes], seq.arrival), seq)
    return op

  # ---- admission ----

  def _resume_class(self, seq: Seq) -> int:
    if self._policy.reserves:
      return resume_cache_len(seq.total_len, seq.outgrown, self._usable)
    return class_for(self._layout.cache_lens, seq.total_len + 1)

  def _within_prefill_budget(
    self, admissions: list[tuple[Seq, int]], tokens: int, *, chunking: bool
  ) -> list[tuple[Seq, int, int | None]]:
    """The admissions, in order, whose prefills the iteration's ``tokens`` hold: ``(seq, class,
    None)``, then perhaps one that starts as a chunk of what is left, ``(seq, class, chunk)``, unless
    a prompt is being ``chunking`` already; the rest wait."""
    chosen = []
    for seq, cache_len in admissions:
      need = seq.total_len - len(seq.hits) * self._layout.page_size
      if need <= tokens:
        chosen.append((seq, cache_len, None))
        tokens -= need
        continue
      if not chunking and tokens > 0:
        chosen.append((seq, cache_len, tokens))
      break
    return chosen

  def _choose_admissions(
    self, running: list[Seq], forecast: PeakForecast | None, finals: int = 0
  ) -> list[tuple[Seq, int]]:
    """Picks admissions in the admission order while the policy's test passes; ``(seq, class)``.
    ``finals``: chunked prompts whose last chunk is admitted this step (they take admission lines)."""
    budget = AdmissionBudget(
      self._policy,
      self._layout,
      cap=min(self._config.max_admissions_per_step - finals, self._rows.free),
      free_pages=self._pages.free,
      free_reserved=self._layout.num_pages - self._reserved(),
      ratio=self._ratio,
      running=running,
      forecast=forecast,
      pages=self._pages if self._config.prefix_caching else None,
      step=self._steps,
    )
    if self._hol is not None:
      hol = self._hol
      budget.admit(hol, self._resume_class(hol) if hol.preempted else hol.fresh_class)
      return budget.chosen
    for seq in self._resumes:
      # Preempted in this step, its last tokens may still be in flight: it resumes from the next.
      if seq.preempted_at == self._steps or not budget.admit(seq, self._resume_class(seq)):
        return budget.chosen
    skipped = None  # PACK: the class that did not fit; its later requests cost the same
    for seq in self._waiting:
      if budget.full:
        break
      if seq.fresh_class == skipped:
        continue
      if not budget.admit(seq, self._resume_class(seq) if seq.preempted else seq.fresh_class):
        if self._order is not AdmissionOrder.PACK:
          break
        skipped = seq.fresh_class
    return budget.chosen

  def _admit(self, seq: Seq, cache_len: int) -> Admit:
    rid = seq.req.request_id
    resume = seq.preempted
    start = len(seq.hits) * self._layout.page_size
    if resume:
      (self._resumes if seq in self._resumes else self._waiting).remove(seq)
      self._stats.resumes += 1
      # The KV of positions 0 .. total_len - 2 existed before the preemption.
      self._stats.recomputed_tokens += seq.total_len - 1 - start
    else:
      self._waiting.remove(seq)
    if seq in self._starving:
      self._starving.remove(seq)
      self._stats.head_of_line_admissions += 1
    seq.slot = self._rows.place(rid)
    self._pages.share(seq.hits)
    seq.pages = seq.hits + self._pages.take(-(-seq.total_len // self._layout.page_size) - len(seq.hits))
    seq.hits = []
    self._stats.prefill_tokens += seq.total_len
    self._stats.cached_tokens += start
    if self._policy.reserves:
      seq.cache_len = cache_len
    self._admissions += 1
    self._stats.admissions += 1
    seq.state, seq.admitted = RequestState.RUNNING, self._admissions
    seq.bypassed, seq.preempted, seq.outgrown = 0, False, 0
    return Admit(rid, seq.slot, tuple(seq.pages), cache_len if self._policy.reserves else 0, resume, start)

  # ---- leaving ----

  def _vacate(self, seq: Seq) -> None:
    self._rows.vacate(seq.slot, seq.req.request_id)
    self._pages.give(seq.pages)
    seq.pages = []

  def _reserved(self) -> int:
    """Reserving policies: the pages in use plus those the running sequences' classes may still
    take (a cached prefix several read is in use once)."""
    headroom = sum(
      self._layout.pages_for(s.cache_len) - len(s.pages) for s in self._seqs.values() if s.state is RequestState.RUNNING
    )
    return self._pages.in_use + headroom

  def _sole_pages(self, seqs: list[Seq]) -> list[int]:
    """The pages each sequence alone reads: what its eviction frees."""
    return [sum(self._pages.readers(p) == 1 for p in s.pages) for s in seqs]

  def _shared_pages(self, seqs: list[Seq]) -> list[int]:
    """The pages each sequence reads with others: what its eviction leaves in use."""
    return [len(s.pages) - n for s, n in zip(seqs, self._sole_pages(seqs))]

  def _cache_prompt(self, seq: Seq, end: int) -> None:
    """Prefix caching: the prompt's full pages below token ``end``, prefilled in this step, are
    read by admissions from the next step on."""
    if self._config.prefix_caching:
      keys = seq.req.page_hashes[: end // self._layout.page_size]
      self._pages.cache(seq.pages[: len(keys)], keys, ready=self._steps + 1)

  def _release(self, seq: Seq, reason: ReleaseReason) -> Release:
    """Frees a running sequence's row, pages and reservation and forgets it."""
    self._vacate(seq)
    del self._seqs[seq.req.request_id]
    return Release(seq.req.request_id, seq.slot, reason)

  def _forget(self, seq: Seq, reason: ReleaseReason) -> None:
    """Drops a request wherever it is; a running one's Release goes into the next plan."""
    if seq.state is RequestState.RUNNING:
      self._pending.append(self._release(seq, reason))
      return
    del self._seqs[seq.req.request_id]
    (self._resumes if seq in self._resumes else self._waiting).remove(seq)
    self._starving.discard(seq)
    self._hol = min(self._starving, key=lambda s: s.arrival, default=None)

  def _note_outlived(self, seq: Seq) -> None:
    """s3: a sequence that outlives its predicted length is a misprediction (its forecast is
    conditional on what it has generated from then on)."""
    if self._policy is Policy.S3 and not seq.mispredicted:
      predicted = seq.req.predicted_output_len
      if predicted is not None and seq.generated > predicted:
        self._note_misprediction(seq)

  def _note_misprediction(self, seq: Seq) -> None:
    if not seq.mispredicted:
      seq.mispredicted = True
      self._stats.mispredictions += 1

  # ---- introspection ----

  @property
  def config(self) -> SchedulerConfig:
    return self._config

  @property
  def layout(self) -> MemoryLayout:
    return self._layout

  @property
  def reserved_bytes(self) -> int:
    """Bytes the running sequences hold for admission: their classes' pages under a reserving
    policy, the pages they use under the others."""
    pages = self._reserved() if self._policy.reserves else self._pages.in_use
    return pages * self._layout.page_bytes

  @property
  def used_bytes(self) -> int:
    """Bytes of the pages in use."""
    return self._pages.in_use * self._layout.page_bytes

  @property
  def cached_pages(self) -> int:
    """Pages holding a cached prompt prefix, in use or free."""
    return self._pages.cached

  @property
  def plans_in_flight(self) -> int:
    return len(self._inflight)

  @property
  def num_running(self) -> int:
    return self._rows.occupied

  @property
  def num_waiting(self) -> int:
    return len(self._seqs) - self.num_running

  def running_per_class(self) -> dict[int, int]:
    """Running requests by the class they reserve (reserving policies) or that holds them now."""
    counts = collections.Counter(
      s.cache_len if self._policy.reserves else class_for(self._layout.cache_lens, s.total_len)
      for s in self._seqs.values()
      if s.state is RequestState.RUNNING
    )
    return {c: counts[c] for c in self._layout.cache_lens}

  def waiting_per_class(self) -> dict[int, int]:
    """Waiting requests by the class they would be admitted into now."""
    counts = collections.Counter(self._resume_class(s) if s.preempted else s.fresh_class for s in self._waiting)
    counts.update(self._resume_class(s) for s in self._resumes)
    return {c: counts[c] for c in self._layout.cache_lens}

  def state(self, request_id: int) -> RequestState | None:
    seq = self._seqs.get(request_id)
    return None if seq is None else seq.state

  def total_len(self, request_id: int) -> int | None:
    seq = self._seqs.get(request_id)
    return None if seq is None else seq.total_len

  @property
  def head_of_line(self) -> int | None:
    """PACK: the starving request everything else waits behind, if any."""
    return None if self._hol is None else self._hol.req.request_id

  @property
  def new_token_ratio(self) -> float | None:
    """ADAPTIVE: SGLang's ratio now."""
    return None if self._ratio is None else self._ratio.value

  @property
  def stats(self) -> SchedulerStats:
    """A snapshot of the counters."""
    return dataclasses.replace(self._stats)

  @property
  def has_work(self) -> bool:
    return bool(self._seqs) or bool(self._pending)
