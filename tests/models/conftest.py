"""Tiny random Hugging Face checkpoints of every supported family, built once per session.

Each is a PyTorch model from ``transformers`` saved with ``save_pretrained``:
the reference implementation and the on-disk format that users bring. The GPT
families run through the ``checkpoint`` fixture's tests; the Llama family
(Llama with Llama 3 RoPE scaling, Mistral with grouped-query attention, Qwen2
with q/k/v biases and a single kv head) has its own module, test_llama.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

VOCAB = 384
MAX_POS = 128
EOS = VOCAB - 1  # inside the vocab, so `generate` stops exactly where a served answer would


@dataclasses.dataclass
class TinyCheckpoint:
  name: str
  path: Path
  hf: object  # the transformers PyTorch model, eval mode, fp32


def _hf_model(name: str):
  import transformers as tf

  # initializer_range 0.1 (not 0.02) spreads the logits so greedy argmax ties are rare.
  common = dict(vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.1)
  if name == "gpt2":
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_positions=MAX_POS, n_embd=64, n_layer=2, n_head=4, **common))
  if name == "gptj":
    return tf.GPTJForCausalLM(
      tf.GPTJConfig(n_positions=MAX_POS, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **common)
    )
  neox = dict(
    max_position_embeddings=MAX_POS,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    **common,
  )
  if name == "neox":
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **neox))
  if name == "neox_seq":
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=False, **neox))
  llama = dict(neox, intermediate_size=96)
  if name == "llama":  # untied, Llama 3.1's frequency scaling (original context 32, inside the test's prompts)
    rope = dict(
      rope_type="llama3",
      rope_theta=500000.0,
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=32,
    )
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=4, rope_parameters=rope, **llama))
  if name == "mistral":  # grouped-query attention: 2 query heads per kv head
    return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **llama))
  if name == "qwen2":  # q/k/v biases, one kv head for all 4 query heads, tied embeddings
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **llama))
  raise KeyError(name)


FAMILIES = ("gpt2", "gptj", "neox", "neox_seq")
LLAMA_FAMILIES = ("llama", "mistral", "qwen2")


def _perturb_vectors(hf) -> None:
  """Random biases and norm scales: transformers initializes them to 0 and 1, which would leave
  a wrong bias or norm mapping untested."""
  import torch

  with torch.no_grad():
    for p in hf.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="session")
def build_checkpoint(tmp_path_factory):
  """``build_checkpoint(name) -> TinyCheckpoint``, cached per session."""
  import torch

  built: dict[str, TinyCheckpoint] = {}

  def build(name: str) -> TinyCheckpoint:
    if name not in built:
      torch.manual_seed((FAMILIES + LLAMA_FAMILIES).index(name))
      hf = _hf_model(name).eval()
      if name in LLAMA_FAMILIES:
        _perturb_vectors(hf)
      path = tmp_path_factory.mktemp(name)
      hf.save_pretrained(path)
      built[name] = TinyCheckpoint(name, path, hf)
    return built[name]

  return build


@pytest.fixture(scope="session", params=FAMILIES)
def checkpoint(request, build_checkpoint) -> TinyCheckpoint:
  return build_checkpoint(request.param)


@pytest.fixture(scope="session")
def gpt2_checkpoint(build_checkpoint) -> TinyCheckpoint:
  return build_checkpoint("gpt2")
