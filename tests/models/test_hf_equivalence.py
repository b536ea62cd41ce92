"""The Flax decoder equals transformers' PyTorch models: logits and greedy generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from s3jax.engine import Engine, EngineConfig, EngineRequest
from s3jax.executor.runner import ModelRunner
from s3jax.models import gpt
from s3jax.models.checkpoint import load_hf_checkpoint

PROMPT_LENS = (12, 5, 9, 1)
VOCAB = 384  # tests/models/conftest.py


def _prompts(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB - 1, n).astype(np.int32) for n in PROMPT_LENS]


def _hf_logits(hf, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()


def test_packed_prefill_logits_match_hf(checkpoint):
  cfg, graphdef, params = load_hf_checkpoint(checkpoint.path)
  model = nnx.merge(graphdef, params)
  prompts = _prompts()
  tokens = np.concatenate(prompts + [np.zeros(5, np.int32)])  # packed, then padding
  segments = np.concatenate([np.full(len(p), i) for i, p in enumerate(prompts)] + [np.full(5, len(prompts))])
  positions = np.concatenate([np.arange(len(p)) for p in prompts] + [np.arange(5)])
  last = np.cumsum([len(p) for p in prompts]) - 1
  logits, keys, _ = gpt.prefill_packed(
    model,
    jnp.asarray(tokens),
    jnp.asarray(segments, jnp.int32),
    jnp.asarray(positions, jnp.int32),
    jnp.asarray(last, jnp.int32),
  )
  assert len(keys) == cfg.n_layers and keys[0].shape == (len(tokens), cfg.n_heads, cfg.head_dim)
  for i, p in enumerate(prompts):
    ref = _hf_logits(checkpoint.hf, p)  # HF on the prompt alone
    np.testing.assert_allclose(np.asarray(gpt.forward_full(model, jnp.asarray(p[None])))[0], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits[i]), ref[-1], atol=1e-4, rtol=0)


def test_padded_logits_match_hf_attention_mask(checkpoint):
  """Same batch through HF in one call with a right-padding attention mask."""
  model = nnx.merge(*load_hf_checkpoint(checkpoint.path)[1:])
  prompts = _prompts(1)
  tokens = np.zeros((len(prompts), 16), np.int32)
  mask = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)], mask[i, : len(p)] = p, 1
  with torch.no_grad():
    ref = checkpoint.hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(gpt.forward_full(model, jnp.asarray(tokens)))
  valid = mask.astype(bool)
  assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4


def test_greedy_generation_matches_hf_generate(checkpoint):
  """Several prompts decoded together by the engine each equal HF ``generate`` alone."""
  runner = ModelRunner.load(checkpoint.path)
  new_tokens = 32
  prompts = _prompts(2)[:3]
  engine = Engine(
    runner,
    EngineConfig.create(
      policy="oracle", memory_budget=4 * 128 * runner.kv_bytes_per_token(), min_cache_len=16, page_size=16
    ),
  )
  requests = [
    EngineRequest(request_id=i, prompt_ids=p.tolist(), max_tokens=new_tokens, true_output_len=n)
    for i, (p, n) in enumerate(zip(prompts, (5, 40, 17)))
  ]  # different reservations, one batch
  for r in requests:
    engine.submit(r)
  engine.run_until_done()
  assert engine.metrics.max_batch_size == 3
  for prompt, request in zip(prompts, requests):
    with torch.no_grad():
      ref = checkpoint.hf.generate(
        torch.tensor(prompt[None], dtype=torch.long), do_sample=False, max_new_tokens=new_tokens, pad_token_id=0
      )[0, len(prompt) :].tolist()
    assert request.output_ids == ref, f"request {request.request_id}"  # both stop after end-of-text
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
  engine = Engine(
    runner, EngineConfig.create(policy="max", memory_budget=runner.cfg.max_seq_len * runner.kv_bytes_per_token())
  )
  request = EngineRequest(request_id=0, prompt_ids=list(range(1, 6)), max_tokens=4, ignore_eos=True)
  engine.submit(request)
  engine.run_until_done()
  assert engine.snapshot().device_bytes == runner.cfg.max_seq_len * runner.kv_bytes_per_token()
  assert len(request.output_ids) == 4 and all(0 <= t < runner.cfg.vocab_size for t in request.output_ids)


@pytest.mark.parametrize("bad", ["float16", "int8"])
def test_unknown_dtype_is_rejected(bad):
  with pytest.raises(ValueError, match="unknown dtype"):
    ModelRunner.load("tiny", dtype=bad)
