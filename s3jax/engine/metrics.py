"""Engine counters: what a benchmark or ``/metrics`` reports."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True)
class EngineMetrics:
  """Running totals of one engine; ``snapshot()`` gives a copy safe to read elsewhere."""

  budget_bytes: int
  steps: int = 0
  requests_submitted: int = 0
  requests_finished: int = 0
  requests_cancelled: int = 0
  output_tokens: int = 0
  prefills: int = 0
  prefill_tokens: int = 0
  decode_calls: int = 0
  decoded_tokens: int = 0
  decoded_slots: int = 0     # slots computed, occupied or not: the padding cost of static shapes
  max_batch_size: int = 0
  reserved_bytes: int = 0
  peak_reserved_bytes: int = 0   # the scheduler's accounting, after every op
  peak_device_bytes: int = 0     # bytes of the arenas actually allocated, after every op
  used_bytes: int = 0
  mispredictions: int = 0
  rebuckets: int = 0
  preemptions: int = 0
  copied_bytes: int = 0
  recomputed_tokens: int = 0
  resizes: int = 0
  compilations: int = 0
  xla_compilations: int = 0
  waiting_per_class: dict[int, int] = dataclasses.field(default_factory=dict)  # cache_len -> requests
  running_per_class: dict[int, int] = dataclasses.field(default_factory=dict)

  def observe_batch(self, live: int, slots: int) -> None:
    self.decode_calls += 1
    self.decoded_tokens += live
    self.decoded_slots += slots
    self.max_batch_size = max(self.max_batch_size, live)

  def observe_reserved(self, reserved: int, device: int) -> None:
    self.reserved_bytes = reserved
    self.peak_reserved_bytes = max(self.peak_reserved_bytes, reserved)
    self.peak_device_bytes = max(self.peak_device_bytes, device)

  @property
  def mean_batch_size(self) -> float:
    """Live sequences per decode call (one call per arena per step)."""
    return self.decoded_tokens / max(self.decode_calls, 1)

  @property
  def tokens_per_step(self) -> float:
    """Tokens per iteration across all arenas: the batch that compares policies."""
    return self.output_tokens / max(self.steps, 1)

  @property
  def slot_occupancy(self) -> float:
    """Fraction of decoded slots that held a live sequence."""
    return self.decoded_tokens / max(self.decoded_slots, 1)

  def snapshot(self) -> "EngineMetrics":
    return dataclasses.replace(self, waiting_per_class=dict(self.waiting_per_class),
                               running_per_class=dict(self.running_per_class))

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(mean_batch_size=self.mean_batch_size, tokens_per_step=self.tokens_per_step,
             slot_occupancy=self.slot_occupancy)
    return d
