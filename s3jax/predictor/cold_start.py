"""The cold start, measured honestly: leave one generator out.

Shape legend: P prompts, G generators (data columns), N requests of a stream.

A served model with no observed lengths gets the `<any>` head. Whether its margin keeps its promise
on a *new* generator can only be seen on a generator the model never trained on, so for every
generator h in turn a model is trained on the other generators' lengths and its `<any>` head predicts
every prompt. Those predictions give:

* the `<any>` calibration samples a shipped checkpoint stores, each with the generator it came from
  (each generator's calibration prompts, predicted by the model that never saw that generator), and
* the held-out evaluation (`served_stream`): the served model h answers its test prompts in a random
  order, each reserved at the level of what was observed by then (the lengths of the requests that
  finished: all but the last `lag`), with the level taken from the *other* generators' samples only.
  It reports the realised overflow at the start (no observation), over the first requests, and once
  50 lengths are observed, for the shift-robust level (shift.py) and for the pooled level the
  server used before (one conformal level over every generator's samples, never adapted).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import (
  LEAVE_ONE_OUT,
  Calibration,
  ReservationRule,
  conformal_scores,
  reserved_answer_tokens,
)
from s3jax.predictor.data import LengthData, Split
from s3jax.predictor.metrics import reservation_metrics
from s3jax.predictor.model import ANY_GENERATOR, LengthModelConfig
from s3jax.predictor.predictor import LengthPredictor
from s3jax.predictor.shift import GeneratorShift
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


def pooled_samples(dists: np.ndarray, lengths: np.ndarray, rows: np.ndarray, columns) -> tuple[np.ndarray, np.ndarray]:
  """[n, 3] (mean, log scale, true tokens) of the given prompt rows and generator columns, and [n]
  the column each came from."""
  parts, groups = [], []
  for g in columns:
    seen = rows[lengths[rows, g] >= 0]
    parts.append(np.column_stack([dists[seen, g], lengths[seen, g]]))
    groups.append(np.full(len(seen), g))
  return np.concatenate(parts), np.concatenate(groups)


def served_stream(
  prior: Calibration,
  dist: np.ndarray,
  lengths: np.ndarray,
  *,
  max_length: int,
  targets=(0.1, 0.2),
  lag: int = 32,
  first: int = 50,
  after: int = 50,
  orders: int = 10,
  seed: int = 0,
) -> dict:
  """A new served model's requests, each reserved at the level of the lengths observed before it.

  Args:
    prior: `<any>`'s leave-one-generator-out calibration (samples with groups), without the served
      model's generator.
    dist: [N] x 2 the `<any>` head's distributions of the served model's prompts.
    lengths: [N] their true lengths.
    lag: requests still running when one arrives (their lengths are not observed yet).
    first, after: the first `first` requests, and those that arrive after `after` observations.
    orders: random arrival orders averaged over.

  Returns, per level ("shift-robust", "pooled") and target: realised overflow with no observation
  (every request at the start's level), over the first requests and after the observations, and the
  saving against the best constant at equal overflow on the requests after the observations.
  """
  true = np.minimum(np.asarray(lengths), max_length)
  scores = conformal_scores(dist, true, ReservationRule.QUANTILE, max_length)
  shift = GeneratorShift.from_scores(prior.scores(ANY_GENERATOR), prior.groups[ANY_GENERATOR])
  pooled = Calibration(samples=prior.samples, cold_start="pooled", max_length=prior.max_length)
  rng = np.random.default_rng(seed)
  runs = {(name, t): [] for name in ("shift-robust", "pooled") for t in targets}
  for _ in range(orders):
    order = rng.permutation(len(true))
    seen = np.maximum(np.arange(len(true)) - lag, 0)  # [N] lengths observed when each arrives
    late = seen >= after
    for t in targets:
      levels = {k: shift.level(scores[order[:k]], t, prior.confidence) for k in np.unique(seen)}
      robust = np.array([levels[k] for k in seen])
      for name, level in (("shift-robust", robust), ("pooled", np.full(len(true), pooled.threshold(ANY_GENERATOR, t)))):
        reserved = reserved_answer_tokens(dist[order], level, max_length)
        over = true[order] > reserved
        start = reserved_answer_tokens(dist, level[0], max_length)
        runs[name, t].append(
          {
            "at_start": float(np.mean(true > start)),
            f"first_{first}": float(over[:first].mean()),
            f"after_{after}": float(over[late].mean()),
            "saving": reservation_metrics(reserved[late], true[order][late], max_length)["saving"],
          }
        )
  return {
    name: {str(t): {k: float(np.mean([r[k] for r in runs[name, t]])) for k in runs[name, t][0]} for t in targets}
    for name in ("shift-robust", "pooled")
  }


def evaluate_cold_start(dists: np.ndarray, data: LengthData, split: Split, *, max_length: int, **stream) -> dict:
  """`served_stream` for every generator h as the new served model: its `<any>` distributions from
  the model that never saw h, on the test prompts h answered (no model trained on them: on its
  training prompts a model is sharper than its calibration samples say), the level from the other
  generators' calibration samples."""
  out = {}
  for g, name in enumerate(data.generators):
    others = [c for c in range(len(data.generators)) if c != g]
    samples, groups = pooled_samples(dists, data.lengths, split.calib, others)
    prior = Calibration(
      samples={ANY_GENERATOR: samples}, cold_start=LEAVE_ONE_OUT, max_length=max_length, groups={ANY_GENERATOR: groups}
    )
    rows = split.test[data.lengths[split.test, g] >= 0]
    out[name] = served_stream(prior, dists[rows, g], data.lengths[rows, g], max_length=max_length, **stream)
  return out


def summarize_cold_start(results: dict) -> dict:
  """Per level and target: the mean and worst (farthest from the target) realised overflow over the
  held-out generators, for each column of `served_stream`, and the mean saving."""
  out = {}
  some = next(iter(results.values()))
  for level, by_target in some.items():
    for target, columns in by_target.items():
      row = {}
      for col in columns:
        values = {g: r[level][target][col] for g, r in results.items()}
        if col == "saving":
          row["mean_saving"] = float(np.mean(list(values.values())))
          continue
        worst = max(values, key=lambda g: abs(values[g] - float(target)))
        row[col] = {"mean": float(np.mean(list(values.values()))), "worst": worst, "worst_overflow": values[worst]}
      out[f"{level} at {target}"] = row
  return out
