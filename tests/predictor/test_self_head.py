"""Self-prediction: a head on the served model's own hidden state, in the engine (issue 30)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s3jax.buckets import BucketScheme
from s3jax.engine import Engine, EngineConfig, EngineRequest
from s3jax.executor.runner import ModelRunner, xla_compilations
from s3jax.models import gpt
from s3jax.predictor.metrics import kendall_tau
from s3jax.predictor.self_head import (
  SelfHead,
  SelfHeadConfig,
  SelfHeadVersion,
  SelfLengthPredictor,
  calibration_for,
  train_self_head,
)

LAYER = 2
BUCKETS = BucketScheme.equal_width(10, 200)


@pytest.fixture(scope="module")
def runner():
  return ModelRunner.load("tiny-llama")


def _head(width: int, seed: int) -> SelfHead:
  head = SelfHead(width, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(seed)
  head.out.kernel[...] = jnp.asarray(rng.normal(0, 0.3, (width, 2)), jnp.float32)
  head.out.bias[...] = jnp.asarray([3.0, -1.0])
  head.spread[...] = jnp.asarray(rng.uniform(0.5, 2.0, width), jnp.float32)
  return head


def _calibration(name: str) -> object:
  rng = np.random.default_rng(0)
  dist = np.column_stack([rng.normal(3, 0.5, 64), np.full(64, -1.0)])
  return calibration_for(name, dist, np.expm1(dist[:, 0] + rng.normal(0, 0.4, 64)).round(), BUCKETS.max_length)


def _predictor(runner, seed=0, **config) -> SelfLengthPredictor:
  cfg = SelfHeadConfig(
    served_model="tiny-llama",
    layer=LAYER,
    width=runner.cfg.d_model,
    **{"max_tokens": 64, "token_shapes": (16, 64), "batch_shapes": (1, 4), **config},
  )
  return SelfLengthPredictor(
    runner, _head(cfg.width, seed), cfg, buckets=BUCKETS, calibration=_calibration("tiny-llama")
  )


def _prompts(n=7, seed=0):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(0, 200, rng.integers(1, 60))] for _ in range(n)]


def test_the_head_reads_what_a_full_forward_computes(runner):
  """Batched, padded, per-shape executables give each prompt the distribution the head gives the
  hidden state of an unpadded full forward of that prompt alone."""
  predictor = _predictor(runner)
  prompts = _prompts()
  served = predictor.predict_dist(prompts)
  model = nnx.merge(runner.graphdef, runner.params)
  head = nnx.merge(*nnx.split(_head(runner.cfg.d_model, 0)))
  for ids, got in zip(prompts, served):
    hidden = gpt.forward_hidden(model, jnp.asarray([ids], jnp.int32))[LAYER, 0, -1]
    np.testing.assert_allclose(got, np.asarray(head(hidden[None]))[0], atol=1e-4, rtol=1e-4)


def test_hidden_at_several_positions_of_a_row_is_the_full_forward_there(runner):
  """What a remaining-length head reads while a request decodes: K positions of each row at once."""
  model = nnx.merge(runner.graphdef, runner.params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 200, (2, 24)), jnp.int32)
  last = jnp.asarray([[3, 10, 23], [0, 7, 15]], jnp.int32)
  got = gpt.hidden_at(model, tokens, last, LAYER)  # [B, K, D]
  full = gpt.forward_hidden(model, tokens)[LAYER]  # [B, T, D]
  assert got.shape == (2, 3, runner.cfg.d_model)
  for b in range(2):
    np.testing.assert_allclose(got[b], full[b, last[b]], atol=1e-5, rtol=1e-5)


def test_hidden_mean_at_averages_the_full_forward_over_the_generated_positions(runner):
  model = nnx.merge(runner.graphdef, runner.params)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 200, (2, 24)), jnp.int32)
  first, last = jnp.asarray([0, 6], jnp.int32), jnp.asarray([[0, 9, 23], [6, 7, 20]], jnp.int32)
  got = gpt.hidden_mean_at(model, tokens, first, last, LAYER)  # [B, K, D]
  full = np.asarray(gpt.forward_hidden(model, tokens)[LAYER])  # [B, T, D]
  for b in range(2):
    for k in range(3):
      want = full[b, int(first[b]) : int(last[b, k]) + 1].mean(0)
      np.testing.assert_allclose(got[b, k], want, atol=1e-4, rtol=1e-4)


def test_a_long_prompt_is_read_from_its_last_tokens(runner):
  predictor = _predictor(runner)
  long = list(range(1, 101))
  np.testing.assert_allclose(predictor.predict_dist([long]), predictor.predict_dist([long[-64:]]), atol=1e-5)


def test_after_warmup_predicting_compiles_nothing(runner):
  predictor = _predictor(runner)
  assert predictor.warmup() == len(predictor.shapes) == 4
  before = xla_compilations()
  for n in (1, 3, 4, 9):
    predictor.predict_lengths(_prompts(n, seed=n))
  assert xla_compilations() == before
  assert predictor.num_compilations == 4


def test_save_load_and_swap(runner, tmp_path):
  predictor = _predictor(runner)
  prompts = _prompts(5)
  reserve, dist = predictor.predict_lengths(prompts)
  loaded = SelfLengthPredictor.load(predictor.save(tmp_path / "head"), runner)
  again = loaded.predict_lengths(prompts)
  np.testing.assert_array_equal(again[0], reserve)
  np.testing.assert_allclose(again[1], dist, atol=1e-6)
  assert loaded.config == predictor.config and loaded.buckets == predictor.buckets

  other = nnx.state(_head(runner.cfg.d_model, seed=1))
  loaded.warmup()
  compiles = loaded.num_compilations
  loaded.swap(SelfHeadVersion(state=other, calibration=loaded.live.calibration, number=1))
  assert not np.allclose(loaded.predict_dist(prompts), predictor.predict_dist(prompts))
  assert loaded.num_compilations == compiles  # same shapes: the same executables
  with pytest.raises(ValueError, match="same shapes"):
    loaded.swap(SelfHeadVersion(state=nnx.state(SelfHead(8, rngs=nnx.Rngs(0))), calibration=loaded.live.calibration))


def test_a_head_for_another_model_is_refused(runner):
  cfg = SelfHeadConfig(served_model="x", layer=LAYER, width=runner.cfg.d_model + 1)
  with pytest.raises(ValueError, match="train a head for it"):
    SelfLengthPredictor(
      runner, SelfHead(cfg.width, rngs=nnx.Rngs(0)), cfg, buckets=BUCKETS, calibration=_calibration("x")
    )


def test_the_engine_schedules_on_self_prediction_and_answers_do_not_change(runner):
  """s3 on the served model's own prediction (no prompt text given) produces the same greedy
  tokens as a policy with no predictor, a swap mid-run changes no token, and nothing compiles
  after warm-up."""
  prompts = _prompts(12, seed=3)
  lengths = [int(n) for n in np.random.default_rng(3).integers(1, 40, len(prompts))]

  def run(policy, predictor=None, swap_at=None):
    engine = Engine(runner, EngineConfig.create(memory_budget=1 << 20, policy=policy, page_size=16), predictor)
    engine.warmup()
    before = xla_compilations()
    requests = [
      EngineRequest(request_id=i, prompt_ids=ids, max_tokens=n, ignore_eos=True)
      for i, (ids, n) in enumerate(zip(prompts, lengths))
    ]
    for r in requests:
      engine.submit(r)
      if swap_at is not None and r.request_id == swap_at:
        engine.step()
        predictor.swap(
          SelfHeadVersion(state=nnx.state(_head(runner.cfg.d_model, 7)), calibration=predictor.live.calibration)
        )
    engine.run_until_done()
    assert xla_compilations() == before
    return requests

  plain = run("on-demand")
  predictor = _predictor(runner)
  served = run("s3", predictor, swap_at=5)
  assert [r.output_ids for r in served] == [r.output_ids for r in plain]
  assert all(r.predicted_output_len is not None and r.predicted_length is not None for r in served)
  expected, _ = _predictor(runner).predict_lengths(prompts[:6])  # predicted before the swap: the first head's
  np.testing.assert_array_equal([r.predicted_output_len for r in served[:6]], expected)


def test_training_recovers_a_length_the_hidden_state_carries():
  rng = np.random.default_rng(0)
  d, n = 16, 600
  w = rng.normal(0, 1, d) / np.sqrt(d)
  hidden = rng.normal(0, 1, (n, d)) * rng.uniform(0.1, 10, d) + rng.normal(0, 5, d)  # unstandardized
  log_len = 4.0 + (hidden - hidden.mean(0)) / hidden.std(0) @ w * 0.8 + rng.normal(0, 0.3, n)
  lengths = np.expm1(log_len).round()
  tr, ca, te = slice(0, 400), slice(400, 500), slice(500, 600)
  head, record = train_self_head(hidden[tr], lengths[tr], hidden[ca], lengths[ca])
  dist = np.asarray(jax.jit(lambda h: head(h))(jnp.asarray(hidden[te], jnp.float32)))
  assert kendall_tau(dist[:, 0], lengths[te]) > 0.6
  assert 0.2 < np.exp(np.median(dist[:, 1])) < 0.45  # the noise's scale, 0.3
  assert record["chosen_l2"] in (0.1, 1.0, 10.0, 100.0)


def _ranks_nothing(runner) -> SelfLengthPredictor:
  """A served head whose kernel is zero: every prompt gets the same length."""
  predictor = _predictor(runner)
  state = predictor.head_params()
  state["out"]["kernel"][...] = jnp.zeros_like(state["out"]["kernel"][...])
  state = jax.device_put(state, jax.devices()[0])  # committed to a device, as a head restored by Orbax is
  predictor.swap(SelfHeadVersion(state=state, calibration=predictor.live.calibration))
  return predictor


def _carried_lengths(predictor, prompts, seed=0) -> np.ndarray:
  """Lengths a direction of the hidden state carries: log(L + 1) = 3 + 0.6 z, z standardized."""
  hidden = predictor.hidden_states(prompts)
  z = hidden @ np.random.default_rng(seed).normal(0, 1, hidden.shape[1])
  return np.maximum(np.expm1(3 + 0.6 * (z - z.mean()) / z.std()).round(), 1).astype(int)


def test_online_retraining_refits_the_self_head_and_a_swap_compiles_nothing(runner):
  from s3jax.supervisor.log import LengthObservation
  from s3jax.supervisor.retrainer import OnlineRetrainer, RetrainConfig

  predictor = _ranks_nothing(runner)
  prompts = _prompts(256, seed=5)
  lengths = _carried_lengths(predictor, prompts)
  retrainer = OnlineRetrainer(predictor, RetrainConfig(epochs=30, learning_rate=3e-2, device_share=1.0))
  predictor.warmup()
  retrainer.warmup()
  reserved, _ = predictor.predict_lengths(prompts)
  for ids, n, r in zip(prompts, lengths, reserved):
    retrainer.observe(
      LengthObservation(
        prompt_ids=tuple(ids),
        prompt_text=None,  # token-id prompts: the self head reads the ids
        predicted_bucket=None,
        predicted_output_len=int(r),
        true_output_len=int(n),
        grows=0,
        preemptions=0,
        finish_reason="stop",
      )
    )
  compiles, executables = xla_compilations(), predictor.num_compilations
  decision = retrainer.run_once()
  assert decision["accepted"], decision
  assert decision["candidate"]["mean_reserved"] < decision["current"]["mean_reserved"]
  assert predictor.live.number == 1 and retrainer.stats().accepted == 1
  assert kendall_tau(predictor.predict_dist(prompts)[:, 0], lengths) > 0.5  # it ranked nothing before
  assert (xla_compilations(), predictor.num_compilations) == (compiles, executables)
  state = predictor.head_params()  # the standardization stays
  np.testing.assert_array_equal(state["spread"][...], _predictor(runner).head_params()["spread"][...])


def test_a_served_self_head_retrains_without_changing_an_answer(runner):
  from s3jax import LLM, SamplingParams
  from s3jax.supervisor.retrainer import RetrainConfig

  prompts = _prompts(24, seed=6)
  eos_at = [int(n) % 12 + 1 for n in _carried_lengths(_predictor(runner), prompts)]
  # It runs only when asked; small batches and a held-back half let 24 requests make a run.
  config = RetrainConfig(every=10_000, min_examples=10_000, batch_size=8, held_back=0.5, epochs=5, device_share=1.0)
  llm = LLM(
    "tiny-llama",
    runner=runner,
    predictor=_ranks_nothing(runner),
    online_retraining=config,
    memory_budget=1 << 20,
    page_size=16,
  )
  llm.warmup()
  sampling = SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0)  # greedy
  first = llm.generate(prompts, sampling, eos_at=eos_at)
  assert llm.retrainer.stats().observations == len(prompts)
  assert "version" in llm.retrainer.run_once()
  compiles = xla_compilations()
  again = llm.generate(prompts, sampling, eos_at=eos_at)
  assert llm.predictor.live.number == 1 and xla_compilations() == compiles
  assert [o.token_ids for o in again] == [o.token_ids for o in first]
