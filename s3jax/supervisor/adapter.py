"""The cold start adapts from the first finished request: a served model no head was trained on
narrows its shift-robust margin (s3jax.predictor.shift) with every length it is seen to produce.

Every finished request reaches the adapter through the engine's `MispredictionLog`. On its own
thread it hands the pending ones, batched, to `LengthPredictor.observe`, which predicts their
prompts again with the serving executables (nothing compiles), adds them to the cold head's
observations and swaps the recalibrated version in whole. Once the head is no longer cold (online
retraining calibrated it on the served model's own lengths) the adapter stops feeding it.
"""

from __future__ import annotations

import logging
import threading

from s3jax.supervisor.log import LengthObservation

logger = logging.getLogger(__name__)

# Observations handed to one `LengthPredictor.observe` call (one batched prediction).
BATCH = 32


class ColdStartAdapter:
  """Feeds a cold-started `LengthPredictor` the lengths its served model produces.

  `attach(engine)` subscribes to its observations; `start()` runs the feeding loop on a thread;
  `flush()` feeds what is pending, synchronously (tests, benchmarks).
  """

  def __init__(self, predictor):
    self.predictor = predictor
    self.observations = 0  # lengths fed so far
    self.cold = True  # False once the head has calibrated on its own lengths
    self._pending: list[LengthObservation] = []
    self._cv = threading.Condition()
    self._feeding = threading.Lock()  # one `observe` at a time: the loop's, or a `flush`
    self._thread: threading.Thread | None = None
    self._stop = False

  def attach(self, engine) -> None:
    engine.misprediction_log.subscribe(self.observe)

  def observe(self, observation: LengthObservation) -> None:
    """Called on the engine thread: hands the observation over, nothing more."""
    if observation.prompt_text is None or observation.predicted_output_len is None or not self.cold:
      return  # no prediction was made for it (another policy, or token-id prompts)
    with self._cv:
      self._pending.append(observation)
      self._cv.notify()

  def start(self) -> None:
    if self._thread is None:
      self._stop = False
      self._thread = threading.Thread(target=self._loop, name="s3jax-cold-start", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def flush(self) -> None:
    with self._feeding:
      while self.cold:
        with self._cv:
          batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
        if not batch:
          return
        self.cold = self.predictor.observe([o.prompt_text for o in batch], [o.true_output_len for o in batch])
        self.observations += len(batch) if self.cold else 0

  def _loop(self) -> None:
    while True:
      with self._cv:
        self._cv.wait_for(lambda: self._stop or self._pending)
        if self._stop:
          return
      try:
        self.flush()
      except Exception:  # a failed update must not stop serving; the margin stays as it was
        logger.exception("cold-start adaptation failed; the serving margin is unchanged")
