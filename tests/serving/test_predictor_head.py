"""Serving picks the predictor head and margin for the served model, and reports them live."""

import pytest

from s3jax import LLM, SamplingParams
from s3jax.buckets import BucketScheme
from s3jax.predictor import ANY_GENERATOR, LengthPredictor
from s3jax.predictor.fixed import FixedBucketPredictor
from s3jax.serving.cli import parse_args

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
  llm = LLM("tiny", runner=tiny_runner, predictor=shipped, predictor_head="gpt4", max_under_rate=0.1,
            memory_budget=BUDGET, **ENGINE)
  assert (llm.predictor.generator, llm.predictor.max_under_rate) == ("gpt4", 0.1)
  lengths = [3, 40, 7]
  outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=None, ignore_eos=True)] * 3, true_output_lens=lengths,
                      eos_at=lengths)
  expected = shipped.reserve_tokens(PROMPTS, generator="gpt4", max_under_rate=0.1)
  assert [o.stats.predicted_output_len for o in outs] == list(expected)
  assert [o.stats.predicted_bucket for o in outs] == list(shipped.buckets.bucket_of(expected))
  snap = llm.engine.snapshot()
  assert snap.live_overflow_requests == 3
  assert snap.live_overflow_rate == pytest.approx(sum(n > t for n, t in zip(lengths, expected)) / 3)


def test_bad_head_choices_are_clear_errors(tiny_runner, shipped):
  with pytest.raises(ValueError, match="no head 'my-model'.*gpt4"):
    LLM("tiny", runner=tiny_runner, predictor=shipped, predictor_head="my-model", memory_budget=BUDGET, **ENGINE)
  with pytest.raises(ValueError, match="need a LengthPredictor"):
    LLM("tiny", runner=tiny_runner, predictor=FixedBucketPredictor(BucketScheme.equal_width(4, 100)),
        max_under_rate=0.1, memory_budget=BUDGET, **ENGINE)
  with pytest.raises(SystemExit):
    parse_args(["--max-under-rate", "1.5"])
  with pytest.raises(SystemExit):
    parse_args(["--predictor", "none", "--policy", "max", "--predictor-head", "gpt4"])
  args = parse_args(["--predictor-head", "gpt4", "--max-under-rate", "0.1"])
  assert (args.predictor_head, args.max_under_rate) == ("gpt4", 0.1)
