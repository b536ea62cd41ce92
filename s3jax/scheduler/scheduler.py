"""The length-aware, iteration-level scheduler: plans each step, consumes its result.

Plain host code, no tensors. The engine thread owns the scheduler and calls, per iteration,
``schedule()`` then ``update()``; ``submit`` and ``cancel`` are called on that same thread
between iterations (``cancel`` raises while a plan is in flight). Nothing here locks.

A step (``schedule``) runs in this order:

1. Supervisor (``supervisor_policy``): every running sequence that outgrew its class is moved
   to a larger class, preempted, or released as truncated.
2. Admission. Preempted requests first (oldest first), then new requests filling free rows of
   existing arenas (FCFS), then the paper's decreasing first-fit: classes from largest to
   smallest, FCFS within a class, admitting while the arenas, rounded up to slot options, fit
   the budget; a class that does not fit is skipped, smaller ones are still tried. At most
   ``max_admissions_per_step`` prefills per step.
3. Emission: Release/Preempt ops, arena shrinks (only as much as the budget needs, largest
   surplus first), arena grows, Moves, Admits, then idle shrinks (below).

Arena sizes (documented hysteresis, no thrashing): an arena grows to the smallest slot option
holding what the step needs; it shrinks on demand when another class needs the memory, and,
with ``shrink_idle_arenas``, when at most a quarter of it is used and nobody waits for its class,
to the smallest option holding twice its occupancy. After an idle shrink the arena is at most
half full, so it must double to grow again, and halve to shrink again.

Anti-starvation bound. A waiting request is bypassed when a request that arrived after it is
admitted first. Once bypassed more than ``starvation_limit`` (L) times, the oldest such request
becomes head-of-line: nothing else is admitted until it is (moves of running sequences go on),
so memory freed by finishing sequences is held for it. Hence, per waiting period, a request is
bypassed at most ``L + max_admissions_per_step`` times; and, from the step it is head-of-line,
it is admitted within ``U + 1`` steps, U being the largest class the budget allows, since every
sequence running then finishes, is preempted or is truncated within U + 1 steps, after which its
one slot fits (``submit`` checks that). With several starving requests, each waits for those
older than it in turn.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import enum

from s3jax.scheduler.arenas import Arenas, Ledger
from s3jax.scheduler.config import SchedulerConfig
from s3jax.scheduler.plan import (
    Admit, Move, Op, Preempt, QueueFull, Release, ReleaseReason, SchedRequest, StepPlan, StepResult)
from s3jax.scheduler.reservation import class_for, reservation_tokens, slots_for
from s3jax.scheduler.supervisor_policy import Overflow, decide_overflows, resume_cache_len


class RequestState(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
  """Where a running sequence's KV lives."""

  cache_len: int
  slot: int


@dataclasses.dataclass(slots=True)
class SchedulerStats:
  """Counters since construction (overhead of the supervisor included)."""

  admissions: int = 0  # prefills, fresh and resumed
  resumes: int = 0
  preemptions: int = 0
  moves: int = 0
  moved_tokens: int = 0  # KV positions copied by Moves; bytes = this * kv_bytes_per_token
  recomputed_tokens: int = 0  # KV positions computed again by resumed prefills
  resizes: int = 0
  finished: int = 0
  cancelled: int = 0
  truncated: int = 0
  max_bypass: int = 0  # the most times any waiting request was bypassed in one waiting period
  head_of_line_admissions: int = 0  # admissions of starving requests


@dataclasses.dataclass(slots=True, eq=False)
class _Seq:
  req: SchedRequest
  arrival: int  # submission order; kept across preemptions
  fresh_class: int  # class of the policy's reservation
  total_len: int  # prompt + generated tokens
  state: RequestState = RequestState.WAITING
  cache_len: int = 0  # while running
  slot: int = 0  # while running
  overflowed: int = 0  # after a preemption: the class it outgrew
  bypassed: int = 0

  @property
  def resume(self) -> bool:
    return self.overflowed > 0


class Scheduler:
  """Decides arenas, placements and admissions each iteration; see the module docstring."""

  def __init__(self, config: SchedulerConfig):
    self._config = config
    self._usable = config.usable_cache_lens
    self._arenas = Arenas(config)
    self._seqs: dict[int, _Seq] = {}
    self._queues: dict[int, collections.deque[_Seq]] = {c: collections.deque() for c in config.cache_lens}
    self._resumes: list[_Seq] = []  # preempted, by arrival
    self._starving: set[_Seq] = set()  # waiting, bypassed more than starvation_limit times
    self._hol: _Seq | None = None  # the oldest of them
    self._arrivals = 0
    self._inflight: frozenset[int] | None = None
    self._stats = SchedulerStats()

  # ---- requests in ----

  def submit(self, req: SchedRequest) -> None:
    """Queues a request.

    Raises:
      ValueError: a duplicate id, a non-positive length, a prompt with no room for one token,
        or a reservation whose class cannot fit even one slot in the budget.
      QueueFull: ``max_waiting`` requests are waiting already.
    """
    cfg = self._config
    rid = req.request_id
    if rid in self._seqs:
      raise ValueError(f"request {rid} is already scheduled")
    if req.prompt_len < 1 or req.max_tokens < 1:
      raise ValueError(f"request {rid}: prompt_len and max_tokens must be >= 1")
    if req.prompt_len + 1 > cfg.max_len:
      raise ValueError(
          f"request {rid}: prompt of {req.prompt_len} tokens leaves no room for an answer within "
          f"the maximum sequence length {cfg.max_len}")
    cache_len = class_for(cfg.cache_lens, reservation_tokens(cfg.policy, req, cfg.max_len))
    if cache_len not in self._usable:
      raise ValueError(
          f"request {rid}: one slot of class {cache_len} takes "
          f"{cfg.slot_options[0] * cfg.slot_bytes(cache_len)} bytes, over the budget of "
          f"{cfg.memory_budget_bytes}")
    if cfg.max_waiting is not None and self.num_waiting >= cfg.max_waiting:
      raise QueueFull(f"{self.num_waiting} requests waiting (max_waiting={cfg.max_waiting})")
    seq = _Seq(req=req, arrival=self._arrivals, fresh_class=cache_len, total_len=req.prompt_len)
    self._arrivals += 1
    self._seqs[rid] = seq
    self._queues[cache_len].append(seq)

  def cancel(self, request_id: int) -> list[Op]:
    """Forgets a request; returns the ops the engine applies now (a Release if it was running).

    Unknown (e.g. already finished) ids are ignored. Must not be called between ``schedule()``
    and ``update()``.
    """
    if self._inflight is not None:
      raise RuntimeError("cancel() while a plan is in flight: call it after update()")
    seq = self._seqs.pop(request_id, None)
    if seq is None:
      return []
    self._stats.cancelled += 1
    if seq.state is RequestState.RUNNING:
      self._arenas.vacate(seq.cache_len, seq.slot, request_id)
      return [Release(request_id, seq.cache_len, seq.slot, ReleaseReason.CANCELLED)]
    if seq.resume:
      self._resumes.remove(seq)
    else:
      self._queues[seq.fresh_class].remove(seq)
    self._starving.discard(seq)
    self._hol = min(self._starving, key=lambda s: s.arrival, default=None)
    return []

  # ---- one iteration ----

  def schedule(self) -> StepPlan:
    """Plans one iteration; ``update`` must follow with the engine's result."""
    if self._inflight is not None:
      raise RuntimeError("schedule() twice without update()")
    cfg = self._config
    running = sorted((s for s in self._seqs.values() if s.state is RequestState.RUNNING),
                     key=lambda s: s.arrival)
    overflows = [Overflow(request_id=s.req.request_id, cache_len=s.cache_len, total_len=s.total_len)
                 for s in running if s.total_len > s.cache_len]
    stay = collections.Counter(s.cache_len for s in running if s.total_len <= s.cache_len)
    ledger = Ledger(cfg, stay)
    for o in overflows:
      ledger.book_out(o.cache_len, +1)
    decision = decide_overflows(overflows, ledger, self._usable)
    admissions = self._choose_admissions(ledger)

    ops: list[Op] = []
    for o in decision.truncations:
      seq = self._seqs.pop(o.request_id)
      self._arenas.vacate(seq.cache_len, seq.slot, o.request_id)
      ops.append(Release(o.request_id, seq.cache_len, seq.slot, ReleaseReason.LENGTH))
      self._stats.truncated += 1
    for o in decision.preempts:
      seq = self._seqs[o.request_id]
      self._arenas.vacate(seq.cache_len, seq.slot, o.request_id)
      ops.append(Preempt(o.request_id, seq.cache_len, seq.slot))
      self._stats.preemptions += 1
      seq.state, seq.overflowed, seq.bypassed = RequestState.WAITING, seq.cache_len, 0
      self._resumes.insert(bisect.bisect([s.arrival for s in self._resumes], seq.arrival), seq)
    self._resize_for(ledger, ops)
    for o, dst in decision.moves:
      seq = self._seqs[o.request_id]
      slot = self._arenas.place(dst, o.request_id)
      self._arenas.vacate(seq.cache_len, seq.slot, o.request_id)
      ops.append(Move(o.request_id, seq.cache_len, seq.slot, dst, slot, seq.total_len - 1))
      self._stats.moves += 1
      self._stats.moved_tokens += seq.total_len - 1
      seq.cache_len, seq.slot = dst, slot
    for seq, cache_len in admissions:
      self._admit(seq, cache_len, ops)
    self._account_bypasses([seq for seq, _ in admissions])
    if cfg.shrink_idle_arenas:
      self._shrink_idle(ops)

    admitted = frozenset(seq.req.request_id for seq, _ in admissions)
    decode = {}
    for c in cfg.cache_lens:
      pairs = tuple((s, rid) for s, rid in self._arenas.occupants(c) if rid not in admitted)
      if pairs:
        decode[c] = pairs
    plan = StepPlan(ops=tuple(ops), decode=decode, arena_slots=self._arenas.slot_counts())
    self._inflight = plan.expected_tokens
    return plan

  def update(self, result: StepResult) -> None:
    """Consumes the outcome of the last plan: one token per planned request, and finishes.

    Raises:
      RuntimeError: no plan is in flight.
      ValueError: the result's tokens are not exactly the plan's requests, or it finishes a
        request the plan did not run.
    """
    if self._inflight is None:
      raise RuntimeError("update() without schedule()")
    got = frozenset(result.tokens)
    if got != self._inflight:
      raise ValueError(
          f"step result tokens do not match the plan: missing {sorted(self._inflight - got)}, "
          f"unexpected {sorted(got - self._inflight)}")
    if not result.finished <= self._inflight:
      raise ValueError(f"finished requests not in the plan: {sorted(result.finished - self._inflight)}")
    for rid in self._inflight:
      self._seqs[rid].total_len += 1
    for rid in result.finished:
      seq = self._seqs.pop(rid)
      self._arenas.vacate(seq.cache_len, seq.slot, rid)
      self._stats.finished += 1
    self._inflight = None

  # ---- admission ----

  def _waiting_class(self, seq: _Seq) -> int:
    if seq.resume:
      return resume_cache_len(seq.total_len, seq.overflowed, self._usable)
    return seq.fresh_class

  def _choose_admissions(self, ledger: Ledger) -> list[tuple[_Seq, int]]:
    """Books admissions into ``ledger`` in policy order; returns ``(seq, class)`` pairs."""
    cap = self._config.max_admissions_per_step
    chosen: list[tuple[_Seq, int]] = []
    taken: set[int] = set()

    def try_admit(seq: _Seq, cache_len: int) -> bool:
      if len(chosen) >= cap or not ledger.try_admit(cache_len):
        return False
      chosen.append((seq, cache_len))
      taken.add(seq.arrival)
      return True

    if self._hol is not None:
      try_admit(self._hol, self._waiting_class(self._hol))
      return chosen
    for seq in self._resumes:
      try_admit(seq, self._waiting_class(seq))
    # Free rows of existing arenas cost no memory: fill them first, in arrival order.
    fill = []
    for c, queue in self._queues.items():
      free = self._arenas.slots(c) - ledger.need(c)
      fill.extend((seq, c) for seq, _ in zip(queue, range(max(free, 0))))
    for seq, c in sorted(fill, key=lambda sc: sc[0].arrival):
      if ledger.need(c) < self._arenas.slots(c):
        try_admit(seq, c)
    # Decreasing first-fit: within a class every request costs the same, so the first one that
    # does not fit ends that class; smaller classes may still fit.
    for c in reversed(self._usable):
      for seq in self._queues[c]:
        if len(chosen) >= cap:
          return chosen
        if seq.arrival not in taken and not try_admit(seq, c):
          break
    return chosen

  def _admit(self, seq: _Seq, cache_len: int, ops: list[Op]) -> None:
    rid = seq.req.request_id
    if seq.resume:
      self._resumes.remove(seq)
      self._stats.resumes += 1
      # The KV of positions 0 .. total_len - 2 existed before the preemption.
      self._stats.recomputed_tokens += seq.total_len - 1
    else:
      self._queues[cache_len].remove(seq)
    if seq in self._starving:
      self._starving.remove(seq)
      self._stats.head_of_line_admissions += 1
    slot = self._arenas.place(cache_len, rid)
    ops.append(Admit(rid, cache_len, slot, seq.resume))
    self._stats.admissions += 1
    seq.state, seq.cache_len, seq.slot, seq.bypassed = RequestState.RUNNING, cache_len, slot, 0

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

  def _waiting(self):
    yield from self._resumes
    for queue in self._queues.values():
      yield from queue

  # ---- arena sizing ----

  def _resize_for(self, ledger: Ledger, ops: list[Op]) -> None:
    """Sizes every arena for the plan: shrinks first (as few as the budget needs), then grows."""
    cfg = self._config
    current = self._arenas.slot_counts()
    needed = {c: slots_for(cfg.slot_options, ledger.need(c)) for c in cfg.cache_lens}
    target = {c: max(current[c], needed[c]) for c in cfg.cache_lens}
    total = sum(target[c] * cfg.slot_bytes(c) for c in cfg.cache_lens)
    surplus = sorted(((current[c] - needed[c]) * cfg.slot_bytes(c), c)
                     for c in cfg.cache_lens if current[c] > needed[c])
    while total > cfg.memory_budget_bytes:
      freed, c = surplus.pop()  # the ledger guarantees the needed sizes fit
      target[c] = needed[c]
      total -= freed
    for c in cfg.cache_lens:
      if target[c] < current[c]:
        self._resize(c, target[c], ops)
    for c in cfg.cache_lens:
      if target[c] > current[c]:
        self._resize(c, target[c], ops)

  def _shrink_idle(self, ops: list[Op]) -> None:
    waited_for = {self._waiting_class(s) for s in self._resumes}
    waited_for.update(c for c, queue in self._queues.items() if queue)
    for c in self._config.cache_lens:
      slots, used = self._arenas.slots(c), self._arenas.occupied(c)
      if slots and 4 * used <= slots and c not in waited_for:
        smaller = slots_for(self._config.slot_options, 2 * used)
        if smaller is not None and smaller < slots:
          self._resize(c, smaller, ops)

  def _resize(self, cache_len: int, new_slots: int, ops: list[Op]) -> None:
    op, changed = self._arenas.resize(cache_len, new_slots)
    ops.append(op)
    self._stats.resizes += 1
    for rid, slot in changed.items():
      self._seqs[rid].slot = slot

  # ---- introspection ----

  @property
  def config(self) -> SchedulerConfig:
    return self._config

  @property
  def reserved_bytes(self) -> int:
    """Bytes all arenas reserve now."""
    return self._arenas.reserved_bytes()

  def arena_slots(self) -> dict[int, int]:
    """Slots of every class's arena now (0 = none)."""
    return self._arenas.slot_counts()

  @property
  def num_running(self) -> int:
    return sum(s.state is RequestState.RUNNING for s in self._seqs.values())

  @property
  def num_waiting(self) -> int:
    return len(self._seqs) - self.num_running

  def running_per_class(self) -> dict[int, int]:
    return {c: self._arenas.occupied(c) for c in self._config.cache_lens}

  def waiting_per_class(self) -> dict[int, int]:
    """Waiting requests by the class they would be admitted into now."""
    counts = collections.Counter(self._waiting_class(s) for s in self._waiting())
    return {c: counts[c] for c in self._config.cache_lens}

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
    return bool(self._seqs)
