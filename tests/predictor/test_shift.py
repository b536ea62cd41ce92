"""The shift-robust cold start: with no observation its margin covers a generator longer than most
of the training ones; with observations it narrows around the served model's own offset."""

import numpy as np
import pytest

from s3jax.predictor import ANY_GENERATOR
from s3jax.predictor.calibration import LEAVE_ONE_OUT, OBSERVED, Calibration, threshold_for
from s3jax.predictor.shift import GeneratorShift

OFFSETS = np.array([-1.5, -1.0, -0.4, -0.2, 0.0, 0.1, 0.2, 0.3, 0.4, 0.6])  # score units, as left out


def _scores(rng, offsets, per=80):
  groups = np.repeat(np.arange(len(offsets)), per)
  return offsets[groups] + rng.standard_normal(len(groups)), groups


def test_the_prior_is_the_generators_offsets_and_their_pooled_errors():
  rng = np.random.default_rng(0)
  scores, groups = _scores(rng, OFFSETS)
  shift = GeneratorShift.from_scores(scores, groups)
  np.testing.assert_allclose(shift.offsets, [scores[groups == g].mean() for g in range(len(OFFSETS))])
  assert shift.spread == pytest.approx(1.0, abs=0.05)
  # No observation: the offset's bound is an upper quantile of the generators' offsets.
  assert np.quantile(shift.offsets, 0.7) < shift.offset_bound([], 0.8) < shift.offsets.max() + shift.bandwidth


@pytest.mark.parametrize("target", [0.1, 0.2])
def test_unobserved_it_keeps_the_promise_on_most_generators_where_pooling_does_not(target):
  rng = np.random.default_rng(1)
  scores, groups = _scores(rng, OFFSETS)
  shift = GeneratorShift.from_scores(scores, groups)
  robust, pooled = shift.level([], target, 0.8), threshold_for(scores, target)
  new = [off + rng.standard_normal(4000) for off in OFFSETS]  # each generator served anew
  robust_rates = np.array([np.mean(z > robust) for z in new])
  pooled_rates = np.array([np.mean(z > pooled) for z in new])
  assert np.mean(robust_rates <= target + 0.01) >= 0.8
  assert np.mean(pooled_rates <= target + 0.01) <= 0.6  # the long generators overflow more than asked
  assert robust > pooled


def test_observations_narrow_the_margin_to_the_served_models_offset():
  rng = np.random.default_rng(2)
  scores, groups = _scores(rng, OFFSETS)
  shift = GeneratorShift.from_scores(scores, groups)
  served = 0.9 + rng.standard_normal(400)  # longer than every training generator
  bounds = [shift.offset_bound(served[:k]) for k in (0, 10, 50, 400)]
  _, means, sd = shift.posterior(served[:400])
  assert sd < 0.06 and bounds[-1] == pytest.approx(served.mean(), abs=0.1)
  # Once observed, overflow is at its target on the served model itself.
  fresh = 0.9 + rng.standard_normal(20000)
  for target in (0.1, 0.2):
    assert np.mean(fresh > shift.level(served[:400], target)) == pytest.approx(target, abs=0.03)
  # A short served model's margin falls below the unobserved one.
  assert shift.offset_bound(-1.2 + rng.standard_normal(50)) < bounds[0]


def test_a_served_model_whose_errors_spread_wider_widens_its_margin_as_it_is_observed():
  rng = np.random.default_rng(4)
  scores, groups = _scores(rng, OFFSETS)
  shift = GeneratorShift.from_scores(scores, groups)
  assert shift.error_quantile([], 0.1) == threshold_for(shift.errors, 0.1)
  served = 2.0 * rng.standard_normal(400)  # a typical offset, twice the training generators' spread
  fresh = 2.0 * rng.standard_normal(20000)
  rates = [np.mean(fresh > shift.level(served[:k], 0.1)) for k in (10, 50, 400)]
  # With the pooled errors alone the margin would stay theirs (1.28 units at 0.1, not 2.56).
  assert np.mean(fresh > shift.offset_bound(served[:400]) + threshold_for(shift.errors, 0.1)) > 0.2
  assert rates[0] > rates[1] > rates[2] and rates[2] == pytest.approx(0.1, abs=0.03), rates


def test_a_cold_calibration_reserves_by_it_until_it_is_observed():
  rng = np.random.default_rng(3)
  groups = np.repeat(np.arange(len(OFFSETS)), 80)
  m = rng.normal(4.0, 0.5, len(groups))
  true = np.round(np.expm1(m + 0.5 * (OFFSETS[groups] + rng.standard_normal(len(groups)))))
  samples = np.column_stack([m, np.full(len(m), np.log(0.5)), true])
  cold = Calibration(
    samples={ANY_GENERATOR: samples}, cold_start=LEAVE_ONE_OUT, groups={ANY_GENERATOR: groups.astype(str)}
  )
  assert cold.shift_robust(ANY_GENERATOR)
  shift = GeneratorShift.from_scores(cold.scores(ANY_GENERATOR), groups)
  assert cold.threshold(ANY_GENERATOR, 0.1) == pytest.approx(shift.level([], 0.1))
  seen = cold.with_observed(ANY_GENERATOR, samples[:30])
  assert ANY_GENERATOR not in cold.observed and len(seen.observed[ANY_GENERATOR]) == 30
  assert seen.threshold(ANY_GENERATOR, 0.1) == pytest.approx(shift.level(seen.observed_scores(ANY_GENERATOR), 0.1))
  assert seen.residual_moments(ANY_GENERATOR) == pytest.approx(shift.moments(seen.observed_scores(ANY_GENERATOR)))
  # Observed online (retrained), or without groups, the plain conformal level on its own samples.
  for plain in (
    Calibration(samples=cold.samples, cold_start=OBSERVED, groups=cold.groups),
    Calibration(samples=cold.samples),
  ):
    assert not plain.shift_robust(ANY_GENERATOR)
    assert plain.threshold(ANY_GENERATOR, 0.1) == threshold_for(cold.scores(ANY_GENERATOR), 0.1)


def test_groups_and_observations_survive_save_and_load(tmp_path):
  samples = np.column_stack([np.full(6, 4.0), np.full(6, -0.5), np.arange(10, 70, 10)])
  cal = Calibration(
    samples={ANY_GENERATOR: samples},
    cold_start=LEAVE_ONE_OUT,
    groups={ANY_GENERATOR: np.array(list("aabbcc"))},
    confidence=0.9,
  ).with_observed(ANY_GENERATOR, samples[:2])
  back = Calibration.load(cal.save(tmp_path).parent)
  assert back.confidence == 0.9 and back.cold_start == LEAVE_ONE_OUT
  assert list(back.groups[ANY_GENERATOR]) == list("aabbcc")
  np.testing.assert_array_equal(back.observed[ANY_GENERATOR], samples[:2])
  assert back.threshold(ANY_GENERATOR, 0.2) == cal.threshold(ANY_GENERATOR, 0.2)
