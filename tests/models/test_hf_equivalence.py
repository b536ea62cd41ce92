"""The Flax decoder equals transformers' PyTorch models: logits and greedy generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from s3jax.models import gpt
from s3jax.models.checkpoint import load_hf_checkpoint
from s3jax.models.runner import ModelRunner
from s3jax.models.sampling import SlotSampling

PROMPT_LENS = (12, 5, 9, 1)
VOCAB = 384  # tests/models/conftest.py


def _prompts(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB - 1, n).astype(np.int32) for n in PROMPT_LENS]


def _hf_logits(hf, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()


def test_padded_logits_match_hf(checkpoint):
  cfg, graphdef, params = load_hf_checkpoint(checkpoint.path)
  model = nnx.merge(graphdef, params)
  prompts = _prompts()
  t = 16
  tokens = np.zeros((len(prompts), t), np.int32)  # right-padded with token 0
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)

  full = np.asarray(gpt.forward_full(model, jnp.asarray(tokens)))
  last, keys, _ = gpt.prefill(model, jnp.asarray(tokens), jnp.asarray(lengths))
  assert len(keys) == cfg.n_layers and keys[0].shape == (len(prompts), cfg.n_heads, t, cfg.head_dim)
  for i, p in enumerate(prompts):
    ref = _hf_logits(checkpoint.hf, p)  # HF on the unpadded prompt
    np.testing.assert_allclose(full[i, :len(p)], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(last[i]), ref[-1], atol=1e-4, rtol=0)


def test_padded_logits_match_hf_attention_mask(checkpoint):
  """Same batch through HF in one call with a right-padding attention mask."""
  model = nnx.merge(*load_hf_checkpoint(checkpoint.path)[1:])
  prompts = _prompts(1)
  tokens = np.zeros((len(prompts), 16), np.int32)
  mask = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)], mask[i, :len(p)] = p, 1
  with torch.no_grad():
    ref = checkpoint.hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(gpt.forward_full(model, jnp.asarray(tokens)))
  valid = mask.astype(bool)
  assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4


def test_greedy_generation_matches_hf_generate(checkpoint):
  """Several prompts in different slots of one arena decode exactly as HF ``generate``."""
  runner = ModelRunner.load(checkpoint.path)
  new_tokens, slots, cache_len = 32, 5, 64
  prompts = _prompts(2)[:3]
  dest = np.array([3, 0, 4, slots])  # slot 1 and 2 stay idle; row 3 is prefill padding (dropped)
  p = runner.padded_prefill_shape(len(prompts), max(map(len, prompts)))[0]
  first, keys, values = runner.prefill(prompts, SlotSampling.greedy(p), cache_len)
  cache = runner.insert(runner.init_cache(slots, cache_len), keys, values, dest[:p])

  tokens = np.zeros(slots, np.int32)
  positions = np.zeros(slots, np.int32)
  outs = {}
  for i, prompt in enumerate(prompts):
    tokens[dest[i]], positions[dest[i]] = np.asarray(first)[i], len(prompt)
    outs[dest[i]] = [int(tokens[dest[i]])]
  for _ in range(new_tokens - 1):
    nxt, cache = runner.decode(cache, tokens, positions, SlotSampling.greedy(slots))
    tokens, positions = np.asarray(nxt), positions + 1
    for s in outs:
      outs[s].append(int(tokens[s]))

  for i, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = checkpoint.hf.generate(torch.tensor(prompt[None], dtype=torch.long), do_sample=False,
                                   max_new_tokens=new_tokens, pad_token_id=0)[0, len(prompt):].tolist()
    # generate stops after end-of-text; the runner leaves stopping to the engine.
    assert outs[dest[i]][:len(ref)] == ref, f"prompt {i} in slot {dest[i]}"
    assert len(ref) >= 8  # a meaningful comparison, not an immediate end-of-text


def test_bf16_import(checkpoint):
  _, graphdef, params16 = load_hf_checkpoint(checkpoint.path, jnp.bfloat16)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(params16)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  _, _, params32 = load_hf_checkpoint(checkpoint.path, jnp.float32)
  tokens = jnp.asarray(np.stack([_prompts(3)[0]]))
  l16 = np.asarray(gpt.forward_full(nnx.merge(graphdef, params16), tokens))
  l32 = np.asarray(gpt.forward_full(nnx.merge(graphdef, params32), tokens))
  assert l16.dtype == np.float32 and np.isfinite(l16).all()
  scale = np.abs(l32).max()
  assert np.abs(l16 - l32).max() <= 0.05 * scale + 0.05
  # bf16 keeps the ranking of clearly separated candidates
  assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.75


def test_bf16_runner_decodes():
  runner = ModelRunner.load("tiny", dtype="bf16")
  assert runner.dtype == jnp.bfloat16
  first, keys, values = runner.prefill([np.arange(1, 6, dtype=np.int32)], SlotSampling.greedy(1), 32)
  assert keys[0].dtype == jnp.bfloat16
  cache = runner.insert(runner.init_cache(2, 32), keys, values, np.array([1]))
  tokens, cache = runner.decode(cache, np.array([0, int(np.asarray(first)[0])]), np.array([0, 5]),
                                SlotSampling.greedy(2))
  assert cache.dtype == jnp.bfloat16 and 0 <= int(np.asarray(tokens)[1]) < runner.cfg.vocab_size


@pytest.mark.parametrize("bad", ["float16", "int8"])
def test_unknown_dtype_is_rejected(bad):
  with pytest.raises(ValueError, match="unknown dtype"):
    ModelRunner.load("tiny", dtype=bad)
