"""What the supervisor records for retraining the length predictor.

Every finished request contributes one ``LengthObservation`` (prompt, the
bucket the predictor chose, the length the answer really had). Overflows —
answers longer than their predicted reservation — are the mispredictions that
cost a re-bucketing or a preemption; they are what online retraining must
fix first, but the full stream is kept because a retrained predictor also
needs the requests it got right.
"""

from __future__ import annotations

import collections
import dataclasses
import threading


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LengthObservation:
  prompt_ids: tuple[int, ...]
  prompt_text: str | None  # what the length predictor read
  predicted_bucket: int | None
  predicted_output_len: int | None  # reserved output tokens (the predictor's reservation)
  true_output_len: int
  grows: int
  preemptions: int
  finish_reason: str

  @property
  def overflowed(self) -> bool:
    return self.predicted_output_len is not None and self.true_output_len > self.predicted_output_len


class MispredictionLog:
  """A bounded, thread-safe record of observed lengths (newest kept)."""

  def __init__(self, capacity: int = 10_000):
    self._items: collections.deque[LengthObservation] = collections.deque(maxlen=capacity)
    self._lock = threading.Lock()
    self._subscribers: list = []

  def subscribe(self, callback) -> None:
    """Calls `callback(observation)` for every observation from now on (on the engine thread: it
    must only hand the observation over, e.g. to a queue)."""
    self._subscribers.append(callback)

  def observe(self, request) -> None:
    """Records a finished ``EngineRequest``."""
    item = LengthObservation(
      prompt_ids=tuple(request.prompt_ids),
      prompt_text=request.prompt_text,
      predicted_bucket=request.predicted_bucket,
      predicted_output_len=request.predicted_output_len,
      true_output_len=len(request.output_ids),
      grows=request.grows,
      preemptions=request.preemptions,
      finish_reason=request.finish_reason.value,
    )
    with self._lock:
      self._items.append(item)
    for callback in self._subscribers:
      callback(item)

  def observations(self) -> list[LengthObservation]:
    with self._lock:
      return list(self._items)

  def mispredictions(self) -> list[LengthObservation]:
    return [o for o in self.observations() if o.overflowed]

  def overflow_rate(self, window: int) -> tuple[float, int]:
    """Overflow rate over the newest `window` requests that had a predicted reservation, and how
    many there were (0.0, 0 before any)."""
    with self._lock:
      recent = []
      for o in reversed(self._items):
        if o.predicted_output_len is not None:
          recent.append(o.overflowed)
          if len(recent) == window:
            break
    return (sum(recent) / len(recent) if recent else 0.0), len(recent)

  def __len__(self) -> int:
    return len(self._items)
