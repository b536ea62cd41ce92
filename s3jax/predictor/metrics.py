"""Length-prediction metrics and the two baselines they are compared with.

All lengths are capped at the scheme's `max_length`: the engine never
generates past it, so a longer answer costs exactly the last bucket.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from s3jax.buckets import BucketScheme

# Higher is better for these; lower for the rest.
HIGHER_IS_BETTER = ("accuracy", "within_one", "kendall_tau")
METRIC_NAMES = ("accuracy", "within_one", "under_rate", "over_reservation",
                "mae_tokens", "kendall_tau")


def length_metrics(scheme: BucketScheme, true_lengths: np.ndarray,
                   pred_buckets: np.ndarray, point_lengths: np.ndarray,
                   scores: np.ndarray | None) -> dict[str, float]:
  """Metrics of one method on one set of requests.

  Args:
    scheme: bucket scheme.
    true_lengths: [B] true output lengths (tokens).
    pred_buckets: [B] predicted buckets (the reservation).
    point_lengths: [B] point predictions in tokens (for MAE).
    scores: [B] a ranking score (higher = longer) for Kendall's tau, or None
      for a constant predictor (tau reported as 0).

  Returns:
    accuracy: exact bucket.
    within_one: |predicted - true bucket| <= 1.
    under_rate: fraction with true bucket above predicted (overflows).
    over_reservation: mean(reserved - true) tokens, reserved = upper bound of
      the predicted bucket (negative terms are overflows).
    waste_if_fits: mean(reserved - true) over requests that fit.
    mean_reserved: mean reserved tokens.
    mae_tokens: mean |point prediction - true|.
    kendall_tau: tau-b between scores and true lengths.
  """
  true = np.minimum(np.asarray(true_lengths, np.float64), scheme.max_length)
  tb = scheme.bucket_of(true.astype(np.int64))
  pb = np.asarray(pred_buckets)
  reserved = scheme.upper_bound(pb).astype(np.float64)
  fits = pb >= tb
  tau = 0.0
  if scores is not None and np.ptp(scores) > 0:
    tau = float(stats.kendalltau(scores, true).statistic)
  return {
      "accuracy": float(np.mean(pb == tb)),
      "within_one": float(np.mean(np.abs(pb - tb) <= 1)),
      "under_rate": float(np.mean(pb < tb)),
      "over_reservation": float(np.mean(reserved - true)),
      "waste_if_fits": float(np.mean((reserved - true)[fits]))
                       if fits.any() else 0.0,
      "mean_reserved": float(np.mean(reserved)),
      "mae_tokens": float(np.mean(np.abs(np.minimum(point_lengths,
                                                    scheme.max_length)
                                         - true))),
      "kendall_tau": tau,
  }


def majority_baseline(scheme: BucketScheme, train_lengths: np.ndarray,
                      n: int) -> tuple[np.ndarray, np.ndarray, None]:
  """Most frequent training bucket for all; point = training median."""
  train = np.minimum(train_lengths, scheme.max_length)
  b = int(np.bincount(scheme.bucket_of(train),
                      minlength=scheme.num_buckets).argmax())
  return (np.full(n, b, np.int32), np.full(n, float(np.median(train))), None)


def linear_baseline(scheme: BucketScheme, train_prompt_tokens: np.ndarray,
                    train_lengths: np.ndarray, test_prompt_tokens: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Least-squares length ~ a + b * prompt tokens; bucket of the prediction."""
  train = np.minimum(train_lengths, scheme.max_length).astype(np.float64)
  x = np.stack([np.ones(len(train_prompt_tokens)), train_prompt_tokens], 1)
  coef, *_ = np.linalg.lstsq(x.astype(np.float64), train, rcond=None)
  pred = coef[0] + coef[1] * np.asarray(test_prompt_tokens, np.float64)
  pred = np.clip(pred, 0, scheme.max_length)
  return scheme.bucket_of(np.rint(pred).astype(np.int64)), pred, pred


def beats(ours: dict, other: dict) -> dict[str, bool]:
  """Per metric: is `ours` strictly better than `other`?"""
  out = {}
  for m in METRIC_NAMES:
    out[m] = (ours[m] > other[m]) if m in HIGHER_IS_BETTER else (
        ours[m] < other[m])
  return out
