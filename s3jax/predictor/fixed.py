"""A predictor that always answers the same bucket.

The majority-bucket baseline of the evaluation, and the deliberately bad
predictor of the engine's tests (always the smallest bucket: every longer
answer overflows and must be re-bucketed or preempted).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from s3jax.buckets import BucketScheme


class FixedBucketPredictor:
  """``predict`` returns ``bucket`` for every prompt, ``reserve_tokens`` its upper bound."""

  def __init__(self, buckets: BucketScheme, bucket: int = 0):
    if not 0 <= bucket < buckets.num_buckets:
      raise ValueError(f"bucket must be in [0, {buckets.num_buckets}), got {bucket}")
    self.buckets = buckets
    self.bucket = bucket

  shapes: tuple = ()  # nothing to compile
  num_compilations = 0

  def predict(self, prompts: Sequence[str]) -> np.ndarray:
    return np.full((len(prompts),), self.bucket, np.int32)

  def reserve_tokens(self, prompts: Sequence[str]) -> np.ndarray:
    return np.full((len(prompts),), self.buckets.upper_bound(self.bucket), np.int64)

  def predict_lengths(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The reservations, and a distribution sure of the bucket's upper bound (scale 0)."""
    reserve = self.reserve_tokens(prompts)
    return reserve, np.column_stack([np.log1p(reserve.astype(np.float64)), np.zeros(len(reserve))])

  def warmup(self, shapes=None) -> int:
    return 0
