"""The Llama family (Llama, Mistral, Qwen2) equals transformers' PyTorch models: logits of the
full forward pass and of packed prefill, and greedy decoding through the paged KV pool.

The checkpoints (tests/models/conftest.py) cover Llama 3's RoPE scaling and untied embeddings,
Mistral's grouped-query attention (2 query heads per kv head) and Qwen2's q/k/v biases with one
kv head and tied embeddings; their biases and norm scales are random.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from s3jax.models import gpt, kv_cache
from s3jax.models.checkpoint import load_hf_checkpoint
from s3jax.models.config import Family, ModelConfig, load_model_config

PAGE = 8
STEPS = 16
LLAMA_FAMILIES = ("llama", "mistral", "qwen2")  # the Llama-family checkpoints of conftest.py


@pytest.fixture(scope="module", params=LLAMA_FAMILIES)
def loaded(request, build_checkpoint):
  ckpt = build_checkpoint(request.param)
  return ckpt, *load_hf_checkpoint(ckpt.path)


def test_config_reads_each_models_options(loaded):
  ckpt, cfg, _, _ = loaded
  assert cfg.family is Family.LLAMA and cfg.rotary_dim == cfg.head_dim and not cfg.rotary_interleaved
  expected = {  # kv heads, q/k/v bias, tied, RoPE scaled
    "llama": (4, False, False, True),
    "mistral": (2, False, False, False),
    "qwen2": (1, True, True, False),
  }[ckpt.name]
  assert (cfg.n_kv_heads, cfg.attn_bias, cfg.tie_embeddings, cfg.rope_scaling is not None) == expected
  assert not cfg.out_bias and not cfg.mlp_bias


def test_logits_match_hf(loaded):
  """A right-padded batch through the full forward pass and the same prompts packed into one
  prefill row, against transformers with an attention mask."""
  ckpt, cfg, graphdef, params = loaded
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size - 1, n).astype(np.int32) for n in (40, 7, 23)]
  tokens = np.zeros((len(prompts), 40), np.int32)
  mask = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)], mask[i, : len(p)] = p, 1
  with torch.no_grad():
    ref = ckpt.hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(jax.jit(gpt.forward_full)(model, tokens))
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)

  packed = np.concatenate(prompts)
  segments = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(prompts)])
  positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in prompts])
  last = np.cumsum([len(p) for p in prompts]).astype(np.int32) - 1
  logits, keys, _ = jax.jit(gpt.prefill_packed)(model, packed, segments, positions, last)
  assert keys[0].shape == (len(packed), cfg.n_kv_heads, cfg.head_dim)  # the pool holds K heads only
  for i, p in enumerate(prompts):
    np.testing.assert_allclose(np.asarray(logits[i]), ref[i, len(p) - 1], atol=1e-4, rtol=0)


def test_greedy_paged_decode_matches_hf_generate(loaded):
  """Row 1 decodes greedily with its pages out of order beside a row of junk: every step's logits
  equal the full forward pass, and the tokens equal ``generate``'s."""
  ckpt, cfg, graphdef, params = loaded
  rng = np.random.default_rng(1)
  num_pages = 8
  junk = lambda: tuple(
    jax.numpy.asarray(rng.normal(size=kv_cache.layer_shape(cfg, num_pages, PAGE)), np.float32)
    for _ in range(cfg.n_layers)
  )
  pool = kv_cache.PagePool(keys=junk(), values=junk())
  pages = [6, 1, 4, 0]  # logical page i of row 1; row 0 owns pages 2 and 3
  table = np.full((2, 4), num_pages, np.int32)
  table[0, :2] = (2, 3)
  prompt = rng.integers(0, cfg.vocab_size - 1, 11).astype(np.int32)

  prefill = jax.jit(
    lambda params, t: gpt.prefill_packed(
      nnx.merge(graphdef, params), t, np.zeros(len(t), np.int32), np.arange(len(t), dtype=np.int32), np.int32([10])
    )
  )
  decode = jax.jit(
    lambda params, pool, tokens, positions, table: gpt.decode_paged(
      nnx.merge(graphdef, params), pool, tokens, positions, table, np.int32(2), 4
    )
  )
  full = jax.jit(lambda params, t: gpt.forward_full(nnx.merge(graphdef, params), t))

  logits, keys, values = prefill(params, prompt)
  at = (np.asarray(pages)[np.arange(11) // PAGE], np.arange(11) % PAGE)
  pool = kv_cache.PagePool(
    keys=tuple(kv_cache.write(a, k, *at) for a, k in zip(pool.keys, keys)),
    values=tuple(kv_cache.write(a, v, *at) for a, v in zip(pool.values, values)),
  )
  seq, logits = list(prompt), np.asarray(logits[0])
  for step in range(STEPS):
    padded = np.zeros((1, 32), np.int32)  # one shape for every step; causal attention ignores the pad
    padded[0, : len(seq)] = seq
    ref = np.asarray(full(params, padded))[0, len(seq) - 1]
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0, err_msg=f"step {step}")
    seq.append(int(np.argmax(logits)))
    position = len(seq) - 1
    table[1, : position // PAGE + 1] = pages[: position // PAGE + 1]
    out, pool = decode(params, pool, np.int32([5, seq[-1]]), np.int32([12, position]), table)
    logits = np.asarray(out[1])
  with torch.no_grad():
    ref = ckpt.hf.generate(
      torch.tensor(prompt[None], dtype=torch.long), do_sample=False, max_new_tokens=STEPS, pad_token_id=0
    )[0, len(prompt) :].tolist()
  assert seq[len(prompt) :][: len(ref)] == ref and len(ref) >= 8


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "gpt-j-6b", "tiny-llama", "smollm2-135m", "llama-2-7b"])
def test_num_params_counts_the_matrices_and_embeddings(name):
  cfg = load_model_config(name)
  abstract = nnx.state(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))))
  matrices = sum(leaf.size for leaf in jax.tree.leaves(abstract) if leaf.ndim == 2)
  assert cfg.num_params() == matrices
  # Published totals, with the norm scales: SmolLM2-135M 134,515,008; Llama-2-7B 6,738,415,616.
  norms = {"smollm2-135m": 576 * 61, "llama-2-7b": 4096 * 65}
  if name in norms:
    assert cfg.num_params() + norms[name] == {"smollm2-135m": 134_515_008, "llama-2-7b": 6_738_415_616}[name]


def _hf(**fields) -> dict:
  base = dict(
    model_type="mistral",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
  )
  return {**base, **fields}


def test_hf_config_options_and_refusals():
  assert ModelConfig.from_hf_dict(_hf(sliding_window=64)).max_seq_len == 64  # full attention within the window
  assert ModelConfig.from_hf_dict(_hf(sliding_window=None)).max_seq_len == 256
  assert ModelConfig.from_hf_dict(_hf(model_type="llama", rope_theta=5e5)).rotary_base == 5e5  # transformers 4 layout
  with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
    ModelConfig.from_hf_dict(_hf(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(ValueError, match="head_dim=16"):
    ModelConfig.from_hf_dict(_hf(head_dim=16))
  with pytest.raises(ValueError, match="not a multiple of the kv heads, 3"):
    ModelConfig.from_hf_dict(_hf(num_key_value_heads=3))
