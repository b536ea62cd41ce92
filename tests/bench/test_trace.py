"""Trace loading: deterministic sampling, clipping, and the real alpaca_eval files."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from s3jax.assets import REPO_ROOT
from s3jax.bench.trace import load_trace, read_records

# The full AlpacaEval answers the shipped lengths were counted from (15 MB, not in the repository),
# where the development machine keeps them beside the checkout.
FULL_ANSWERS_DIR = REPO_ROOT.parent / "shared" / "data" / "alpaca_eval"


def _words(texts):
  # A stand-in tokenizer: one token per whitespace-separated word (fast, hand-checkable).
  return [len(t.split()) for t in texts]


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  records = [
    {"id": i, "instruction": "w " * (i % 5 + 1), "output": "x " * (10 * i), "generator": "toy"} for i in range(20)
  ]
  # Written out of id order: sampling must not depend on file order.
  with (tmp_path / "toy.jsonl").open("w") as f:
    for r in reversed(records):
      f.write(json.dumps(r) + "\n")
  return tmp_path


def test_sampling_is_deterministic_and_prefix_stable(data_dir):
  a = load_trace("toy", num_requests=8, seed=3, data_dir=data_dir, count_tokens=_words)
  b = load_trace("toy", num_requests=8, seed=3, data_dir=data_dir, count_tokens=_words)
  small = load_trace("toy", num_requests=4, seed=3, data_dir=data_dir, count_tokens=_words)
  other = load_trace("toy", num_requests=8, seed=4, data_dir=data_dir, count_tokens=_words)
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(small.ids, a.ids[:4])
  assert len(set(a.ids.tolist())) == 8
  assert a.ids.tolist() != other.ids.tolist()


def test_lengths_are_counted_and_clipped(data_dir):
  t = load_trace("toy", num_requests=20, seed=0, max_len=100, data_dir=data_dir, count_tokens=_words)
  for i, p, raw, out in zip(t.ids, t.prompt_lens, t.raw_output_lens, t.output_lens):
    assert p == i % 5 + 1 and raw == 10 * i
    # Empty answers still cost one token; long ones are cut so prompt + answer <= max_len.
    assert out == max(1, min(raw, 100 - p))
  assert t.num_clipped == sum(10 * i > 100 - (i % 5 + 1) for i in range(20))
  capped = load_trace(
    "toy", num_requests=20, seed=0, max_len=100, max_output=30, data_dir=data_dir, count_tokens=_words
  )
  assert capped.output_lens.max() == 30
  np.testing.assert_array_equal(capped.output_lens, np.minimum(t.output_lens, 30))


def test_ids_restrict_and_errors(data_dir):
  t = load_trace("toy", ids=[2, 5, 7], data_dir=data_dir, count_tokens=_words)
  assert sorted(t.ids.tolist()) == [2, 5, 7]
  with pytest.raises(ValueError, match="asked for 21"):
    load_trace("toy", num_requests=21, data_dir=data_dir, count_tokens=_words)
  with pytest.raises(FileNotFoundError, match="toy"):
    load_trace("nope", data_dir=data_dir, count_tokens=_words)
  with pytest.raises(ValueError, match="no room"):
    load_trace("toy", max_len=3, data_dir=data_dir, count_tokens=_words)


def test_shipped_lengths():
  records = read_records("llama-2-7b-chat-hf")
  assert len(records) == 678
  assert [r["id"] for r in records] == sorted(r["id"] for r in records)
  t = load_trace("llama-2-7b-chat-hf", num_requests=5, seed=0)
  assert len(t) == 5 and (t.output_lens >= 1).all() and (t.prompt_lens >= 1).all()
  with pytest.raises(ValueError, match="GPT-2 token counts"):
    load_trace("llama-2-7b-chat-hf", num_requests=5, count_tokens=_words)
  with pytest.raises(FileNotFoundError, match="text_davinci_003"):
    load_trace("no-such-generator")


@pytest.mark.skipif(
  not (FULL_ANSWERS_DIR / "llama-2-7b-chat-hf.jsonl").is_file(), reason="the full answers are not on this machine"
)
def test_shipped_lengths_equal_counting_the_full_answers():
  """The benchmark's trace is the same whether it is read from the shipped counts or counted."""
  shipped = load_trace("llama-2-7b-chat-hf", num_requests=32, seed=0)
  counted = load_trace("llama-2-7b-chat-hf", num_requests=32, seed=0, data_dir=FULL_ANSWERS_DIR)
  assert shipped.prompts == counted.prompts
  np.testing.assert_array_equal(shipped.prompt_lens, counted.prompt_lens)
  np.testing.assert_array_equal(shipped.raw_output_lens, counted.raw_output_lens)


def test_static_batches_fit_the_budget_in_arrival_order():
  from s3jax.bench.peers import static_batches

  prompts, outputs = [3, 5, 2, 8], [10, 4, 30, 2]
  batches = static_batches(prompts, outputs, budget_tokens=60)
  assert batches == [[0, 1], [2], [3]]  # [2] joining [0, 1] would need 3 x (5 + 30) = 105 tokens
  for batch in batches:
    assert len(batch) * (max(prompts[i] for i in batch) + max(outputs[i] for i in batch)) <= 60
  with pytest.raises(ValueError, match="alone exceeds"):
    static_batches([50], [20], budget_tokens=60)
