"""Prompt log-probabilities from the prefill equal the transformers reference's log-softmax."""

from __future__ import annotations

import numpy as np
import pytest

from s3jax.executor.runner import ModelRunner
from s3jax.executor.sampling import MAX_PROMPT_LOGPROBS
from s3jax.executor.step_state import Admission, PrefillPack, StepShapes


def _reference_logprobs(hf, prompt: list[int]) -> np.ndarray:
  """[n, V] log p(. | prompt[:i + 1]) from the PyTorch model."""
  import torch

  with torch.no_grad():
    logits = hf(torch.tensor([prompt])).logits[0].float()
  return torch.log_softmax(logits, -1).numpy()


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_prefill_scores_every_prompt_token_like_the_reference(build_checkpoint, family):
  """Two prompts packed into one prefill, one asking: at each position the log-probability of the
  prompt's next token given the tokens up to it in its own prompt, and the top alternatives, as
  the reference computes them. A pack where nobody asks returns zeros and the same first tokens."""
  ckpt = build_checkpoint(family)
  runner = ModelRunner.load(ckpt.path)
  shapes = StepShapes.create(
    max_seq_len=runner.cfg.max_seq_len, num_pages=16, page_size=8, batch_sizes=(2,), max_admissions=2
  )
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, runner.cfg.vocab_size, n).tolist() for n in (9, 21)]  # 30 tokens: chunks overlap
  admissions = [
    Admission(tokens=p, pages=list(range(4 * i, 4 * i + 3)), row=i, score_prompt=i == 1) for i, p in enumerate(prompts)
  ]
  state, scores = runner.prefill_scored(shapes, runner.init_state(shapes), PrefillPack.from_host(shapes, admissions))
  logprobs, top_ids, top_logprobs = (np.asarray(a) for a in (scores.logprobs, scores.top_ids, scores.top_logprobs))
  start = 0
  for prompt in prompts:
    ref = _reference_logprobs(ckpt.hf, prompt)
    n = len(prompt)
    scored = slice(start, start + n - 1)  # position i scores token i + 1; the last one's is the answer's
    np.testing.assert_allclose(logprobs[scored], ref[np.arange(n - 1), prompt[1:]], atol=2e-4)
    best = np.argsort(-ref[:-1], axis=-1)[:, :MAX_PROMPT_LOGPROBS]
    np.testing.assert_array_equal(top_ids[scored], best)
    np.testing.assert_allclose(top_logprobs[scored], np.take_along_axis(ref[:-1], best, -1), atol=2e-4)
    start += n

  quiet = [Admission(tokens=a.tokens, pages=a.pages, row=a.row) for a in admissions]
  plain, none = runner.prefill_scored(shapes, runner.init_state(shapes), PrefillPack.from_host(shapes, quiet))
  assert not np.asarray(none.logprobs).any() and not np.asarray(none.top_ids).any()
  np.testing.assert_array_equal(np.asarray(plain.staged.tokens), np.asarray(state.staged.tokens))
  assert runner.compilations == 1  # one executable for both
