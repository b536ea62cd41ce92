"""Serving picks the predictor head and margin for the served model, and reports them live."""

import asyncio
import time

import httpx
import pytest
from test_server_harness import metric_value

from s3jax import LLM, SamplingParams
from s3jax.buckets import BucketScheme
from s3jax.predictor import ANY_GENERATOR, LengthPredictor
from s3jax.predictor.fixed import FixedBucketPredictor
from s3jax.serving.cli import parse_args
from s3jax.serving.server import build_app

BUDGET = 1 << 20
ENGINE = dict(min_cache_len=32, page_size=16)
PROMPTS = ["Write a haiku about rain.", "Explain how a bicycle gear works, step by step.", "Say hi."]


@pytest.fixture(scope="module")
def shipped():
  return LengthPredictor.load_default()


def test_an_unknown_model_gets_the_cold_start_head(tiny_runner, shipped):
  llm = LLM("tiny", runner=tiny_runner, predictor=shipped, memory_budget=BUDGET, **ENGINE)
  assert llm.predictor.generator == ANY_GENERATOR  # "tiny" answered nothing the predictor trained on
  assert llm.predictor.max_under_rate == shipped.max_under_rate
  assert shipped.generator == "llama-2-7b-chat-hf"  # the caller's predictor is not modified


def test_a_chosen_head_and_margin_set_every_reservation(tiny_runner, shipped):
  llm = LLM(
    "tiny",
    runner=tiny_runner,
    predictor=shipped,
    predictor_head="gpt4",
    max_under_rate=0.1,
    memory_budget=BUDGET,
    **ENGINE,
  )
  assert (llm.predictor.generator, llm.predictor.max_under_rate) == ("gpt4", 0.1)
  lengths = [3, 40, 7]
  outs = llm.generate(
    PROMPTS, [SamplingParams(max_tokens=None, ignore_eos=True)] * 3, true_output_lens=lengths, eos_at=lengths
  )
  expected = shipped.reserve_tokens(PROMPTS, generator="gpt4", max_under_rate=0.1)
  assert [o.stats.predicted_output_len for o in outs] == list(expected)
  assert [o.stats.predicted_bucket for o in outs] == list(shipped.buckets.bucket_of(expected))
  overflow_rate = sum(n > t for n, t in zip(lengths, expected)) / 3
  snap = llm.metrics()
  assert (snap.live_overflow_requests, snap.live_overflow_rate) == (3, pytest.approx(overflow_rate))

  text = _scrape(llm)
  assert 'predictor_head="gpt4"' in text and 'max_under_rate="0.1"' in text and 'reservation_rule="min_cost"' in text
  assert metric_value(text, "s3jax_predictor_overflow_window") == 3
  assert metric_value(text, "s3jax_predictor_overflow_rate") == pytest.approx(overflow_rate)


def _scrape(llm) -> str:
  async def get():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(llm)), base_url="http://s3jax") as c:
      return (await c.get("/metrics")).text

  return asyncio.run(get())


def test_the_cold_start_margin_learns_from_every_finished_request(tiny_runner, shipped):
  llm = LLM("tiny", runner=tiny_runner, predictor=shipped, memory_budget=BUDGET, **ENGINE)
  assert llm.adapter is not None and llm.adapter.predictor is llm.predictor
  before = llm.predictor.reserve_tokens(PROMPTS)
  params = SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0)
  first = llm.generate(PROMPTS, params, eos_at=[3, 5, 4])
  # Answers far shorter than the head guesses: observed, they narrow the margin of the next requests.
  observed = llm.predictor.live.calibration.observed[ANY_GENERATOR]
  assert llm.adapter.observations == 3 and sorted(observed[:, 2]) == sorted(len(o.token_ids) for o in first)
  after = llm.predictor.reserve_tokens(PROMPTS)
  assert all(after < before), (before, after)
  second = llm.generate(PROMPTS, params, eos_at=[3, 5, 4])
  assert [o.stats.predicted_output_len for o in second] == list(after)
  assert [o.token_ids for o in second] == [o.token_ids for o in first]  # the margin never changes an answer
  assert shipped.live.calibration.observed == {}  # the caller's predictor is not modified
  text = _scrape(llm)
  assert metric_value(text, "s3jax_predictor_cold_start_observations") == 6
  assert metric_value(text, "s3jax_predictor_cold_start_active") == 1
  # Served online, the adapter's thread feeds it; a head with its own lengths gets no adapter.
  llm.start()
  try:
    llm.generate(PROMPTS[:2], params, eos_at=[6, 6])
    deadline = time.monotonic() + 30
    while llm.adapter.observations < 8 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert llm.adapter.observations == 8
  finally:
    llm.shutdown()
  own = LLM("tiny", runner=tiny_runner, predictor=shipped, predictor_head="gpt4", memory_budget=BUDGET, **ENGINE)
  assert own.adapter is None


def test_online_retraining_is_wired_in(tiny_runner, shipped):
  llm = LLM("tiny", runner=tiny_runner, predictor=shipped, online_retraining=True, memory_budget=BUDGET, **ENGINE)
  assert llm.retrainer is not None and llm.retrainer.predictor is llm.predictor
  llm.generate(PROMPTS[:2], SamplingParams(max_tokens=None, ignore_eos=True), eos_at=[3, 5])
  assert llm.retrainer.stats().observations == 2  # the engine hands every finished request over
  text = _scrape(llm)
  assert 'online_retraining="true"' in text
  assert metric_value(text, "s3jax_predictor_version") == 0
  assert metric_value(text, "s3jax_predictor_seconds_since_swap") == -1
  args = parse_args(["--online-retraining", "--retrain-every", "50", "--retrain-dir", "/tmp/versions"])
  assert (args.online_retraining, args.retrain_every, args.retrain_dir) == (True, 50, "/tmp/versions")
  with pytest.raises(SystemExit):
    parse_args(["--predictor", "none", "--policy", "max", "--online-retraining"])


def test_bad_head_choices_are_clear_errors(tiny_runner, shipped):
  with pytest.raises(ValueError, match="no head 'my-model'.*gpt4"):
    LLM("tiny", runner=tiny_runner, predictor=shipped, predictor_head="my-model", memory_budget=BUDGET, **ENGINE)
  with pytest.raises(ValueError, match="need a LengthPredictor"):
    LLM(
      "tiny",
      runner=tiny_runner,
      predictor=FixedBucketPredictor(BucketScheme.equal_width(4, 100)),
      max_under_rate=0.1,
      memory_budget=BUDGET,
      **ENGINE,
    )
  with pytest.raises(SystemExit):
    parse_args(["--max-under-rate", "1.5"])
  with pytest.raises(SystemExit):
    parse_args(["--predictor", "none", "--policy", "max", "--predictor-head", "gpt4"])
  args = parse_args(["--predictor-head", "gpt4", "--max-under-rate", "0.1"])
  assert (args.predictor_head, args.max_under_rate) == ("gpt4", 0.1)


def test_the_default_predictor_of_smollm2_is_its_own_head():
  from s3jax.predictor.predictor import DEFAULT_CHECKPOINT, shipped_checkpoint_for
  from s3jax.serving.loading import load_predictor

  served = "SmolLM2-135M-Instruct"  # the embedded default's name, as GGUF metadata gives it
  assert shipped_checkpoint_for(served).name == served
  assert load_predictor("default", served, None, None).generator == served
  assert shipped_checkpoint_for("llama-2-7b-chat-hf") == DEFAULT_CHECKPOINT
  assert shipped_checkpoint_for("my-model") == DEFAULT_CHECKPOINT  # no head anywhere: the 15-LLM <any>
  assert load_predictor("default", "my-model", None, None).generator == ANY_GENERATOR
