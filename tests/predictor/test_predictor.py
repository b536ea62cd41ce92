"""Training, Orbax save/restore, the serving API, reservation rules and the cold start.

One small training run (module-scoped fixture) on hand-made prompts whose answer length follows their
wording; the tests share it to stay fast.
"""

import dataclasses
import math

import numpy as np
import pytest

from s3jax.buckets import BucketScheme
from s3jax.predictor import ANY_GENERATOR, LengthModelConfig, LengthPredictor, TrainConfig, train
from s3jax.predictor.calibration import (
  LEAVE_ONE_OUT,
  ReservationRule,
  conformal_scores,
  reserved_answer_tokens,
  threshold_for,
)
from s3jax.predictor.predictor import DEFAULT_CHECKPOINT

SCHEME = BucketScheme.equal_width(4, 1000)  # bounds 250, 500, 750, 1000
TOPICS = [
  "cats",
  "rivers",
  "tax law",
  "volcanoes",
  "chess",
  "bread",
  "satellites",
  "jazz",
  "bees",
  "glaciers",
  "ink",
  "trains",
]


def _dataset():
  prompts, lengths = [], []
  for t in TOPICS:
    prompts += [f"Answer yes or no: do you like {t}?", f"Write a long, detailed essay about the history of {t}."]
    lengths += [[5, 12], [900, 700]]  # Two generators' lengths.
  return prompts, np.asarray(lengths)


@pytest.fixture(scope="module")
def trained():
  prompts, lengths = _dataset()
  cfg = LengthModelConfig(
    generators=(ANY_GENERATOR, "gen_a", "gen_b"), trainable_layers=1, max_tokens=32, head_width=32
  )
  tcfg = TrainConfig(epochs=12, batch_size=8, head_lr=3e-3, encoder_lr=1e-4, head_dropout=0.0)
  result = train(
    model_cfg=cfg,
    train_cfg=tcfg,
    prompts=prompts,
    lengths=lengths,
    calib_prompts=prompts,
    calib_lengths=lengths,
    progress=False,
  )
  pred = LengthPredictor(result.model, buckets=SCHEME, calibration=None, generator="gen_a").calibrated(prompts, lengths)
  return result, pred, prompts, lengths


def test_training_learns_which_prompts_are_long(trained):
  result, pred, prompts, lengths = trained
  losses = [h["train_loss"] for h in result.history]
  assert losses[-1] < 0.7 * losses[0], losses
  assert result.history[-1]["calib_nll"] < result.history[0]["calib_nll"]
  mean = pred.predict_dist(prompts)[:, 0]
  assert np.all(mean[1::2] > mean[0::2] + 2.0)  # every essay far above every yes/no, in log tokens
  median = reserved_answer_tokens(pred.predict_dist(prompts), 0.0, SCHEME.max_length)  # true: 5 and 900
  assert np.all(median[0::2] < 60) and np.all(median[1::2] > 250), median


def test_save_restore_gives_identical_predictions(trained, tmp_path):
  _, pred, prompts, _ = trained
  pred.with_options(max_under_rate=0.3, rule="quantile").save(tmp_path / "ckpt")
  loaded = LengthPredictor.load(tmp_path / "ckpt")
  assert (loaded.buckets, loaded.generator, loaded.generators) == (pred.buckets, "gen_a", pred.generators)
  assert (loaded.max_under_rate, loaded.rule) == (0.3, ReservationRule.QUANTILE)
  np.testing.assert_array_equal(loaded.predict_dist_all(prompts), pred.predict_dist_all(prompts))
  for rule in ReservationRule:
    np.testing.assert_array_equal(
      loaded.with_options(rule=rule).reserve_tokens(prompts, max_under_rate=0.2),
      pred.with_options(rule=rule).reserve_tokens(prompts, max_under_rate=0.2),
    )
  assert loaded.calibration.cold_start == "pooled"


def test_empty_and_very_long_prompts(trained):
  _, pred, _, _ = trained
  long_prompt = "Explain this in detail. " * 2000  # ~10k word pieces
  out = pred.reserve_tokens(["", long_prompt, "   ", "hi"])
  assert out.shape == (4,) and np.all((out >= 1) & (out <= SCHEME.max_length))
  assert pred.predict(["", long_prompt]).dtype == np.int32
  probs = pred.predict_proba([long_prompt, ""])
  assert np.all(np.isfinite(probs))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  assert pred.reserve_tokens([]).shape == (0,)


def test_no_recompiles_in_steady_state(trained):
  _, pred, prompts, _ = trained
  pred.reserve_tokens(prompts[:1])
  pred.reserve_tokens(prompts[:5])
  count = pred.num_compilations
  for n in (1, 2, 5, 8, 3, 1):
    pred.reserve_tokens(prompts[:n])
  assert pred.num_compilations == count
  pred.reserve_tokens(prompts * 3)  # 72 prompts: chunked, not compiled anew
  assert pred.num_compilations <= count + 1  # at most the (32, T) shape


@pytest.mark.parametrize("rule", list(ReservationRule))
def test_safety_margin_holds_and_is_monotone(trained, rule):
  _, pred, prompts, lengths = trained
  pred = pred.with_options(rule=rule)
  loose = pred.reserve_tokens(prompts, max_under_rate=0.5)
  strict = pred.reserve_tokens(prompts, max_under_rate=0.1)
  assert np.all(strict >= loose)
  # Calibrated on these very prompts: the realised overflow meets the target.
  assert np.mean(lengths[:, 0] > strict) <= 0.1
  # 24 scores cannot certify 1%: reserve the maximum.
  assert np.all(pred.reserve_tokens(prompts, max_under_rate=0.01) == SCHEME.max_length)
  with pytest.raises(KeyError, match="unknown-model"):
    pred.reserve_tokens(prompts, generator="unknown-model")
  with pytest.raises(ValueError, match="max_under_rate"):
    pred.with_options(max_under_rate=1.5)
  assert pred.reserve_tokens(prompts[:2], generator=ANY_GENERATOR).shape == (2,)


def test_head_selection(trained):
  _, pred, _, _ = trained
  assert pred.head_for("gen_b") == "gen_b"
  assert pred.head_for("/models/GEN_B") == "gen_b"  # a checkpoint path named like the head
  assert pred.head_for("gpt2-small") == ANY_GENERATOR
  other = pred.with_options("gen_b", 0.3)
  assert (pred.generator, pred.max_under_rate) == ("gen_a", 0.2)  # the original is unchanged
  assert (other.generator, other.max_under_rate) == ("gen_b", 0.3)


def test_threshold_for_hand_cases():
  scores = np.arange(10) / 10
  # n=10, alpha=0.2: k = ceil(11 * 0.8) = 9 -> just above 0.8, 1 of 10 above.
  level = threshold_for(scores, 0.2)
  assert 0.8 < level < 0.80001
  assert np.mean(scores >= level) <= 0.2
  assert math.isinf(threshold_for(scores, 0.05))  # too few scores to certify


def test_quantile_rule_by_hand():
  dist = np.array([[np.log(101.0), np.log(0.5)]])  # median 100 tokens, scale 0.5
  assert reserved_answer_tokens(dist, 0.0, 2048)[0] == 100
  assert reserved_answer_tokens(dist, 2.0, 2048)[0] == math.ceil(np.expm1(np.log(101.0) + 1.0))
  assert reserved_answer_tokens(dist, 50.0, 2048)[0] == 2048
  assert reserved_answer_tokens(dist, math.inf, 2048)[0] == 2048


@pytest.mark.parametrize("rule", list(ReservationRule))
def test_a_request_fits_exactly_from_its_score_on(rule):
  rng = np.random.default_rng(0)
  dist = np.column_stack([rng.uniform(2, 7, 300), rng.uniform(-1.5, 0.5, 300)])
  true = rng.integers(2, 2048, 300)
  scores = conformal_scores(dist, true, rule, 2048)
  assert np.all(np.concatenate([reserved_answer_tokens(d[None], s, 2048, rule) for d, s in zip(dist, scores)]) >= true)
  below = np.concatenate(
    [reserved_answer_tokens(d[None], s * (1 - 1e-2) - 1e-2, 2048, rule) for d, s in zip(dist, scores)]
  )
  assert np.mean((below < true)[np.isfinite(scores) & (true > 100)]) >= 0.9  # just below its score, it overflows


def test_min_cost_gives_up_on_hopeless_prompts_and_is_tight_on_sure_ones():
  sure, hopeless = [np.log(201.0), np.log(0.02)], [np.log(201.0), np.log(3.0)]
  out = reserved_answer_tokens(np.array([sure, hopeless]), 500.0, 2048, ReservationRule.MIN_COST)
  assert 195 <= out[0] <= 215  # about its length
  assert out[1] < 100  # below its median: anything from 1 to 2048 tokens, reserving is mostly wasted
  # A low enough level gives up on both; a high one covers the wide one's tail too.
  assert list(reserved_answer_tokens(np.array([sure, hopeless]), 50.0, 2048, ReservationRule.MIN_COST)) == [1, 1]
  assert reserved_answer_tokens(np.array([hopeless]), 5000.0, 2048, ReservationRule.MIN_COST)[0] > 500


def test_adapted_predictor_uses_the_cold_start_head(trained):
  _, pred, prompts, lengths = trained
  groups = np.repeat(["a", "b"], len(prompts))  # the <any> samples, as if two generators were left out
  samples = np.concatenate(
    [np.column_stack([pred.predict_dist(prompts, ANY_GENERATOR), lengths[:, g]]) for g in (0, 1)]
  )
  cold = dataclasses.replace(
    pred.live.calibration,
    samples={**pred.live.calibration.samples, ANY_GENERATOR: samples},
    cold_start=LEAVE_ONE_OUT,
    groups={ANY_GENERATOR: groups},
  )
  pred = pred.with_options()  # the module's predictor stays as it is
  pred.live = dataclasses.replace(pred.live, calibration=cold)
  adapted = pred.adapted(prompts, lengths[:, 1] * 3)
  assert adapted.generator == ANY_GENERATOR and pred.live.calibration is cold  # this one unchanged
  observed = adapted.live.calibration.observed[ANY_GENERATOR]
  np.testing.assert_allclose(observed[:, :2], pred.predict_dist(prompts, ANY_GENERATOR))
  np.testing.assert_array_equal(observed[:, 2], lengths[:, 1] * 3)
  # Three times longer answers than either generator's: the margin widens, the parameters stay.
  assert adapted.level() > pred.with_options(ANY_GENERATOR).level()
  np.testing.assert_array_equal(adapted.predict_dist(prompts), pred.predict_dist(prompts, ANY_GENERATOR))


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "config.json").exists(), reason="default checkpoint not built")
def test_default_checkpoint_loads_and_predicts():
  pred = LengthPredictor.load_default()
  assert pred.generator == "llama-2-7b-chat-hf"
  assert pred.calibration.cold_start == "leave-one-generator-out"
  out = pred.reserve_tokens(["Write a poem about the sea.", ""])
  assert out.shape == (2,)
  assert pred.num_compilations == 1
