"""Training, Orbax save/restore, the serving API and its edge cases.

One small training run (module-scoped fixture) on hand-made prompts whose
answer length follows their wording; the tests share it to stay fast.
"""

import numpy as np
import pytest

from s3jax.buckets import BucketScheme
from s3jax.predictor import ANY_GENERATOR, DecodeRule, LengthPredictor, LossKind, ModelConfig, TrainConfig, train
from s3jax.predictor.calibration import threshold_for
from s3jax.predictor.evaluate import fit_calibration
from s3jax.predictor.predictor import DEFAULT_CHECKPOINT

SCHEME = BucketScheme.equal_width(4, 1000)  # bounds 250, 500, 750, 1000
TOPICS = ["cats", "rivers", "tax law", "volcanoes", "chess", "bread",
          "satellites", "jazz", "bees", "glaciers", "ink", "trains"]


def _dataset():
  prompts, lengths = [], []
  for t in TOPICS:
    prompts += [f"Answer yes or no: do you like {t}?",
                f"Write a long, detailed essay about the history of {t}."]
    lengths += [[5, 12], [900, 700]]  # Two generators' lengths.
  return prompts, np.asarray(lengths)


@pytest.fixture(scope="module")
def trained():
  prompts, lengths = _dataset()
  cfg = ModelConfig(generators=(ANY_GENERATOR, "gen_a", "gen_b"),
                    num_buckets=SCHEME.num_buckets, trainable_layers=1,
                    max_tokens=32, head_width=32)
  tcfg = TrainConfig(epochs=6, batch_size=8, head_lr=3e-3, encoder_lr=1e-4,
                     loss=LossKind.ORDINAL_EMD, head_dropout=0.0)
  result = train(model_cfg=cfg, train_cfg=tcfg, scheme=SCHEME,
                 prompts=prompts, lengths=lengths, calib_prompts=prompts,
                 calib_lengths=lengths, progress=False)
  pred = LengthPredictor(result.model, buckets=SCHEME, calibration=None,
                         generator="gen_a", decode_rule=DecodeRule.MEDIAN)
  calib = fit_calibration(SCHEME, cfg.generators,
                          pred.predict_proba_all(prompts), lengths, lengths)
  pred = LengthPredictor(result.model, buckets=SCHEME, calibration=calib,
                         generator="gen_a", decode_rule=DecodeRule.MEDIAN)
  return result, pred, prompts, lengths


def test_training_lowers_the_loss(trained):
  result, pred, prompts, lengths = trained
  losses = [h["train_loss"] for h in result.history]
  assert losses[-1] < 0.7 * losses[0], losses
  assert result.history[-1]["calib_loss"] < result.history[0]["calib_loss"]
  # It learnt the task: short prompts -> bucket 0, essays -> bucket 3 or 2.
  b = pred.predict(prompts)
  assert np.mean(b == SCHEME.bucket_of(lengths[:, 0])) >= 0.9


def test_save_restore_gives_identical_predictions(trained, tmp_path):
  _, pred, prompts, _ = trained
  pred.save(tmp_path / "ckpt")
  loaded = LengthPredictor.load(tmp_path / "ckpt")
  assert loaded.buckets == pred.buckets
  assert loaded.generator == "gen_a"
  assert loaded.generators == pred.generators
  np.testing.assert_array_equal(loaded.predict_proba_all(prompts),
                                pred.predict_proba_all(prompts))
  np.testing.assert_array_equal(loaded.predict(prompts, max_under_rate=0.1),
                                pred.predict(prompts, max_under_rate=0.1))


def test_empty_and_very_long_prompts(trained):
  _, pred, _, _ = trained
  long_prompt = "Explain this in detail. " * 2000  # ~10k word pieces
  out = pred.predict(["", long_prompt, "   ", "hi"])
  assert out.shape == (4,) and out.dtype == np.int32
  assert np.all((out >= 0) & (out < SCHEME.num_buckets))
  probs = pred.predict_proba([long_prompt, ""])
  assert np.all(np.isfinite(probs))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert pred.predict([]).shape == (0,)


def test_no_recompiles_in_steady_state(trained):
  _, pred, prompts, _ = trained
  pred.predict(prompts[:1])
  pred.predict(prompts[:5])
  count = pred.num_compilations
  for n in (1, 2, 5, 8, 3, 1):
    pred.predict(prompts[:n])
  assert pred.num_compilations == count
  # More than the largest batch shape is chunked, not compiled anew.
  pred.predict(prompts * 3)  # 72 prompts
  assert pred.num_compilations <= count + 1  # at most the (32, T) shape


def test_safety_margin_lowers_under_prediction(trained):
  _, pred, prompts, lengths = trained
  true = SCHEME.bucket_of(lengths[:, 0])
  loose = pred.predict(prompts, max_under_rate=0.5)
  strict = pred.predict(prompts, max_under_rate=0.0)
  assert np.all(strict >= loose)
  assert np.all(strict == SCHEME.num_buckets - 1)  # 0 certifies nothing less
  assert np.mean(pred.predict(prompts, max_under_rate=0.1) < true) <= 0.1
  with pytest.raises(KeyError):
    pred.predict(prompts, generator="unknown-model")
  # A new served model uses the <any> head.
  assert pred.predict(prompts[:2], generator=ANY_GENERATOR).shape == (2,)


def test_threshold_for_hand_cases():
  scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
  # n=10, alpha=0.2: k = ceil(11 * 0.8) = 9 -> just above 0.8, 1 of 10 above.
  tau = threshold_for(scores, 0.2)
  assert 0.8 < tau < 0.80001
  assert np.mean(scores >= tau) <= 0.2
  assert threshold_for(scores, 0.05) > 1.0  # too few scores to certify


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "config.json").exists(),
                    reason="default checkpoint not built")
def test_default_checkpoint_loads_and_predicts():
  pred = LengthPredictor.load_default()
  assert pred.generator == "llama-2-7b-chat-hf"
  out = pred.predict(["Write a poem about the sea.", ""])
  assert out.shape == (2,)
  assert pred.num_compilations == 1
