"""Decoding against the static KV cache equals a full forward pass without one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.models import gpt, kv_cache
from s3jax.models.checkpoint import load_hf_checkpoint


def test_cached_decode_equals_full_forward(checkpoint):
  cfg, graphdef, params = load_hf_checkpoint(checkpoint.path)
  slots, cache_len, steps, slot = 3, 48, 16, 1

  @jax.jit
  def prefill(params, tokens, lengths):
    return gpt.prefill(nnx.merge(graphdef, params), tokens, lengths)

  @jax.jit
  def decode(params, keys, values, tokens, positions):
    return gpt.decode(nnx.merge(graphdef, params), keys, values, tokens, positions)

  @jax.jit
  def full(params, tokens):
    return gpt.forward_full(nnx.merge(graphdef, params), tokens)

  rng = np.random.default_rng(0)
  # Slot 0 and 2 hold another sequence's junk; slot 1's answer must not see it.
  junk = lambda: tuple(jnp.asarray(rng.normal(size=kv_cache.layer_shape(cfg, slots, cache_len)), jnp.float32)
                       for _ in range(cfg.n_layers))
  cache = kv_cache.KVCache(keys=junk(), values=junk())
  prompt = rng.integers(0, cfg.vocab_size, 7).astype(np.int32)
  padded = np.zeros((1, 16), np.int32)
  padded[0, :len(prompt)] = prompt
  last, keys, values = prefill(params, padded, np.array([len(prompt)], np.int32))
  cache = kv_cache.insert(cache, keys, values, np.array([slot], np.int32))

  seq = list(prompt)
  logits = np.asarray(last[0])
  for step in range(steps):
    # Right-padding to one length keeps a single compile; causal attention ignores the pad.
    padded_seq = np.zeros((1, 32), np.int32)
    padded_seq[0, :len(seq)] = seq
    ref = np.asarray(full(params, padded_seq))[0, len(seq) - 1]
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0, err_msg=f"step {step}")
    token = int(np.argmax(ref))
    assert int(np.argmax(logits)) == token, f"step {step}"
    seq.append(token)
    tokens = np.zeros(slots, np.int32)
    positions = np.array([3, 0, 5], np.int32)  # other slots advance at their own positions
    tokens[slot], positions[slot] = token, len(seq) - 1
    out, k, v = decode(params, cache.keys, cache.values, tokens, positions)
    cache = kv_cache.KVCache(keys=k, values=v)
    logits = np.asarray(out[slot])
