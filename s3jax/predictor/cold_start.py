"""The cold start, measured honestly: leave one generator out.

Shape legend: P prompts, G generators (data columns).

A served model with no observed lengths gets the `<any>` head. Whether its margin keeps its promise
on a *new* generator can only be seen on a generator the model never trained on, so for every
generator h in turn a model is trained on the other generators' lengths and its `<any>` head predicts
every prompt. Those predictions give:

* the `<any>` calibration samples a shipped checkpoint stores (each generator's calibration prompts,
  predicted by the model that never saw that generator), and
* the held-out evaluation: for each h, the level is calibrated on the *other* generators' samples and
  h's test prompts measure the overflow rate it realises, with no observations and after adapting to
  N of h's training-prompt lengths (calibration.adapt).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import (
  MIN_ADAPT_OBSERVATIONS,
  Calibration,
  ReservationRule,
  adapt,
  effective_rule,
  reserved_answer_tokens,
)
from s3jax.predictor.data import LengthData, Split
from s3jax.predictor.metrics import reservation_metrics
from s3jax.predictor.model import ANY_GENERATOR, LengthModelConfig
from s3jax.predictor.predictor import LengthPredictor
from s3jax.predictor.train import TrainConfig, train


def leave_one_generator_out(
  data: LengthData, split: Split, model_cfg: LengthModelConfig, train_cfg: TrainConfig, progress: bool = True
) -> np.ndarray:
  """[P, G, 2]: for each generator g, the `<any>` distributions of every prompt from a model trained
  (on the training prompts) without g's lengths."""
  train_d, calib_d = data.subset(split.train), data.subset(split.calib)
  out = np.zeros((len(data.prompts), len(data.generators), 2))
  for g in tqdm(range(len(data.generators)), desc="leave one generator out", disable=not progress):
    cols = [c for c in range(len(data.generators)) if c != g]
    cfg = dataclasses.replace(model_cfg, generators=(ANY_GENERATOR, *(data.generators[c] for c in cols)))
    result = train(
      model_cfg=cfg,
      train_cfg=train_cfg,
      prompts=list(train_d.prompts),
      lengths=train_d.lengths[:, cols],
      calib_prompts=list(calib_d.prompts),
      calib_lengths=calib_d.lengths[:, cols],
      progress=False,
    )
    probe = LengthPredictor(result.model, buckets=BucketScheme.equal_width(1), calibration=None)
    out[:, g] = probe.predict_dist_all(list(data.prompts))[:, 0]
  return out


def pooled_samples(dists: np.ndarray, lengths: np.ndarray, rows: np.ndarray, columns) -> np.ndarray:
  """[n, 3] (mean, log scale, true tokens) of the given prompt rows and generator columns."""
  parts = []
  for g in columns:
    seen = rows[lengths[rows, g] >= 0]
    parts.append(np.column_stack([dists[seen, g], lengths[seen, g]]))
  return np.concatenate(parts)


def evaluate_cold_start(
  dists: np.ndarray,
  data: LengthData,
  split: Split,
  *,
  max_length: int,
  rule: ReservationRule,
  targets=(0.1, 0.2),
  observations=(0, 10, 50),
  seed: int = 0,
) -> dict:
  """Per held-out generator and target: realised overflow and reserved tokens against the best
  constant, with no observations and after adapting to N observed lengths."""
  rng = np.random.default_rng(seed)
  out = {}
  for g, name in enumerate(data.generators):
    others = [c for c in range(len(data.generators)) if c != g]
    calib = Calibration(
      samples={ANY_GENERATOR: pooled_samples(dists, data.lengths, split.calib, others)},
      cold_start="leave-one-generator-out",
      max_length=max_length,
    )
    test = split.test[data.lengths[split.test, g] >= 0]
    observed_pool = split.train[data.lengths[split.train, g] >= 0]
    rows = {}
    for n in observations:
      seen = rng.choice(observed_pool, size=min(n, len(observed_pool)), replace=False)
      fit = adapt(dists[seen, g], data.lengths[seen, g], calib, ANY_GENERATOR)
      dist = dists[test, g].copy()
      dist[:, 0] += fit.offset
      head_rule = effective_rule(rule, cold=len(seen) < MIN_ADAPT_OBSERVATIONS)
      for target in targets:
        level = fit.calibration.threshold(ANY_GENERATOR, target, head_rule)
        reserved = reserved_answer_tokens(dist, level, max_length, head_rule)
        rows[f"n{n}_at_{target}"] = reservation_metrics(reserved, data.lengths[test, g], max_length)
    out[name] = rows
  return out


def summarize_cold_start(results: dict, targets=(0.1, 0.2), observations=(0, 10, 50)) -> dict:
  """Mean and worst realised overflow over held-out generators, per (observations, target)."""
  out = {}
  for n in observations:
    for target in targets:
      key = f"n{n}_at_{target}"
      over = {g: r[key]["overflow"] for g, r in results.items()}
      worst = max(over, key=lambda g: abs(over[g] - target))
      out[key] = {
        "mean_overflow": float(np.mean(list(over.values()))),
        "worst_generator": worst,
        "worst_overflow": over[worst],
        "mean_saving": float(np.mean([r[key]["saving"] for r in results.values()])),
      }
  return out
