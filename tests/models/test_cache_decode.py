"""Packed prefill and paged decoding equal a full forward pass without a cache."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from s3jax.models import gpt, kv_cache
from s3jax.models.checkpoint import load_hf_checkpoint

PAGE = 8


def test_packed_prefill_equals_each_prompt_alone(checkpoint):
  cfg, graphdef, params = load_hf_checkpoint(checkpoint.path)
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (7, 1, 12)]
  t = 32  # 20 prompt tokens, then padding
  tokens, segments, positions = np.zeros(t, np.int32), np.full(t, 3, np.int32), np.zeros(t, np.int32)
  last, start = [], 0
  for i, p in enumerate(prompts):
    tokens[start : start + len(p)], segments[start : start + len(p)] = p, i
    positions[start : start + len(p)] = np.arange(len(p))
    start += len(p)
    last.append(start - 1)
  logits, keys, _ = gpt.prefill_packed(model, tokens, segments, positions, np.asarray(last, np.int32))
  assert keys[0].shape == (t, cfg.n_heads, cfg.head_dim)
  for i, p in enumerate(prompts):
    ref = np.asarray(gpt.forward_full(model, p[None]))[0, -1]
    np.testing.assert_allclose(np.asarray(logits[i]), ref, atol=1e-4, rtol=0)


def test_paged_decode_equals_full_forward(checkpoint):
  """One sequence decodes in row 1 with its pages out of order, beside rows of junk."""
  cfg, graphdef, params = load_hf_checkpoint(checkpoint.path)
  rows, num_pages, steps = 3, 12, 20
  rng = np.random.default_rng(1)
  junk = lambda: tuple(
    jax.numpy.asarray(rng.normal(size=kv_cache.layer_shape(cfg, num_pages, PAGE)), np.float32)
    for _ in range(cfg.n_layers)
  )
  pool = kv_cache.PagePool(keys=junk(), values=junk())
  pages = [9, 2, 5, 0]  # logical page i of row 1 is pages[i]; the pages between belong to others
  table = np.full((rows, 4), num_pages, np.int32)
  table[0, :2], table[2, :1] = (3, 4), (7,)  # other rows own other pages, full of junk

  @jax.jit
  def prefill(params, tokens):
    t = tokens.shape[0]
    return gpt.prefill_packed(
      nnx.merge(graphdef, params),
      tokens,
      np.zeros(t, np.int32),
      np.arange(t, dtype=np.int32),
      np.array([t - 1], np.int32),
    )

  @jax.jit
  def decode(params, pool, tokens, positions, table, num_chunks):  # chunks of 5 pages: 0-4, 5-9, 7-11
    return gpt.decode_paged(nnx.merge(graphdef, params), pool, tokens, positions, table, num_chunks, 5)

  full = jax.jit(lambda params, tokens: gpt.forward_full(nnx.merge(graphdef, params), tokens))

  prompt = rng.integers(0, cfg.vocab_size, 11).astype(np.int32)  # pages 0 and 1, the second half full
  last, keys, values = prefill(params, prompt)
  n = len(prompt)
  at = (np.asarray(pages)[np.arange(n) // PAGE], np.arange(n) % PAGE)
  pool = kv_cache.PagePool(
    keys=tuple(kv_cache.write(a, k, *at) for a, k in zip(pool.keys, keys)),
    values=tuple(kv_cache.write(a, v, *at) for a, v in zip(pool.values, values)),
  )
  seq, logits = list(prompt), np.asarray(last[0])
  for step in range(steps):
    padded = np.zeros((1, 32), np.int32)  # one shape for every step; causal attention ignores the pad
    padded[0, : len(seq)] = seq
    ref = np.asarray(full(params, padded))[0, len(seq) - 1]
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0, err_msg=f"step {step}")
    token = int(np.argmax(ref))
    seq.append(token)
    position = len(seq) - 1
    table[1, : position // PAGE + 1] = pages[: position // PAGE + 1]  # grant pages as the sequence grows
    tokens = np.array([5, token, 6], np.int32)
    positions = np.array([12, position, 3], np.int32)  # the other rows write into their own pages
    # Two chunks reach page 9, the highest in use; a third one overlaps the second: same answer.
    whole, _ = decode(params, pool, tokens, positions, table, np.int32(3))
    out, pool = decode(params, pool, tokens, positions, table, np.int32(2))
    logits = np.asarray(out[1])
    np.testing.assert_array_equal(np.asarray(whole[1]), logits)
