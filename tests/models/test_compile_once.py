"""Steady-state serving compiles nothing: one decode executable for 200 changing steps."""

from __future__ import annotations

import numpy as np

from s3jax.models.runner import ModelRunner, xla_compilations
from s3jax.models.sampling import SlotSampling


def test_decode_compiles_once_while_slots_change(gpt2_checkpoint):
  runner = ModelRunner.load(gpt2_checkpoint.path)
  slots, cache_len, vocab = 4, 64, runner.cfg.vocab_size
  rng = np.random.default_rng(0)

  # Per-slot request state, all on the host.
  temperature = np.zeros(slots, np.float32)
  top_k = np.zeros(slots, np.int32)
  top_p = np.ones(slots, np.float32)
  seed = np.zeros(slots, np.uint32)
  step = np.zeros(slots, np.int32)
  tokens = np.zeros(slots, np.int32)
  positions = np.zeros(slots, np.int32)
  cache = runner.init_cache(slots, cache_len)

  def admit(cache, slot: int, i: int):
    """Prefills a fresh prompt with new sampling settings into ``slot``."""
    prompt = rng.integers(0, vocab, 1 + i % 15).astype(np.int32)  # 1..15 tokens: one padded length
    temperature[slot] = (0.0, 0.7, 1.0, 1.3)[i % 4]
    top_k[slot] = (0, 1, 20, 0)[i % 4]
    top_p[slot] = (1.0, 0.9, 0.5, 0.95)[i % 4]
    seed[slot], step[slot] = 1000 + i, 0
    s = SlotSampling.from_host(temperature[[slot]], top_k[[slot]], top_p[[slot]], seed[[slot]], step[[slot]])
    first, k, v = runner.prefill([prompt], s, cache_len)
    cache = runner.insert(cache, k, v, np.array([slot], np.int32))
    tokens[slot], positions[slot], step[slot] = int(np.asarray(first)[0]), len(prompt), 1
    return cache

  def decode(cache):
    s = SlotSampling.from_host(temperature, top_k, top_p, seed, step)
    nxt, cache = runner.decode(cache, tokens, positions, s)
    tokens[:] = np.asarray(nxt)
    positions[:] += 1
    step[:] += 1
    return cache

  for slot in range(slots):  # warm-up: every executable of the loop compiles here
    cache = admit(cache, slot, slot)
  cache = decode(cache)
  compiled, xla = runner.compilations, xla_compilations()
  assert compiled == 3  # prefill (P=1, T=16), insert, decode

  admitted = slots
  for i in range(200):
    if i % 10 == 0 or positions.max() >= cache_len - 1:  # new requests land in changing slots
      slot = int(np.argmax(positions)) if positions.max() >= cache_len - 1 else i // 10 % slots
      cache = admit(cache, slot, admitted)
      admitted += 1
    cache = decode(cache)
    assert positions.max() < cache_len

  assert runner.compilations == compiled
  assert xla_compilations() == xla
  assert sum(key[0] == "decode" for key in runner._executables) == 1
  assert admitted > 20
