"""Per-slot sampling: reproducible per-request seeds, and the greedy limits of top-k/top-p."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from s3jax.models.runner import ModelRunner
from s3jax.models.sampling import SlotSampling, sample

_sample = jax.jit(sample)
B, V = 8, 384


def _logits(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(scale=2.0, size=(B, V)).astype(np.float32)


def _settings(temperature=1.0, top_k=0, top_p=1.0, seed=None, step=0) -> SlotSampling:
  seed = np.arange(B) if seed is None else seed
  return SlotSampling.from_host(np.full(B, temperature), np.full(B, top_k), np.full(B, top_p),
                                np.broadcast_to(seed, (B,)), np.full(B, step))


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
  draws_k = np.stack([np.asarray(_sample(logits, _settings(top_k=3, seed=np.arange(B) + 8 * i)))
                      for i in range(20)])
  for b in range(B):
    assert set(draws_k[:, b]) <= set(order[b, :3])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  draws_p = np.stack([np.asarray(_sample(logits, _settings(top_p=0.5, seed=np.arange(B) + 8 * i)))
                      for i in range(20)])
  for b in range(B):
    sorted_p = probs[b, order[b]]
    nucleus = order[b, :int(np.searchsorted(np.cumsum(sorted_p), 0.5)) + 1]
    assert set(draws_p[:, b]) <= set(nucleus)


def _generate(runner, prompt, settings: dict, slot: int, slots: int, others: dict, steps: int = 12):
  """Tokens of one request decoded in ``slot`` of an arena whose other slots run ``others``."""
  cache_len = 48
  cols = {k: np.array([others[k]] * slots) for k in ("temperature", "top_k", "top_p", "seed")}
  for k in cols:
    cols[k][slot] = settings[k]
  step = np.zeros(slots, np.int32)
  first_s = SlotSampling.from_host(*(cols[k][[slot]] for k in ("temperature", "top_k", "top_p", "seed")),
                                   step[[slot]])
  first, keys, values = runner.prefill([prompt], first_s, cache_len)
  cache = runner.insert(runner.init_cache(slots, cache_len), keys, values, np.array([slot]))
  tokens = np.zeros(slots, np.int32)
  positions = np.full(slots, 3, np.int32)  # other slots decode junk at their own positions
  tokens[slot], positions[slot] = int(np.asarray(first)[0]), len(prompt)
  out = [int(tokens[slot])]
  for i in range(1, steps):
    step[:] = i
    s = SlotSampling.from_host(cols["temperature"], cols["top_k"], cols["top_p"], cols["seed"], step)
    nxt, cache = runner.decode(cache, tokens, positions, s)
    tokens, positions = np.asarray(nxt), positions + 1
    out.append(int(tokens[slot]))
  return out


def test_request_seed_is_reproducible_and_independent_of_slot(gpt2_checkpoint):
  runner = ModelRunner.load(gpt2_checkpoint.path)
  prompt = np.array([5, 17, 42, 9], np.int32)
  req = dict(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
  greedy_others = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0)
  sampling_others = dict(temperature=0.8, top_k=40, top_p=0.9, seed=99)
  a = _generate(runner, prompt, req, slot=0, slots=4, others=greedy_others)
  b = _generate(runner, prompt, req, slot=3, slots=4, others=sampling_others)
  c = _generate(runner, prompt, req, slot=1, slots=2, others=sampling_others)
  assert a == b == c
  d = _generate(runner, prompt, dict(req, seed=4321), slot=0, slots=4, others=greedy_others)
  assert d != a
  greedy = _generate(runner, prompt, dict(req, temperature=0.0), slot=2, slots=4, others=sampling_others)
  top1 = _generate(runner, prompt, dict(req, top_k=1), slot=1, slots=4, others=sampling_others)
  assert top1 == greedy
