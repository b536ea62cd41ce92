"""A prompt prefilled in chunks, each attending to the earlier chunks' KV in the pool, decodes exactly
as when it is prefilled at once; packed beside other prompts, it changes none of theirs."""

from __future__ import annotations

import numpy as np
import pytest

from s3jax.executor.runner import ModelRunner
from s3jax.executor.step_state import Admission, PrefillPack, StepShapes, StepUpdates

DECODE_STEPS = 6


def _decode(runner, shapes, state, admissions):
  """Admits ``admissions`` and decodes greedily; the logits [steps, B, V] of every step."""
  updates = StepUpdates.from_host(shapes, admissions=admissions)
  out = []
  for _ in range(DECODE_STEPS):
    state, _, logits = runner.generate_with_logits(shapes, state, updates, shapes.max_slots, shapes.num_pages)
    out.append(np.asarray(logits))
    updates = StepUpdates.from_host(shapes)
  return np.stack(out)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_chunks_attend_to_earlier_chunks_like_one_prefill(build_checkpoint, family):
  runner = ModelRunner.load(build_checkpoint(family).path)
  shapes = StepShapes.create(
    max_seq_len=runner.cfg.max_seq_len, num_pages=24, page_size=4, batch_sizes=(2,), max_admissions=2, scan_chunk=2
  )
  rng = np.random.default_rng(7)
  long = rng.integers(0, runner.cfg.vocab_size, 45).tolist()  # 12 pages of 4: 6 context chunks of 2 pages
  other = rng.integers(0, runner.cfg.vocab_size, 11).tolist()
  long_pages, other_pages = list(range(12)), list(range(12, 15))
  whole = [Admission(tokens=long, pages=long_pages, row=0), Admission(tokens=other, pages=other_pages, row=1)]
  state = runner.prefill(shapes, runner.init_state(shapes), PrefillPack.from_host(shapes, whole))
  expected = _decode(runner, shapes, state, whole)

  state = runner.init_state(shapes)
  no_row = shapes.max_slots
  for start, end in ((0, 5), (5, 21), (21, 30)):  # ends inside pages, and on a page boundary
    chunk = Admission(tokens=long, pages=long_pages, row=no_row, start=start, end=end)
    state = runner.prefill(shapes, state, PrefillPack.from_host(shapes, [chunk]))
  last = Admission(tokens=long, pages=long_pages, row=0, start=30)
  # The last chunk shares its pack with a fresh prompt, which must not see the long prompt's context.
  state = runner.prefill(shapes, state, PrefillPack.from_host(shapes, [whole[1], last]))
  chunked = _decode(runner, shapes, state, [last, whole[1]])
  np.testing.assert_allclose(chunked, expected, atol=2e-4, rtol=1e-4)
  assert (chunked.argmax(-1) == expected.argmax(-1)).all()
