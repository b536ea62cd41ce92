"""From bucket probabilities to a bucket: decoding rules and the safety margin.

Shape legend: B batch, N buckets.

Safety margin (split conformal). For a threshold tau the predictor reserves
bucket `b(tau) = min{b : CDF(b) >= tau}`. A request with true bucket y
overflows its reservation exactly when `CDF(y - 1) >= tau`, so with the
score `s = CDF(y - 1)` measured on held-out calibration prompts, taking tau
just above the `ceil((n + 1)(1 - alpha))`-th smallest score keeps the
under-prediction rate at or below alpha for exchangeable new prompts. The
raw scores are stored, so any target can be chosen at load time.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import pathlib

import numpy as np

from s3jax.buckets import BucketScheme

CALIBRATION_FILENAME = "calibration.json"


class DecodeRule(enum.Enum):
  ARGMAX = "argmax"  # Most likely bucket.
  MEDIAN = "median"  # First bucket whose predicted CDF reaches 1/2.


def bucket_at_threshold(probs: np.ndarray, tau: float) -> np.ndarray:
  """[B, N] probabilities -> [B] first bucket with CDF >= tau (last if none)."""
  cdf = np.cumsum(probs, axis=-1)
  cdf[..., -1] = np.inf  # Rounding must never push a request past the end.
  return np.argmax(cdf >= tau, axis=-1).astype(np.int32)


def decode(probs: np.ndarray, rule: DecodeRule) -> np.ndarray:
  """[B, N] probabilities -> [B] bucket by `rule`."""
  if rule is DecodeRule.ARGMAX:
    return np.argmax(probs, axis=-1).astype(np.int32)
  return bucket_at_threshold(probs, 0.5)


def conformal_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[B, N], [B] -> [B] scores `CDF(y - 1)` (0 for bucket 0)."""
  cdf = np.concatenate([np.zeros_like(probs[:, :1]),
                        np.cumsum(probs, axis=-1)], axis=-1)
  return np.clip(cdf[np.arange(len(labels)), labels], 0.0, 1.0)


def threshold_for(scores: np.ndarray, max_under_rate: float) -> float:
  """CDF threshold whose under-prediction rate is at most `max_under_rate`.

  Returns a value above 1 (meaning: always reserve the last bucket) when
  there are too few calibration scores to certify the target.
  """
  if not 0.0 <= max_under_rate <= 1.0:
    raise ValueError("max_under_rate must be in [0, 1]")
  s = np.sort(np.asarray(scores, dtype=np.float64))
  k = math.ceil((len(s) + 1) * (1.0 - max_under_rate))
  if k > len(s):
    return 1.0 + 1e-6
  if k <= 0:
    return 0.0
  return float(np.nextafter(s[k - 1], np.inf))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
  """Held-out statistics per generator head, saved beside a checkpoint.

  Attributes:
    scores: generator -> calibration conformal scores (see module docstring).
    representatives: generator -> [N] typical length of each bucket (median
      of training lengths in it; bucket midpoint where empty). Used as the
      point prediction in tokens.
  """

  scores: dict[str, np.ndarray]
  representatives: dict[str, np.ndarray]

  def threshold(self, generator: str, max_under_rate: float) -> float:
    return threshold_for(self.scores[generator], max_under_rate)

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(directory) / CALIBRATION_FILENAME
    path.write_text(json.dumps({
        "scores": {g: np.asarray(v, np.float64).tolist()
                   for g, v in self.scores.items()},
        "representatives": {g: np.asarray(v).tolist()
                            for g, v in self.representatives.items()},
    }) + "\n")
    return path

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> Calibration:
    d = json.loads((pathlib.Path(directory) / CALIBRATION_FILENAME).read_text())
    return cls(scores={g: np.asarray(v) for g, v in d["scores"].items()},
               representatives={g: np.asarray(v, np.float64)
                                for g, v in d["representatives"].items()})


def bucket_representatives(scheme: BucketScheme,
                           lengths: np.ndarray) -> np.ndarray:
  """[N] median of `lengths` (capped at max_length) inside each bucket."""
  lengths = np.minimum(np.asarray(lengths), scheme.max_length)
  buckets = scheme.bucket_of(lengths)
  reps = []
  for b, (lo, hi) in enumerate(zip(scheme.lower_bounds, scheme.upper_bounds)):
    inside = lengths[buckets == b]
    reps.append(float(np.median(inside)) if len(inside) else (lo + hi) / 2)
  return np.asarray(reps)
