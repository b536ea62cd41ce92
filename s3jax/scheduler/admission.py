"""What one step may still admit under the policy's test: memory, reservations, SGLang's charges
or the forecast peak.

``AdmissionBudget`` is built once per step with what is free after the step's growths, grants and
evictions; the scheduler offers it candidates in its admission order and stops at the first that
``admit`` refuses (or skips it, under PACK). Every test also needs the prompt's pages (its
prefill writes them) and a free row.

Prefix caching: a candidate reads the cached pages of its prompt's longest cached prefix (all but
the last token's page at most, so that its prefill samples a token). Those in use already (or
taken by an earlier admission of the step) cost nothing: every test charges only the pages it
adds, and the forecast counts cached pages in use once, as held throughout. Cached pages nobody
reads are free pages, so they cost what a new page costs. A candidate whose next page is being
written by this step's prefills waits a step to read it (``n`` choices of one prompt prefill it
once).

Starvation. SHORTEST_FIRST sorts the waiting by ``arrival step + aging_steps x predicted answer /
max_len`` and admits strictly in that order, so a request that arrived at step ``a`` is admitted
before every request that arrived after ``a + aging_steps``: relative to FCFS, it waits at most
for the requests of the next ``aging_steps`` steps. Under PACK a waiting request is bypassed when
a request that arrived after it is admitted first; once bypassed more than ``starvation_limit``
(L) times, the oldest such request becomes head-of-line: nothing else is admitted until it is
(growths of running sequences go on), so memory freed by finishing sequences is held for it.
Per waiting period it is bypassed at most ``L + max_admissions_per_step`` times. FCFS needs no
bound.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from s3jax.scheduler import adaptive
from s3jax.scheduler.config import AdmissionOrder, MemoryLayout, Policy
from s3jax.scheduler.pages import PageAllocator
from s3jax.scheduler.peak import PeakForecast
from s3jax.scheduler.sequence import SchedulerStats, Seq


class AdmissionBudget:
  """The pages, reservations and tokens left for this step's admissions; see the module docstring.

  Args:
    policy: whose test applies.
    layout: the pool's page size and classes.
    cap: the most admissions this step (rows free, ``max_admissions_per_step``).
    free_pages: pages free after the step's grants.
    free_reserved: reserving policies: pages no running sequence's class reserves.
    ratio: ADAPTIVE: SGLang's new-token ratio now.
    running: the sequences that go on running (ADAPTIVE charges each).
    forecast: S3 and ORACLE: the running sequences' forecast; admitted candidates join it.
    pages: the allocator, for the cached prefixes (None: prefix caching is off).
    step: the scheduler's step (which cached pages are written by now).
  """

  def __init__(
    self,
    policy: Policy,
    layout: MemoryLayout,
    *,
    cap: int,
    free_pages: int,
    free_reserved: int,
    ratio: adaptive.NewTokenRatio | None,
    running: list[Seq],
    forecast: PeakForecast | None,
    pages: PageAllocator | None = None,
    step: int = 0,
  ):
    self._policy = policy
    self._pages, self._step = pages, step
    self._claimed: set[int] = set()  # cached pages this step's admissions read
    self._writing: set[int] = set()  # keys of the pages this step's admissions prefill
    self._layout = layout
    self._cap = cap
    self._free_pages = free_pages
    self._free_reserved = free_reserved
    self._forecast = forecast
    self._has_running = bool(running)
    self._free_tokens = 0
    if ratio is not None:  # SGLang: tokens free once every running request's charge is met
      self._free_tokens = free_pages * layout.page_size - sum(
        ratio.running_charge(s.req.max_tokens, s.generated) for s in running
      )
    self.chosen: list[tuple[Seq, int]] = []  # (sequence, class), in admission order

  @property
  def full(self) -> bool:
    return len(self.chosen) >= self._cap

  def _cached_prefix(self, seq: Seq) -> tuple[list[int], bool]:
    """The cached pages ``seq`` would read, and whether it should wait a step for more."""
    if self._pages is None:
      return [], False
    keys = seq.req.page_hashes[: (seq.total_len - 1) // self._layout.page_size]
    hits, wait = self._pages.match(keys, self._step)
    following = keys[len(hits)] if len(hits) < len(keys) else None  # the first page it would prefill
    return hits, wait or following in self._writing

  def admit(self, seq: Seq, cache_len: int) -> bool:
    """Takes ``seq`` into class ``cache_len`` if the policy's test passes; False if not. Sets
    ``seq.hits``, the cached pages it reads."""
    page_size = self._layout.page_size
    hits, wait = self._cached_prefix(seq)
    held = sum(1 for page in hits if page in self._claimed or self._pages.readers(page))
    pages = -(-seq.total_len // page_size) - held  # what its prefill adds to the pages in use
    if self.full or wait or pages > self._free_pages:
      return False
    if self._policy.reserves:
      need = self._layout.pages_for(cache_len) - held
      if need > self._free_reserved:
        return False
      self._free_reserved -= need
    elif self._policy is Policy.ADAPTIVE:
      # Into an empty pool SGLang's test could refuse a request that fits it alone (its
      # max_tokens plus a page): admitted regardless, as every accepted request fits.
      tokens = seq.total_len - held * page_size
      need = adaptive.admission_need(tokens, seq.req.max_tokens, seq.generated, page_size)
      if need >= self._free_tokens and (self._has_running or self.chosen):
        return False
      self._free_tokens -= adaptive.admission_charge(tokens, seq.req.max_tokens, page_size)
    elif self._policy.forecasts:
      candidate = seq.forecast(shared_pages=len(hits))
      if not self._forecast.fits(candidate, shared_pages=len(hits) - held):
        return False
      self._forecast.add(candidate)
      self._forecast.share(len(hits) - held)
    seq.hits = hits
    self._claimed.update(hits)
    self._writing.update(seq.req.page_hashes[len(hits) : seq.total_len // page_size])
    self.chosen.append((seq, cache_len))
    self._free_pages -= pages
    return True


def order_key(order: AdmissionOrder, seq: Seq, step: int, aging_steps: int, max_len: int) -> tuple:
  """A request's place in the admission order when it arrives at ``step`` (smallest first).

  SHORTEST_FIRST ages by arrival: ``step + aging_steps x predicted answer / max_len``, so no
  request is passed by one that arrived more than ``aging_steps`` steps after it.
  """
  if order is AdmissionOrder.FCFS:
    return (seq.arrival,)
  if order is AdmissionOrder.PACK:
    return (-seq.fresh_class, seq.arrival)
  if seq.length is not None:
    answer = seq.length.quantile_given(0.5, 0)
  else:
    answer = seq.fresh_class - seq.req.prompt_len
  answer = min(answer, seq.req.max_tokens)
  return (step + aging_steps * answer / max_len, seq.arrival)


def note_bypasses(admitted: list[Seq], waiting: Iterable[Seq], limit: int, stats: SchedulerStats) -> list[Seq]:
  """PACK: counts, for each request still waiting, the later arrivals admitted before it; returns
  those now bypassed more than ``limit`` times (starving)."""
  arrivals = sorted(seq.arrival for seq in admitted)
  starving = []
  for seq in waiting:
    if seq.arrival < arrivals[-1]:
      seq.bypassed += len(arrivals) - bisect.bisect_right(arrivals, seq.arrival)
      stats.max_bypass = max(stats.max_bypass, seq.bypassed)
      if seq.bypassed > limit:
        starving.append(seq)
  return starving
