"""The contract between the scheduler and the engine: requests in, step plans out, results back.

One iteration (ORCA iteration-level scheduling) is::

    plan = scheduler.schedule()      # policy: who runs, in which row, reserving which class
    engine.execute(plan)             # the engine applies plan.ops IN ORDER, then decodes
    scheduler.update(result)         # tokens produced, sequences finished

The engine may call ``schedule()`` for the next iteration before ``update()`` for this one (it
reads tokens one step behind): plans in flight are updated in order. A plan that runs no request
(it only releases rows) has no result and no ``update``. The scheduler counts every
planned token at once, so lengths are exact without waiting for the result; what it learns late
is only which sequences ended on EOS, and a sequence may then decode once more than it needed
(the engine drops that token).

Token accounting. A sequence of ``total_len = prompt_len + num_generated`` tokens (the first token
sampled by prefill counts as generated) has KV positions ``0 .. total_len - 2`` written and writes
position ``total_len - 1`` in its next decode step; under a reserving policy it may decode within
a reservation of class S only while ``total_len <= S``.

Every request named in a plan produces exactly ONE new token in that iteration: a decoded
sequence through its decode step, an admitted one (``Admit``, fresh or resumed) through its
prefill, which samples the next token and is NOT decoded again in the same iteration. A prompt
prefilled in chunks (``SchedulerConfig.max_prefill_tokens``) holds its row and pages from its
first ``PrefillChunk``; it produces no token until the iteration of its ``Admit``, which prefills
the last chunk.

Pages. The scheduler owns the page pool (``pages.PageAllocator``): an ``Admit`` carries the pages
its prefill writes, a ``Grant`` the page a decoded row starts this iteration. The engine and the
simulator only apply them. With prefix caching, an ``Admit``'s first ``start // page_size`` pages
may hold a cached prefix that other sequences read too; nothing writes them. Pages in use
(each counted once) never exceed the pool; under a reserving policy the
reserved pages (the pages in use, plus each running sequence's class's pages it does not hold
yet) do not either, after
EACH op: releases and preemptions come first in a plan, then growths and admissions.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from s3jax.scheduler.length import LengthDist


@dataclasses.dataclass(frozen=True, slots=True)
class SchedRequest:
  """What the engine submits for one request.

  Attributes:
    request_id: unique among the requests the scheduler holds.
    prompt_len: prompt tokens, >= 1.
    max_tokens: the user's cap on output tokens, a hard bound on any reservation; a sequence that
      has produced this many tokens is finished, whatever the engine has read back yet.
    predicted_output_len: the output tokens the length predictor reserves (its calibrated
      quantile); read by Policy.S3_RESERVE, and by Policy.S3 to count mispredictions.
    predicted_length: the predictor's distribution of the answer's length; read by Policy.S3.
    true_output_len: the trace's true length; read by Policy.ORACLE only.
    page_hashes: the key of each full page of the prompt (``pages.prefix_hashes``), for prefix
      caching; empty: it shares no page.
  """

  request_id: int
  prompt_len: int
  max_tokens: int
  predicted_output_len: int | None = None
  predicted_length: LengthDist | None = None
  true_output_len: int | None = None
  page_hashes: tuple[int, ...] = ()


class ReleaseReason(enum.Enum):
  """Why a ``Release`` frees a row."""

  FINISHED = "finished"  # it produced max_tokens tokens, or the engine reported its end
  CANCELLED = "cancelled"  # the caller cancelled it (``Scheduler.cancel``)


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
  """Frees a row, its pages and its reservation; the engine clears the row."""

  request_id: int
  slot: int
  reason: ReleaseReason


@dataclasses.dataclass(frozen=True, slots=True)
class Preempt:
  """Frees the sequence's row, pages and reservation; the engine keeps its tokens on the host.

  The request waits again, ahead of new ones, and comes back later as ``Admit(resume=True)``,
  recomputing its KV.
  """

  request_id: int
  slot: int


@dataclasses.dataclass(frozen=True, slots=True)
class Grow:
  """Supervisor re-bucketing: the sequence outgrew class ``cache_len`` and now reserves
  ``new_cache_len``. Its KV stays where it is (pages are granted as it writes them); only the
  reservation changes, so no token is copied or recomputed."""

  request_id: int
  slot: int
  cache_len: int
  new_cache_len: int


@dataclasses.dataclass(frozen=True, slots=True)
class MoveRow:
  """Moves a running sequence from row ``src_slot`` to the free row ``dst_slot`` (the engine
  copies its row state on the device; its KV pages stay), so that live rows stay packed below
  the smallest batch size that holds them."""

  request_id: int
  src_slot: int
  dst_slot: int


@dataclasses.dataclass(frozen=True, slots=True)
class Admit:
  """Prefill into the free row ``slot``, its KV written to ``pages`` (in logical order).

  Fresh (``resume=False``): prefill the prompt, sample the first output token. Resumed after a
  preemption (``resume=True``): prefill prompt + every generated token (recomputing their KV)
  and sample the next token. Either way the prefill's token is this request's one token of the
  iteration. ``cache_len`` is the class a reserving policy reserves, 0 under a policy that
  reserves nothing ahead.
  """

  request_id: int
  slot: int
  pages: tuple[int, ...]
  cache_len: int = 0
  resume: bool = False
  # Tokens before this are in its first pages already (a cached prefix, earlier ``PrefillChunk``s):
  # only the rest is prefilled.
  start: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillChunk:
  """Prefill tokens ``start .. end - 1`` of an admitted sequence into its ``pages``, attending to
  the tokens before them there; no row activates and no token is sampled (the sequence's ``Admit``
  prefills its last chunk in a later iteration)."""

  request_id: int
  pages: tuple[int, ...]
  start: int
  end: int
  cache_len: int = 0  # the class reserved (as in its ``Admit``), 0 under a policy that reserves nothing ahead


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
  """Page ``page`` becomes page number ``index`` of the sequence in row ``slot`` (after the
  plan's row moves): the row's decode in this iteration starts writing it."""

  request_id: int
  slot: int
  index: int
  page: int


Op = Release | Preempt | Grow | MoveRow | Admit | PrefillChunk


@dataclasses.dataclass(frozen=True, slots=True)
class StepPlan:
  """One iteration's decisions.

  Attributes:
    ops: executed by the engine in this order, before the decode: releases and preemptions,
      growths, row moves, prefill chunks and admissions.
    decode: ``(slot, request_id)`` of every running sequence that decodes one token, after the
      ops: every occupied row except those admitted or held in this plan.
    grants: pages given to decoded rows, applied after the ops.
    held: ``(slot, request_id)`` of running sequences paused this iteration (no page was free
      for the position they would write): they keep their KV and state and produce no token.
    scan_pages: one past the highest page in use after the plan: how far a decode's attention
      scans.
  """

  ops: tuple[Op, ...]
  decode: tuple[tuple[int, int], ...]
  grants: tuple[Grant, ...] = ()
  held: tuple[tuple[int, int], ...] = ()
  scan_pages: int = 0

  @property
  def admitted(self) -> frozenset[int]:
    return frozenset(op.request_id for op in self.ops if isinstance(op, Admit))

  @property
  def expected_tokens(self) -> frozenset[int]:
    """Requests that produce one token in this iteration: decoded plus admitted."""
    return frozenset(rid for _, rid in self.decode) | self.admitted

  @property
  def rows(self) -> tuple[tuple[int, int], ...]:
    """``(slot, request_id)`` of every request producing a token: decoded, then admitted."""
    return self.decode + tuple((op.slot, op.request_id) for op in self.ops if isinstance(op, Admit))


@dataclasses.dataclass(frozen=True, slots=True)
class StepResult:
  """What the engine reports after executing a plan.

  Attributes:
    tokens: one new token id per request of the plan still running or waiting when the engine
      read it back (requests cancelled since may be left out).
    finished: requests that ended in this iteration (EOS, a stop, ``max_tokens``), a subset of
      ``tokens``' keys; a request can finish at admission (its first token is EOS).
  """

  tokens: Mapping[int, int]
  finished: frozenset[int] = frozenset()
