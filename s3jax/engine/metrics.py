"""Engine counters: what a benchmark or ``/metrics`` reports.

One set of counters: the device path's are counted here, the scheduling ones (admissions,
growths, preemptions, recomputed tokens...) only by the scheduler, and a snapshot carries a copy
of the scheduler's.
"""

from __future__ import annotations

import dataclasses

from s3jax.scheduler import SchedulerStats


@dataclasses.dataclass(kw_only=True)
class EngineMetrics:
  """Running totals of one engine; ``Engine.snapshot()`` gives a copy safe to read elsewhere."""

  budget_bytes: int
  device_bytes: int = 0  # the KV page pool, allocated once: never more than the budget
  steps: int = 0  # iterations that dispatched a decode call: one decode call each, by construction
  prefill_calls: int = 0
  prefill_tokens: int = 0  # prompt tokens prefilled (resumed ones included)
  prefill_padded_tokens: int = 0  # tokens the prefill calls computed, padding included
  output_tokens: int = 0
  decoded_tokens: int = 0  # live rows decoded
  decoded_rows: int = 0  # rows computed, live or not: the padding cost of static shapes
  attended_tokens: int = 0  # tokens the live rows attended to, summed over decode calls
  scanned_pages: int = 0  # pages the decode calls' attention scanned
  max_batch_size: int = 0
  reserved_bytes: int = 0
  peak_reserved_bytes: int = 0
  used_bytes: int = 0  # bytes of the pages written so far
  cached_pages: int = 0  # pages holding a cached prompt prefix, in use or free (prefix caching)
  peak_used_bytes: int = 0
  requests_submitted: int = 0
  requests_finished: int = 0
  requests_cancelled: int = 0
  requests_failed: int = 0
  host_wait_s: float = 0.0  # time the engine thread waited for the device's tokens
  compilations: int = 0
  xla_compilations: int = 0  # since the engine was built or warmed up
  live_overflow_rate: float = 0.0  # over the newest `live_overflow_requests` predicted requests
  live_overflow_requests: int = 0
  scheduler: SchedulerStats = dataclasses.field(default_factory=SchedulerStats)
  waiting_per_class: dict[int, int] = dataclasses.field(default_factory=dict)  # cache_len -> requests
  running_per_class: dict[int, int] = dataclasses.field(default_factory=dict)

  def observe_decode(self, live: int, rows: int, pages: int, attended: int) -> None:
    self.steps += 1
    self.decoded_tokens += live
    self.attended_tokens += attended
    self.decoded_rows += rows
    self.scanned_pages += pages
    self.max_batch_size = max(self.max_batch_size, live)

  def observe_memory(self, reserved: int, used: int, cached_pages: int = 0) -> None:
    self.reserved_bytes, self.used_bytes, self.cached_pages = reserved, used, cached_pages
    self.peak_reserved_bytes = max(self.peak_reserved_bytes, reserved)
    self.peak_used_bytes = max(self.peak_used_bytes, used)

  @property
  def mispredictions(self) -> int:
    """Requests that outgrew their reservation at least once."""
    return self.scheduler.mispredictions

  @property
  def grows(self) -> int:
    """Growths into a larger class."""
    return self.scheduler.grows

  @property
  def preemptions(self) -> int:
    return self.scheduler.preemptions

  @property
  def recomputed_tokens(self) -> int:
    return self.scheduler.recomputed_tokens

  @property
  def prefix_cached_tokens(self) -> int:
    """Tokens admissions read from cached prefix pages instead of prefilling them."""
    return self.scheduler.cached_tokens

  @property
  def prefix_hit_rate(self) -> float:
    """The share of admitted prefills' tokens read from cached prefix pages."""
    return self.scheduler.cached_tokens / max(self.scheduler.prefill_tokens, 1)

  @property
  def prefill_chunks(self) -> int:
    """Chunks of long prompts prefilled over several iterations (``max_prefill_tokens``)."""
    return self.scheduler.prefill_chunks

  @property
  def holds(self) -> int:
    """Row-steps paused for want of a free page (s3, oracle)."""
    return self.scheduler.holds

  @property
  def mean_batch_size(self) -> float:
    """Live sequences per decode call."""
    return self.decoded_tokens / max(self.steps, 1)

  @property
  def mean_context(self) -> float:
    """Tokens a decoded row attends to, on average: the cache length of the mean decode."""
    return self.attended_tokens / max(self.decoded_tokens, 1)

  @property
  def tokens_per_step(self) -> float:
    """Tokens per iteration: the batch that compares policies."""
    return self.output_tokens / max(self.steps, 1)

  @property
  def slot_occupancy(self) -> float:
    """Fraction of decoded rows that held a live sequence."""
    return self.decoded_tokens / max(self.decoded_rows, 1)

  def snapshot(self) -> "EngineMetrics":
    return dataclasses.replace(
      self,
      scheduler=dataclasses.replace(self.scheduler),
      waiting_per_class=dict(self.waiting_per_class),
      running_per_class=dict(self.running_per_class),
    )
