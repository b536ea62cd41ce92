"""The length-aware, iteration-level scheduler: plans each step, consumes its result.

Plain host code, no tensors. The engine thread owns the scheduler and calls, per iteration,
``schedule()`` and, for the oldest plan in flight, ``update()``; ``submit`` and ``cancel`` are
called on that same thread between those calls. Nothing here locks.

A step (``schedule``) runs in this order:

1. Finishes: a sequence that has produced ``max_tokens`` tokens is released (its count is exact
   even while its last tokens are in flight). Releases of sequences that ``update`` or ``cancel``
   ended since the last plan come first.
2. Supervisor (``supervisor_policy``): every running sequence that outgrew its class grows into a
   larger class or is preempted.
3. Admission. Preempted requests first (oldest first), then, by ``admission_order``, either the
   paper's decreasing first-fit (PACK: classes from largest to smallest, FCFS within a class,
   admitting while the reservations fit the budget (in pages) and a row is free; a class that does
   not fit is skipped, smaller ones are still tried) or shortest first (SHORTEST_FIRST: classes
   from smallest to largest, FCFS within a class, until one does not fit). At most
   ``max_admissions_per_step`` prefills per step.
4. Rows: when fewer rows are live than the highest occupied row, the highest ones move down so
   the smallest batch size holding them is used; admissions take the lowest free rows.

Emission order: Release/Preempt ops, Grows, MoveRows, Admits.

Anti-starvation bound. A waiting request is bypassed when a request that arrived after it is
admitted first. Once bypassed more than ``starvation_limit`` (L) times, the oldest such request
becomes head-of-line: nothing else is admitted until it is (growths of running sequences go on),
so memory freed by finishing sequences is held for it. Hence, per waiting period, a request is
bypassed at most ``L + max_admissions_per_step`` times; and, from the step it is head-of-line,
it is admitted within ``U + 1`` steps, U being the largest class the budget allows, since every
sequence running then finishes or is preempted within U + 1 steps, after which its reservation
fits (``submit`` checks that). With several starving requests, each waits for those older than
it in turn.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import enum

from s3jax.scheduler.config import AdmissionOrder, MemoryLayout, Policy, SchedulerConfig
from s3jax.scheduler.plan import (
  Admit,
  Grow,
  MoveRow,
  Op,
  Preempt,
  QueueFull,
  Release,
  ReleaseReason,
  SchedRequest,
  StepPlan,
  StepResult,
)
from s3jax.scheduler.reservation import class_for, reservation_tokens
from s3jax.scheduler.rows import Rows
from s3jax.scheduler.supervisor_policy import Overflow, decide_overflows, resume_cache_len


class RequestState(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
  """Where a running sequence is: its row and the class it reserves."""

  cache_len: int
  slot: int


@dataclasses.dataclass(slots=True)
class SchedulerStats:
  """Counters since construction (overhead of the supervisor included)."""

  admissions: int = 0  # prefills, fresh and resumed
  resumes: int = 0
  preemptions: int = 0
  grows: int = 0  # re-bucketings into a larger class (no copy)
  mispredictions: int = 0  # requests that grew or were preempted at least once
  recomputed_tokens: int = 0  # KV positions computed again by resumed prefills
  row_moves: int = 0
  finished: int = 0
  cancelled: int = 0
  max_bypass: int = 0  # the most times any waiting request was bypassed in one waiting period
  head_of_line_admissions: int = 0  # admissions of starving requests


@dataclasses.dataclass(slots=True, eq=False)
class _Seq:
  req: SchedRequest
  arrival: int  # submission order; kept across preemptions
  fresh_class: int  # class of the policy's reservation
  total_len: int  # prompt + planned tokens (in-flight ones included)
  state: RequestState = RequestState.WAITING
  cache_len: int = 0  # while running
  slot: int = 0  # while running
  overflowed: int = 0  # after a preemption: the class it outgrew
  bypassed: int = 0
  mispredicted: bool = False

  @property
  def resume(self) -> bool:
    return self.overflowed > 0

  @property
  def generated(self) -> int:
    return self.total_len - self.req.prompt_len


class Scheduler:
  """Decides reservations, rows and admissions each iteration; see the module docstring."""

  def __init__(self, config: SchedulerConfig, *, kv_bytes_per_token: int, max_len: int):
    self._config = config
    self._layout = config.layout(kv_bytes_per_token=kv_bytes_per_token, max_len=max_len)
    self._usable = self._layout.usable_cache_lens
    if not self._usable:
      raise ValueError(
        f"memory budget of {config.memory_budget_bytes} bytes holds no reservation: the shortest class "
        f"({self._layout.cache_lens[0]} tokens) needs {self._reservation_bytes(self._layout.cache_lens[0])} "
        f"bytes; raise it"
      )
    if config.policy is Policy.MAX and self._layout.max_len not in self._usable:
      raise ValueError(
        f"policy 'max' reserves {self._layout.max_len} tokens per request, and one such reservation needs "
        f"{self._reservation_bytes(self._layout.max_len)} bytes: more than the memory budget of "
        f"{config.memory_budget_bytes}; raise the budget or use policy 's3'"
      )
    self._rows = Rows(self._layout.max_slots)
    self._reserved_pages = 0
    self._seqs: dict[int, _Seq] = {}
    self._queues: dict[int, collections.deque[_Seq]] = {c: collections.deque() for c in self._layout.cache_lens}
    self._resumes: list[_Seq] = []  # preempted, by arrival
    self._starving: set[_Seq] = set()  # waiting, bypassed more than starvation_limit times
    self._hol: _Seq | None = None  # the oldest of them
    self._arrivals = 0
    self._pending: list[Release] = []  # rows freed by update() or cancel(), for the next plan
    self._inflight: collections.deque[frozenset[int]] = collections.deque()
    self._stats = SchedulerStats()

  # ---- requests in ----

  @property
  def max_total_len(self) -> int:
    """The longest prompt + answer a request may ask for: the largest class the budget holds."""
    return self._usable[-1]

  def check_lengths(self, prompt_len: int, max_tokens: int) -> None:
    """Raises ValueError unless a prompt of ``prompt_len`` tokens can run to ``max_tokens`` tokens.

    Every accepted request then fits the largest class the budget holds, so none is cut short.
    """
    if prompt_len < 1:
      raise ValueError("prompt is empty: give at least one token of prompt")
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if prompt_len + max_tokens > self.max_total_len:
      raise ValueError(
        f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds {self.max_total_len} tokens, the "
        f"longest sequence this engine holds (model maximum {self._layout.max_len}, memory budget "
        f"{self._config.memory_budget_bytes} bytes); shorten the prompt, lower max_tokens or raise the "
        f"memory budget"
      )

  def submit(self, req: SchedRequest) -> None:
    """Queues a request.

    Raises:
      ValueError: a duplicate id, a non-positive length, or a prompt + ``max_tokens`` that no
        class the budget holds can take (then it could never finish without being cut short).
      QueueFull: ``max_waiting`` requests are waiting already.
    """
    cfg = self._config
    rid = req.request_id
    if rid in self._seqs:
      raise ValueError(f"request {rid} is already scheduled")
    self.check_lengths(req.prompt_len, req.max_tokens)
    if cfg.max_waiting is not None and self.num_waiting >= cfg.max_waiting:
      raise QueueFull(f"{self.num_waiting} requests waiting (max_waiting={cfg.max_waiting})")
    reserved = reservation_tokens(cfg.policy, req, self._layout.max_len, cfg.constant_output_len)
    cache_len = class_for(self._layout.cache_lens, reserved)
    seq = _Seq(req=req, arrival=self._arrivals, fresh_class=cache_len, total_len=req.prompt_len)
    self._arrivals += 1
    self._seqs[rid] = seq
    self._queues[cache_len].append(seq)

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
    ops: list[Op] = list(self._pending)
    self._pending.clear()
    running = []
    for seq in sorted((s for s in self._seqs.values() if s.state is RequestState.RUNNING), key=lambda s: s.arrival):
      if seq.generated >= seq.req.max_tokens:
        self._stats.finished += 1
        ops.append(self._release(seq, ReleaseReason.FINISHED))
      else:
        running.append(seq)

    overflows = [
      Overflow(request_id=s.req.request_id, cache_len=s.cache_len, total_len=s.total_len)
      for s in running
      if s.total_len > s.cache_len
    ]
    decision = decide_overflows(overflows, self._layout.num_pages - self._reserved_pages, self._layout)
    grows: list[Op] = []
    for o in decision.preempts:
      seq = self._seqs[o.request_id]
      ops.append(Preempt(o.request_id, seq.slot, seq.cache_len))
      self._vacate(seq)
      self._stats.preemptions += 1
      self._note_misprediction(seq)
      seq.state, seq.overflowed, seq.bypassed = RequestState.WAITING, seq.cache_len, 0
      self._resumes.insert(bisect.bisect([s.arrival for s in self._resumes], seq.arrival), seq)
    for o, dst in decision.grows:
      seq = self._seqs[o.request_id]
      grows.append(Grow(o.request_id, seq.slot, seq.cache_len, dst))
      self._reserved_pages += self._layout.pages_for(dst) - self._layout.pages_for(seq.cache_len)
      seq.cache_len = dst
      self._stats.grows += 1
      self._note_misprediction(seq)
    ops += grows

    admissions = self._choose_admissions(decision.free_pages)
    target = self._layout.batch_size_for(self._rows.occupied + len(admissions))
    for rid, src, dst in self._rows.pack(below=target):
      self._seqs[rid].slot = dst
      ops.append(MoveRow(rid, src, dst))
      self._stats.row_moves += 1
    decode = tuple(self._rows.occupants())
    for seq, cache_len in admissions:
      ops.append(self._admit(seq, cache_len))
    self._account_bypasses([seq for seq, _ in admissions])

    plan = StepPlan(ops=tuple(ops), decode=decode)
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

  # ---- admission ----

  def _waiting_class(self, seq: _Seq) -> int:
    if seq.resume:
      return resume_cache_len(seq.total_len, seq.overflowed, self._usable)
    return seq.fresh_class

  def _choose_admissions(self, free_pages: int) -> list[tuple[_Seq, int]]:
    """Picks admissions in policy order within the free pages and rows; ``(seq, class)`` pairs."""
    cap = min(self._config.max_admissions_per_step, self._rows.free)
    chosen: list[tuple[_Seq, int]] = []
    taken: set[int] = set()

    def try_admit(seq: _Seq, cache_len: int) -> bool:
      nonlocal free_pages
      pages = self._layout.pages_for(cache_len)
      if len(chosen) >= cap or pages > free_pages:
        return False
      chosen.append((seq, cache_len))
      taken.add(seq.arrival)
      free_pages -= pages
      return True

    if self._hol is not None:
      try_admit(self._hol, self._waiting_class(self._hol))
      return chosen
    for seq in self._resumes:
      try_admit(seq, self._waiting_class(seq))
    # Within a class every request costs the same, so the first one that does not fit ends that
    # class. Decreasing first-fit then tries the smaller classes; shortest first has none left
    # to try, since every later class is larger.
    shortest_first = self._config.admission_order is AdmissionOrder.SHORTEST_FIRST
    for c in self._usable if shortest_first else reversed(self._usable):
      for seq in self._queues[c]:
        if len(chosen) >= cap:
          return chosen
        if seq.arrival not in taken and not try_admit(seq, c):
          if shortest_first:
            return chosen
          break
    return chosen

  def _admit(self, seq: _Seq, cache_len: int) -> Admit:
    rid = seq.req.request_id
    resume = seq.resume
    if resume:
      self._resumes.remove(seq)
      self._stats.resumes += 1
      # The KV of positions 0 .. total_len - 2 existed before the preemption.
      self._stats.recomputed_tokens += seq.total_len - 1
    else:
      self._queues[cache_len].remove(seq)
    if seq in self._starving:
      self._starving.remove(seq)
      self._stats.head_of_line_admissions += 1
    slot = self._rows.place(rid)
    self._reserved_pages += self._layout.pages_for(cache_len)
    self._stats.admissions += 1
    seq.state, seq.cache_len, seq.slot, seq.bypassed, seq.overflowed = (RequestState.RUNNING, cache_len, slot, 0, 0)
    return Admit(rid, slot, cache_len, resume)

  def _account_bypasses(self, admitted: list[_Seq]) -> None:
    """Counts, for each request still waiting, the later arrivals admitted before it."""
    if not admitted:
      return
    arrivals = sorted(seq.arrival for seq in admitted)
    limit = self._config.starvation_limit
    # Queues are in arrival order: only their part older than the newest admission was bypassed.
    for queue in (self._resumes, *self._queues.values()):
      for seq in queue:
        if seq.arrival >= arrivals[-1]:
          break
        seq.bypassed += len(arrivals) - bisect.bisect_right(arrivals, seq.arrival)
        self._stats.max_bypass = max(self._stats.max_bypass, seq.bypassed)
        if seq.bypassed > limit:
          self._starving.add(seq)
    # Also picks the next starving request once the head-of-line one was admitted.
    self._hol = min(self._starving, key=lambda s: s.arrival, default=None)

  # ---- leaving ----

  def _vacate(self, seq: _Seq) -> None:
    self._rows.vacate(seq.slot, seq.req.request_id)
    self._reserved_pages -= self._layout.pages_for(seq.cache_len)

  def _release(self, seq: _Seq, reason: ReleaseReason) -> Release:
    """Frees a running sequence's row and reservation and forgets it."""
    self._vacate(seq)
    del self._seqs[seq.req.request_id]
    return Release(seq.req.request_id, seq.slot, seq.cache_len, reason)

  def _forget(self, seq: _Seq, reason: ReleaseReason) -> None:
    """Drops a request wherever it is; a running one's Release goes into the next plan."""
    if seq.state is RequestState.RUNNING:
      self._pending.append(self._release(seq, reason))
      return
    del self._seqs[seq.req.request_id]
    if seq.resume:
      self._resumes.remove(seq)
    else:
      self._queues[seq.fresh_class].remove(seq)
    self._starving.discard(seq)
    self._hol = min(self._starving, key=lambda s: s.arrival, default=None)

  def _note_misprediction(self, seq: _Seq) -> None:
    if not seq.mispredicted:
      seq.mispredicted = True
      self._stats.mispredictions += 1

  def _reservation_bytes(self, cache_len: int) -> int:
    return self._layout.pages_for(cache_len) * self._layout.page_bytes

  def _waiting(self):
    yield from self._resumes
    for queue in self._queues.values():
      yield from queue

  # ---- introspection ----

  @property
  def config(self) -> SchedulerConfig:
    return self._config

  @property
  def layout(self) -> MemoryLayout:
    return self._layout

  @property
  def reserved_bytes(self) -> int:
    """Bytes the running sequences reserve now."""
    return self._reserved_pages * self._layout.page_bytes

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
    counts = collections.Counter(s.cache_len for s in self._seqs.values() if s.state is RequestState.RUNNING)
    return {c: counts[c] for c in self._layout.cache_lens}

  def waiting_per_class(self) -> dict[int, int]:
    """Waiting requests by the class they would be admitted into now."""
    counts = collections.Counter(self._waiting_class(s) for s in self._waiting())
    return {c: counts[c] for c in self._layout.cache_lens}

  def state(self, request_id: int) -> RequestState | None:
    seq = self._seqs.get(request_id)
    return None if seq is None else seq.state

  def placement(self, request_id: int) -> Placement | None:
    seq = self._seqs.get(request_id)
    if seq is None or seq.state is not RequestState.RUNNING:
      return None
    return Placement(seq.cache_len, seq.slot)

  def total_len(self, request_id: int) -> int | None:
    seq = self._seqs.get(request_id)
    return None if seq is None else seq.total_len

  @property
  def head_of_line(self) -> int | None:
    """The starving request everything else waits behind, if any."""
    return None if self._hol is None else self._hol.req.request_id

  @property
  def stats(self) -> SchedulerStats:
    """A snapshot of the counters."""
    return dataclasses.replace(self._stats)

  @property
  def has_work(self) -> bool:
    return bool(self._seqs) or bool(self._pending)
