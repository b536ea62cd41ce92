"""Per-slot sampling: reproducible per-request seeds, and the greedy limits of top-k/top-p."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from s3jax.engine import Engine, EngineConfig, EngineRequest
from s3jax.executor.runner import ModelRunner
from s3jax.executor.sampling import SlotSampling, sample

_sample = jax.jit(sample)
B, V = 8, 384


def _logits(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(scale=2.0, size=(B, V)).astype(np.float32)


def _settings(temperature=1.0, top_k=0, top_p=1.0, seed=None, step=0) -> SlotSampling:
  seed = np.arange(B) if seed is None else seed
  return SlotSampling.from_host(
    np.full(B, temperature), np.full(B, top_k), np.full(B, top_p), np.broadcast_to(seed, (B,)), np.full(B, step)
  )


def test_greedy_is_argmax():
  logits = _logits()
  np.testing.assert_array_equal(np.asarray(_sample(logits, SlotSampling.greedy(B))), logits.argmax(-1))


@pytest.mark.parametrize("knob", [dict(top_k=1), dict(top_p=1e-6)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_and_tiny_top_p_are_greedy(knob, temperature):
  logits = _logits(1)
  for step in range(5):
    got = np.asarray(_sample(logits, _settings(temperature=temperature, step=step, **knob)))
    np.testing.assert_array_equal(got, logits.argmax(-1))


def test_same_seed_same_tokens_different_seeds_differ():
  logits = np.broadcast_to(_logits(2)[:1], (B, V))  # every row the same distribution
  same = np.asarray(_sample(logits, _settings(seed=np.full(B, 7))))
  assert (same == same[0]).all()  # the seed, not the row, decides
  np.testing.assert_array_equal(same, np.asarray(_sample(logits, _settings(seed=np.full(B, 7)))))
  varied = [np.asarray(_sample(logits, _settings(seed=np.arange(B) + 100 * i))) for i in range(4)]
  assert len(set(np.concatenate(varied).tolist())) > 3  # different seeds explore different tokens
  # the step index advances the stream: same seed, later token, different draw (over several steps)
  steps = [int(np.asarray(_sample(logits, _settings(seed=np.full(B, 7), step=s)))[0]) for s in range(8)]
  assert len(set(steps)) > 1


def test_top_k_and_top_p_restrict_the_support():
  logits = _logits(3)
  order = np.argsort(-logits, axis=-1)
  draws_k = np.stack([np.asarray(_sample(logits, _settings(top_k=3, seed=np.arange(B) + 8 * i))) for i in range(20)])
  for b in range(B):
    assert set(draws_k[:, b]) <= set(order[b, :3])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  draws_p = np.stack([np.asarray(_sample(logits, _settings(top_p=0.5, seed=np.arange(B) + 8 * i))) for i in range(20)])
  for b in range(B):
    sorted_p = probs[b, order[b]]
    nucleus = order[b, : int(np.searchsorted(np.cumsum(sorted_p), 0.5)) + 1]
    assert set(draws_p[:, b]) <= set(nucleus)


def test_top_k_top_p_mask_equals_a_sorted_reference():
  """The radix search keeps exactly the tokens a sort of the vocabulary would keep."""
  from s3jax.executor.sampling import _top_k_top_p

  logits = _logits(4)
  logits[:, :8] = logits[:, [0]]  # ties at the top
  mask = jax.jit(_top_k_top_p)
  for top_k, top_p in ((0, 0.5), (7, 1.0), (40, 0.9), (1, 0.3), (0, 1.0), (3, 1e-6), (500, 0.99)):
    kept = np.isfinite(np.asarray(mask(logits, _settings(top_k=top_k, top_p=top_p))))
    for b in range(B):
      order = np.argsort(-logits[b], kind="stable")
      k = top_k if top_k > 0 else V
      p = np.exp(logits[b, order[:k]] - logits[b, order[0]])
      p /= p.sum()
      keep = order[:k][(np.cumsum(p) - p < top_p) | (np.arange(min(k, V)) == 0) | (top_p >= 1)]
      threshold = logits[b, keep].min()
      np.testing.assert_array_equal(kept[b], logits[b] >= threshold, err_msg=f"top_k={top_k} top_p={top_p}")


def _generate(runner, prompt, settings: dict, others: list[dict], steps: int = 12) -> list[int]:
  """Tokens of one request decoded together with ``others`` (submitted first: other rows, batch)."""
  engine = Engine(
    runner,
    EngineConfig.create(
      policy="max", memory_budget=8 * 128 * runner.kv_bytes_per_token(), min_cache_len=16, page_size=16
    ),
  )
  for i, other in enumerate(others):
    engine.submit(EngineRequest(request_id=100 + i, prompt_ids=[3, 1 + i], max_tokens=steps, ignore_eos=True, **other))
  request = EngineRequest(request_id=0, prompt_ids=prompt.tolist(), max_tokens=steps, ignore_eos=True, **settings)
  engine.submit(request)
  engine.run_until_done()
  return request.output_ids


def test_request_seed_is_reproducible_and_independent_of_slot(gpt2_checkpoint):
  runner = ModelRunner.load(gpt2_checkpoint.path)
  prompt = np.array([5, 17, 42, 9], np.int32)
  req = dict(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
  greedy = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0)
  sampling = dict(temperature=0.8, top_k=40, top_p=0.9, seed=99)
  a = _generate(runner, prompt, req, others=[])
  b = _generate(runner, prompt, req, others=[sampling] * 3)
  c = _generate(runner, prompt, req, others=[greedy, sampling] * 3)
  assert a == b == c
  d = _generate(runner, prompt, dict(req, seed=4321), others=[greedy])
  assert d != a
  as_greedy = _generate(runner, prompt, dict(req, temperature=0.0), others=[sampling] * 2)
  top1 = _generate(runner, prompt, dict(req, top_k=1), others=[sampling])
  assert top1 == as_greedy
