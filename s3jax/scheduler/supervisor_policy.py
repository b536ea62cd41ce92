"""Supervisor policy: what happens to a sequence that outgrew its class.

A running, unfinished sequence whose ``total_len`` exceeds its class's ``cache_len`` cannot take
its next decode step within its reservation (it would write position ``total_len - 1``). Before
any admission, each such sequence is, in this order of preference:

1. grown (``Grow``) to the smallest larger class whose extra pages the budget still holds: the
   cheapest outcome, since its KV stays in its pages and nothing is copied or recomputed;
2. preempted (``Preempt``) when no larger class fits: its row and pages are freed and it waits,
   ahead of new requests, to resume by recomputation in a class larger than the one it outgrew.

No sequence outgrows the largest class the budget allows: ``submit`` only accepts requests whose
prompt and ``max_tokens`` fit it, and a sequence that produced ``max_tokens`` tokens is finished.
Every growth or resumption lands in a strictly larger class, so a request overflows at most
``len(cache_lens) - 1`` times. This module decides; ``scheduler.py`` emits the ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from s3jax.scheduler.config import MemoryLayout


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Overflow:
  """A running sequence that cannot decode in its class.

  Attributes:
    request_id: the sequence.
    cache_len: the class it outgrew.
    total_len: prompt + generated tokens now (> cache_len).
    shared_pages: its pages other sequences read too (a cached prefix): a preemption leaves them
      in use.
  """

  request_id: int
  cache_len: int
  total_len: int
  shared_pages: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OverflowDecision:
  """What to do with each overflowing sequence.

  Attributes:
    grows: ``(overflow, new class)`` pairs.
    preempts: sequences to preempt.
    free_pages: pages left unreserved once the decision is applied.
  """

  grows: tuple[tuple[Overflow, int], ...]
  preempts: tuple[Overflow, ...]
  free_pages: int


def decide_overflows(overflows: Sequence[Overflow], free_pages: int, layout: MemoryLayout) -> OverflowDecision:
  """Chooses growth or preemption for each overflowing sequence.

  Growths are tried first-fit in the given order (callers pass the oldest first). A sequence
  that cannot grow gives its pages back if preempted, which can make room for another one to
  grow: so after the first pass, every failed sequence is counted as preempted, and each one,
  oldest first, grows after all if the pages freed by the others leave room for its new class.

  Args:
    overflows: the overflowing sequences.
    free_pages: pages not reserved by any running sequence.
    layout: classes and pages.

  Returns:
    The decision; every overflow appears in exactly one of its lists.
  """
  usable = layout.usable_cache_lens
  grows: list[tuple[Overflow, int]] = []
  failed: list[Overflow] = []
  for o in overflows:
    if o.cache_len >= usable[-1]:
      raise AssertionError(f"request {o.request_id} outgrew the largest class {o.cache_len}")
    dst = _first_fit(o, free_pages + layout.pages_for(o.cache_len), layout)
    if dst is None:
      failed.append(o)
    else:
      grows.append((o, dst))
      free_pages -= layout.pages_for(dst) - layout.pages_for(o.cache_len)
  free_pages += sum(layout.pages_for(o.cache_len) - o.shared_pages for o in failed)
  preempts: list[Overflow] = []
  for o in failed:
    dst = _first_fit(o, free_pages + o.shared_pages, layout)
    if dst is None:
      preempts.append(o)
    else:
      grows.append((o, dst))
      free_pages -= layout.pages_for(dst) - o.shared_pages
  return OverflowDecision(grows=tuple(grows), preempts=tuple(preempts), free_pages=free_pages)


def _first_fit(o: Overflow, pages: int, layout: MemoryLayout) -> int | None:
  """The smallest class larger than ``o``'s whose pages are at most ``pages``, or None."""
  for dst in layout.usable_cache_lens:
    # ``dst >= total_len`` lets the sequence write position total_len - 1 right away.
    if dst > o.cache_len and dst >= o.total_len and layout.pages_for(dst) <= pages:
      return dst
  return None


def resume_cache_len(total_len: int, overflowed: int, usable_cache_lens: Sequence[int]) -> int:
  """Class a preempted sequence resumes in.

  The resumed prefill writes ``total_len`` positions and samples a token, and the next decode
  writes position ``total_len``; so the class needs ``total_len + 1`` positions, and must be larger
  than the class outgrown. Capped at the largest usable class (which its ``max_tokens`` fits).
  """
  needed = min(max(total_len + 1, overflowed + 1), usable_cache_lens[-1])
  return next(c for c in usable_cache_lens if c >= needed)
