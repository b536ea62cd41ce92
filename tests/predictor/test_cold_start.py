"""The cold start: calibrated leave one generator out, it keeps its overflow promise on a generator
that no model trained on, and narrows as it observes it; calibrated on the training generators
alone, it does not."""

import numpy as np

from s3jax.predictor import ANY_GENERATOR, LengthModelConfig, TrainConfig
from s3jax.predictor.calibration import Calibration, reserved_answer_tokens
from s3jax.predictor.cold_start import (
  evaluate_cold_start,
  leave_one_generator_out,
  pooled_samples,
  summarize_cold_start,
)
from s3jax.predictor.data import LengthData, split_by_id


def _synthetic(num_prompts=600, num_generators=15, seed=0):
  """Generators share each prompt's demand but differ in typical length (offsets of 0.6 log units);
  the `<any>` prediction knows the demand and not the offsets, as a model trained on other
  generators would."""
  rng = np.random.default_rng(seed)
  demand = rng.standard_normal(num_prompts)
  offsets = 0.6 * rng.standard_normal(num_generators)
  log_len = 5.0 + offsets[None] + 0.8 * demand[:, None] + 0.5 * rng.standard_normal((num_prompts, num_generators))
  lengths = np.clip(np.round(np.expm1(log_len)), 0, 2048).astype(np.int32)
  data = LengthData(
    ids=np.arange(num_prompts),
    prompts=tuple(f"p{i}" for i in range(num_prompts)),
    generators=tuple(f"g{g}" for g in range(num_generators)),
    lengths=lengths,
    prompt_tokens=np.ones(num_prompts, np.int32),
    tokenizer="synthetic",
  )
  dist = np.stack([5.0 + 0.8 * demand, np.full(num_prompts, np.log(0.5))], axis=-1)
  return data, np.repeat(dist[:, None], num_generators, axis=1)


def test_held_out_generators_served_as_streams_keep_the_promise_and_narrow_it():
  data, dists = _synthetic()
  split = split_by_id(data.ids)
  results = evaluate_cold_start(dists, data, split, max_length=2048, lag=8, orders=2)
  summary = summarize_cold_start(results)
  for target in (0.1, 0.2):
    robust, pooled = summary[f"shift-robust at {target}"], summary[f"pooled at {target}"]
    # Pooled over generators the promise holds on average only; the shift-robust level keeps it at the
    # start on the confidence's share of generators (0.8) and, once 50 lengths are observed, comes
    # near the target on every one (62 requests of 2 orders each: a worst case is noisy).
    assert abs(pooled["at_start"]["mean"] - target) <= 0.05, summary
    at_start = [r["shift-robust"][str(target)]["at_start"] for r in results.values()]
    assert np.mean(np.array(at_start) <= target + 0.05) >= 0.8, at_start
    assert abs(robust["after_50"]["mean"] - target) <= 0.04, summary
    assert abs(robust["after_50"]["worst_overflow"] - target) <= 0.12, summary
    assert abs(pooled["after_50"]["worst_overflow"] - target) > 0.3, summary
    assert robust["first_50"]["worst_overflow"] < pooled["first_50"]["worst_overflow"] - 0.3, summary


def test_calibrating_on_the_prompt_error_alone_breaks_the_promise():
  data, dists = _synthetic()
  split = split_by_id(data.ids)
  # As if the generator's typical length were known: only the prompt-level error is calibrated.
  known = dists.copy()
  known[..., 0] += (np.log1p(data.lengths) - dists[..., 0]).mean(0)[None]
  naive = Calibration(samples={ANY_GENERATOR: pooled_samples(known, data.lengths, split.calib, range(15))[0]})
  level = naive.threshold(ANY_GENERATOR, 0.1)
  overflow = [
    np.mean(data.lengths[split.test, g] > reserved_answer_tokens(dists[split.test, g], level, 2048)) for g in range(15)
  ]
  assert max(overflow) > 0.3  # the generators far from the typical length overflow far more than 0.1


def test_leave_one_generator_out_trains_without_each_generator():
  prompts = [f"Answer yes or no: do you like {t}?" for t in ("cats", "tea", "rain", "maps")] + [
    f"Write a long essay about {t}." for t in ("cats", "tea", "rain", "maps")
  ]
  lengths = np.array([[3, 5, 30]] * 4 + [[400, 900, 1500]] * 4, np.int32)
  data = LengthData(
    ids=np.arange(8),
    prompts=tuple(prompts),
    generators=("a", "b", "c"),
    lengths=lengths,
    prompt_tokens=np.ones(8, np.int32),
    tokenizer="test",
  )
  split = split_by_id(data.ids, test_frac=0.25, calib_frac=0.2)
  cfg = LengthModelConfig(generators=(ANY_GENERATOR, "a", "b", "c"), trainable_layers=0, max_tokens=32, head_width=16)
  dists = leave_one_generator_out(data, split, cfg, TrainConfig(epochs=3, batch_size=4), progress=False)
  assert dists.shape == (8, 3, 2) and np.all(np.isfinite(dists))
  # Without c (the longest answers) the typical predicted length is shortest; without a, longest.
  assert dists[:, 2, 0].mean() < dists[:, 1, 0].mean() < dists[:, 0, 0].mean()
