"""The contract between the scheduler and the engine: requests in, step plans out, results back.

One iteration (ORCA iteration-level scheduling) is::

    plan = scheduler.schedule()      # policy: which arenas, which sequence in which slot
    result = engine.execute(plan)    # the engine applies plan.ops IN ORDER, then decodes
    scheduler.update(result)         # tokens produced, sequences finished

Token accounting. A sequence of ``total_len = prompt_len + num_generated`` tokens (the first
token sampled by prefill counts as generated) has KV positions ``0 .. total_len - 2`` written and
writes position ``total_len - 1`` in its next decode step, so it may decode in class S only while
``total_len <= S``.

Every request named in a plan produces exactly ONE new token in that iteration: a decoded
sequence through its decode step, an admitted one (``Admit``, fresh or resumed) through its
prefill, which samples the next token and is NOT decoded again in the same iteration.

Memory. The reserved bytes are the sum over arenas of ``slots * S * kv_bytes_per_token``; after
EACH op they are <= the budget (a ``Resize`` counts at its new size once applied: the engine stages
shrinks through host memory, so old and new arrays are not counted together).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class SchedRequest:
  """What the engine submits for one request.

  Attributes:
    request_id: unique among the requests the scheduler holds.
    prompt_len: prompt tokens, >= 1.
    max_tokens: the user's cap on output tokens, a hard bound on any reservation.
    predicted_output_len: upper bound of the predicted length bucket; read by Policy.S3 only.
    true_output_len: the trace's true length (upper bound of the true bucket); read by
      Policy.ORACLE only.
  """

  request_id: int
  prompt_len: int
  max_tokens: int
  predicted_output_len: int | None = None
  true_output_len: int | None = None


class QueueFull(Exception):
  """``submit`` found the waiting queue at ``max_waiting``: back-pressure to the caller."""


class ReleaseReason(enum.Enum):
  """Why a ``Release`` ends a request."""

  CANCELLED = "cancelled"  # the caller cancelled it (``Scheduler.cancel``)
  LENGTH = "length"  # it filled the largest class the budget allows: finish it as truncated


@dataclasses.dataclass(frozen=True, slots=True)
class Resize:
  """(Re)allocates the arena of class ``cache_len`` from ``old_slots`` to ``new_slots`` rows.

  ``old_slots == 0`` creates the arena, ``new_slots == 0`` frees it. Row ``old`` of the old arena
  becomes row ``new`` of the new one for each ``(old, new)`` in ``row_map``; rows not in
  ``row_map`` are dropped, and the scheduler only drops empty rows.
  """

  cache_len: int
  old_slots: int
  new_slots: int
  row_map: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
  """Supervisor re-bucketing: copies a sequence's KV row to a slot of a larger class.

  The first ``num_tokens`` positions (all that is written: ``total_len - 1``) are copied, the
  source slot becomes empty, and the sequence decodes in the destination in this same iteration.
  Copied bytes are ``num_tokens * kv_bytes_per_token``.
  """

  request_id: int
  src_cache_len: int
  src_slot: int
  dst_cache_len: int
  dst_slot: int
  num_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class Preempt:
  """Frees the sequence's slot; the engine keeps its tokens on the host.

  The request waits again, ahead of new ones, and comes back later as ``Admit(resume=True)``.
  """

  request_id: int
  cache_len: int
  slot: int


@dataclasses.dataclass(frozen=True, slots=True)
class Admit:
  """Prefill and insert into an empty ``slot`` of class ``cache_len``.

  Fresh (``resume=False``): prefill the prompt, sample the first output token. Resumed after a
  preemption (``resume=True``): prefill prompt + every generated token (recomputing their KV,
  ``total_len`` positions in all) and sample the next token. Either way the prefill's token is
  this request's one token of the iteration.
  """

  request_id: int
  cache_len: int
  slot: int
  resume: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
  """Frees the slot and ends the request (cancelled, or truncated at the length limit)."""

  request_id: int
  cache_len: int
  slot: int
  reason: ReleaseReason = ReleaseReason.CANCELLED


Op = Resize | Move | Preempt | Admit | Release


@dataclasses.dataclass(frozen=True, slots=True)
class StepPlan:
  """One iteration's decisions.

  Attributes:
    ops: executed by the engine in this order, before the decode.
    decode: per class, the ``(slot, request_id)`` pairs to decode one token for, after the ops:
      every occupied slot except those admitted in this plan.
    arena_slots: slots of every class after the ops (0 = no arena), for the engine to check.
  """

  ops: tuple[Op, ...]
  decode: Mapping[int, tuple[tuple[int, int], ...]]
  arena_slots: Mapping[int, int]

  @property
  def admitted(self) -> frozenset[int]:
    return frozenset(op.request_id for op in self.ops if isinstance(op, Admit))

  @property
  def expected_tokens(self) -> frozenset[int]:
    """Requests that produce one token in this iteration: decoded plus admitted."""
    decoded = (rid for pairs in self.decode.values() for _, rid in pairs)
    return frozenset(decoded) | self.admitted


@dataclasses.dataclass(frozen=True, slots=True)
class StepResult:
  """What the engine reports after executing a plan.

  Attributes:
    tokens: one new token id per request in ``plan.expected_tokens`` (decoded or admitted).
    finished: requests that ended in this iteration (EOS, ``max_tokens``, a stop sequence), a
      subset of ``tokens``' keys; a request can finish at admission (its first token is EOS, or
      ``max_tokens == 1``). Their slots are free once ``update`` returns; no op is needed.
  """

  tokens: Mapping[int, int]
  finished: frozenset[int] = frozenset()


def reserved_bytes_after_each_op(
    plan: StepPlan, before: Mapping[int, int], kv_bytes_per_token: int) -> list[int]:
  """Reserved bytes after each op of ``plan``, starting from arena sizes ``before``.

  Args:
    plan: the plan whose ops are replayed.
    before: slots per class before the plan (absent = 0).
    kv_bytes_per_token: bytes one cached token takes.

  Returns:
    One entry per op (only ``Resize`` changes it), to compare with the budget.
  """
  slots = dict(before)
  out = []
  for op in plan.ops:
    if isinstance(op, Resize):
      slots[op.cache_len] = op.new_slots
    out.append(arena_bytes(slots, kv_bytes_per_token))
  return out


def arena_bytes(slots: Mapping[int, int] | Iterable[tuple[int, int]], kv_bytes_per_token: int) -> int:
  """Bytes of arenas given as ``{cache_len: slots}``."""
  items = slots.items() if isinstance(slots, Mapping) else slots
  return sum(cache_len * n * kv_bytes_per_token for cache_len, n in items)
