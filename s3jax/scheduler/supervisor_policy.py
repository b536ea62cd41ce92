"""Supervisor policy: what happens to a sequence that outgrew its class.

A running, unfinished sequence whose ``total_len`` exceeds its class's ``cache_len`` cannot take
its next decode step there (it would write position ``total_len - 1``). Before any admission,
each such sequence is, in this order of preference:

1. moved (``Move``: its KV rows copied) to the smallest larger class that has a free row or
   can grow within the budget, the cheapest outcome (no recomputation);
2. preempted (``Preempt``) when no larger class has room: its row is freed and it waits, ahead
   of new requests, to resume by recomputation in a class larger than the one it overflowed;
3. released as truncated (``Release(reason=LENGTH)``) when it already sits in the largest class
   the budget allows: no class can hold another position.

Every move or resumption lands in a strictly larger class, so a request overflows at most
``len(cache_lens) - 1`` times. This module decides; ``scheduler.py`` emits the ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from s3jax.scheduler.arenas import Ledger


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Overflow:
  """A running sequence that cannot decode in its class.

  Attributes:
    request_id: the sequence.
    cache_len: the class it overflowed.
    total_len: prompt + generated tokens now (> cache_len).
  """

  request_id: int
  cache_len: int
  total_len: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OverflowDecision:
  """What to do with each overflowing sequence.

  Attributes:
    moves: ``(overflow, destination class)`` pairs, in the order the Moves should run.
    preempts: sequences to preempt.
    truncations: sequences to release as truncated (no larger class fits the budget).
  """

  moves: tuple[tuple[Overflow, int], ...]
  preempts: tuple[Overflow, ...]
  truncations: tuple[Overflow, ...]


def decide_overflows(
    overflows: Sequence[Overflow], ledger: Ledger, usable_cache_lens: Sequence[int]) -> OverflowDecision:
  """Chooses move, preemption or truncation for each overflowing sequence.

  Moves are tried first-fit in the given order (callers pass the oldest first). A move needs the
  mover's source row and its destination row at once, so a move that fails in the first pass is
  tried again after every failed sequence has given its row back: preempting one sequence can
  make room for another's move.

  Args:
    overflows: the overflowing sequences, each booked in ``ledger`` as leaving its class.
    ledger: the plan's slot ledger; moves are booked into it, and preempted or truncated
      sequences are un-booked (their rows become free for this plan).
    usable_cache_lens: the classes whose smallest arena fits the budget, ascending.

  Returns:
    The decision; every overflow appears in exactly one of its lists.
  """
  largest = usable_cache_lens[-1] if usable_cache_lens else 0
  truncations = [o for o in overflows if o.cache_len >= largest]
  for o in truncations:
    ledger.book_out(o.cache_len, -1)
  moves: list[tuple[Overflow, int]] = []
  failed: list[Overflow] = []
  for o in overflows:
    if o.cache_len >= largest:
      continue
    dst = _first_fit(o, ledger, usable_cache_lens)
    if dst is None:
      failed.append(o)
    else:
      moves.append((o, dst))
  for o in failed:
    ledger.book_out(o.cache_len, -1)
  preempts: list[Overflow] = []
  for o in failed:
    ledger.book_out(o.cache_len, +1)
    dst = _first_fit(o, ledger, usable_cache_lens)
    if dst is None:
      ledger.book_out(o.cache_len, -1)
      preempts.append(o)
    else:
      moves.append((o, dst))
  return OverflowDecision(moves=tuple(moves), preempts=tuple(preempts), truncations=tuple(truncations))


def _first_fit(o: Overflow, ledger: Ledger, usable_cache_lens: Sequence[int]) -> int | None:
  """Books and returns the smallest larger class that can take ``o`` now, or None."""
  for dst in usable_cache_lens:
    # ``dst >= total_len`` lets the moved sequence write position total_len - 1 right away.
    if dst > o.cache_len and dst >= o.total_len and ledger.try_move(dst):
      return dst
  return None


def resume_cache_len(total_len: int, overflowed: int, usable_cache_lens: Sequence[int]) -> int:
  """Class a preempted sequence resumes in.

  The resumed prefill writes ``total_len`` positions and samples a token, and the next decode
  writes position ``total_len``; so the class needs ``total_len + 1`` positions, and must be larger
  than the class overflowed. Capped at the largest usable class (then the sequence is truncated
  when it next overflows).
  """
  needed = min(max(total_len + 1, overflowed + 1), usable_cache_lens[-1])
  return next(c for c in usable_cache_lens if c >= needed)
