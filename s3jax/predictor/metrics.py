"""Length-prediction metrics: ranking, bucket accuracy, and reservations against a constant.

All lengths are capped at `max_length`: the engine never generates past it, so a longer answer costs
exactly the maximum reservation.

The comparison that matters to the scheduler is `reservation_metrics`: at the overflow rate the
predictor realises, how many tokens would the *best constant* reservation need for the same overflow
rate on the same requests (the smallest constant that overflows no more often)? A predictor is worth
its cost only if it reserves clearly fewer.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from s3jax.buckets import BucketScheme

# AlpacaEval generators that are not chat models (completion-tuned or plain instruction-tuned); the
# predictor's headline numbers average over the others.
NON_CHAT_GENERATORS = ("alpaca-7b", "falcon-7b-instruct", "text_davinci_003")


def best_constant(true: np.ndarray, overflow: float) -> float:
  """The smallest constant reservation whose overflow rate on `true` is at most `overflow`."""
  s = np.sort(np.asarray(true, np.float64))
  k = math.ceil(len(s) * (1.0 - overflow) - 1e-9)
  return float(s[min(max(k, 1), len(s)) - 1])


def reservation_metrics(reserved: np.ndarray, true: np.ndarray, max_length: int) -> dict[str, float]:
  """A reservation per request against the true lengths.

  Returns:
    overflow: fraction of requests whose answer outgrows its reservation.
    mean_reserved: mean reserved tokens.
    constant: the best constant reservation at the same overflow rate (`best_constant`).
    saving: 1 - mean_reserved / constant (> 0: the predictor reserves less).
  """
  true = np.minimum(np.asarray(true, np.float64), max_length)
  reserved = np.minimum(np.asarray(reserved, np.float64), max_length)
  overflow = float(np.mean(true > reserved))
  constant = best_constant(true, overflow)
  mean_reserved = float(np.mean(reserved))
  return {
    "overflow": overflow,
    "mean_reserved": mean_reserved,
    "constant": constant,
    "saving": 1.0 - mean_reserved / max(constant, 1.0),
  }


def kendall_tau(score: np.ndarray, true: np.ndarray) -> float:
  """Kendall tau-b between a ranking score and the true lengths (0 for a constant score)."""
  if np.ptp(score) == 0:
    return 0.0
  return float(stats.kendalltau(score, true).statistic)


def bucket_metrics(scheme: BucketScheme, predicted_tokens: np.ndarray, true: np.ndarray) -> dict[str, float]:
  """Exact and within-one bucket accuracy of a point prediction (the paper's classifier metrics)."""
  pb = scheme.bucket_of(np.minimum(np.asarray(predicted_tokens, np.int64), scheme.max_length))
  tb = scheme.bucket_of(np.minimum(np.asarray(true, np.int64), scheme.max_length))
  return {"exact": float(np.mean(pb == tb)), "within_one": float(np.mean(np.abs(pb - tb) <= 1))}


def majority_bucket_metrics(scheme: BucketScheme, train: np.ndarray, true: np.ndarray) -> dict[str, float]:
  """`bucket_metrics` of always answering the most frequent training bucket."""
  b = int(np.bincount(scheme.bucket_of(np.minimum(train, scheme.max_length)), minlength=scheme.num_buckets).argmax())
  return bucket_metrics(scheme, np.full(len(true), scheme.upper_bound(b)), true)
