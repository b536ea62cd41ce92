"""GGUF files load to the model ``transformers`` builds from the same file.

The test writes a tiny Llama as llama.cpp's converter does (``gguf.GGUFWriter``; Q and K rows
permuted; the embedding Q8_0, the linear layers Q4_1, the norms F32) with a byte-level BPE
tokenizer and a ChatML template in its metadata, then checks logits, greedy tokens through the
engine, the tokenizer, each supported tensor type, and the errors for what is not supported.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from s3jax import LLM, SamplingParams
from s3jax.models import gguf as s3gguf
from s3jax.models import gpt
from s3jax.models.checkpoint import params_from_tensors
from s3jax.models.hub import resolve_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "The quick brown fox jumps over the lazy dog 1234 times, isn't it? " * 20


def _bpe():
  """A byte-level BPE trained here (about 320 tokens), digits split one by one (SmolLM2's ``smollm``)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=384, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator([TEXT, "Paris is the capital of France."], trainer)
  return tok


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's ``convert_hf_to_gguf.LlamaModel.permute``."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, tok, *, arch="llama", types=None, tokenizer_model="gpt2", pre="smollm"):
  """Writes ``hf`` (a transformers Llama) as llama.cpp would: ``types`` maps a GGUF tensor name to
  its type (default: Q8_0 embedding, Q4_1 linear layers, F32 norms)."""
  c = hf.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre(pre)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  w.add_token_list([t for t, _ in vocab])
  w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])  # 3: control
  w.add_token_merges([" ".join(m) for m in _merges(tok)])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(CHATML)
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
  if not c.tie_word_embeddings:
    names["lm_head.weight"] = "output.weight"
  ours = {v: k for k, v in s3gguf._BLOCK_NAMES.items()}
  for i in range(c.num_hidden_layers):
    for hf_name, g_name in ours.items():
      names[f"model.layers.{i}.{hf_name}"] = f"blk.{i}.{g_name}"
  for hf_name, g_name in names.items():
    if hf_name not in sd:
      continue
    t = sd[hf_name]
    if g_name.endswith(("attn_q.weight", "attn_k.weight")):
      t = _permute(t, c.num_attention_heads if "attn_q" in g_name else c.num_key_value_heads)
    default = Q.F32 if t.ndim == 1 else (Q.Q8_0 if g_name == "token_embd.weight" else Q.Q4_1)
    kind = (types or {}).get(g_name, default)
    if kind in (Q.F32, Q.I32):
      w.add_tensor(g_name, t.astype(np.int32 if kind is Q.I32 else np.float32))
    else:
      w.add_tensor(g_name, gguf.quants.quantize(t, kind), raw_dtype=kind)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _merges(tok):
  import json

  return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(GGUF path, the transformers model it was written from, the BPE)."""
  import transformers as tf

  tok = _bpe()
  torch.manual_seed(0)
  hf = tf.LlamaForCausalLM(
    tf.LlamaConfig(
      vocab_size=tok.get_vocab_size(),
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=128,
      initializer_range=0.1,
      tie_word_embeddings=True,
      bos_token_id=1,
      eos_token_id=2,
    )
  ).eval()
  directory = tmp_path_factory.mktemp("gguf")
  return write_gguf(directory / "tiny-llama.Q4_1.gguf", hf, tok), hf, tok


@pytest.fixture(scope="module")
def reference(tiny):
  """transformers' PyTorch model loaded from the same GGUF file (it dequantizes and un-permutes)."""
  from transformers import AutoModelForCausalLM

  path = tiny[0]
  return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_logits_equal_transformers_loading_the_same_file(tiny, reference):
  path, original, _ = tiny
  cfg, graphdef, params = s3gguf.load_gguf(path)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings, cfg.eos_token_id) == (4, 2, True, 2)
  assert cfg.name == "tiny-llama"  # the quantization tag is not part of the name
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    ref = reference(torch.tensor(ids)).logits.numpy()
    fp32 = original(torch.tensor(ids)).logits.numpy()
  forward = jax.jit(lambda p, t: gpt.forward_full(nnx.merge(graphdef, p), t))
  ours = np.asarray(forward(params, ids))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # Q4_1 moved the logits, yet they still follow the unquantized model's...
  assert np.abs(ours - fp32).max() > 1e-2 and np.corrcoef(ours.ravel(), fp32.ravel())[0, 1] > 0.9
  # ...and the un-permutation is what makes them equal: left permuted, Q and K rotate wrong pairs.
  tensors = s3gguf.hf_tensors(s3gguf._reader(path), cfg, "qwen2")  # qwen2: read as stored
  wrong = np.asarray(forward(params_from_tensors(cfg, tensors)[1], ids))
  assert np.abs(wrong - ref).max() > 100 * np.abs(ours - ref).max()


def test_engine_greedy_chat_equals_transformers_generate(tiny, reference):
  path = tiny[0]
  llm = LLM(path, policy="max", predictor=None, memory_budget=1 << 20, max_slots=4, compilation_cache=None)
  assert llm.model_name == "tiny-llama" and llm.runner.cfg.eos_token_id == 2
  ids = llm.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
  assert ids[0] == 1 and llm.tokenizer.decode(ids).startswith("<|im_start|>user\nWhat")
  (out,) = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0))
  with torch.no_grad():
    ref = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=2)
  assert out.token_ids == ref[0, len(ids) :].tolist() and len(out.token_ids) >= 4
  assert out.text == llm.tokenizer.decode([t for t in out.token_ids if t != 2])


def test_tokenizer_from_metadata_equals_the_bpe_it_was_written_from(tiny):
  path, _, bpe = tiny
  tok = s3gguf.load_tokenizer(path)
  for text in (TEXT[:80], "Paris 2024, isn't it?\n  spaces", "<|im_start|>user\nhi<|im_end|>"):
    assert tok.encode(text) == bpe.encode(text).ids, text
  assert tok.encode(" 1234") == [bpe.token_to_id("Ġ")] + [bpe.token_to_id(d) for d in "1234"]  # digit by digit
  assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token, len(tok)) == (1, 2, "<|im_end|>", bpe.get_vocab_size())
  assert tok.decode(tok.encode("Paris is the capital.")) == "Paris is the capital."
  assert tok.chat_template == CHATML


def test_model_sources_name_a_file_or_a_directory_holding_one(tiny, tmp_path):
  path = tiny[0]
  for given in (path, str(path), path.parent):
    source = resolve_model(given)
    assert source.is_gguf and source.checkpoint == path and source.name == "tiny-llama"
  shutil.copy(path, tmp_path / "a.gguf")
  shutil.copy(path, tmp_path / "b.gguf")
  with pytest.raises(ValueError, match="several GGUF files"):
    resolve_model(tmp_path)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_every_supported_tensor_type_dequantizes(kind, tmp_path):
  x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
  w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
  qtype = Q[kind]
  if qtype is Q.F32:
    w.add_tensor("x", x)
  elif qtype is Q.F16:
    w.add_tensor("x", x.astype(np.float16))
  else:
    w.add_tensor("x", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  (tensor,) = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors
  y = s3gguf.dequantize(tensor)
  tolerance = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.03}.get(kind, 0.5)
  assert y.shape == x.shape and y.dtype == np.float32 and np.abs(y - x).max() <= tolerance


def test_unsupported_tensor_type_architecture_and_tokenizer_are_named(tiny, tmp_path):
  _, hf, bpe = tiny
  bad = write_gguf(tmp_path / "i32.gguf", hf, bpe, types={"blk.1.ffn_up.weight": Q.I32})
  with pytest.raises(ValueError, match="blk.1.ffn_up.weight has type I32.*supported: F32, F16, BF16, Q8_0"):
    s3gguf.load_gguf(bad)
  bad = write_gguf(tmp_path / "gemma.gguf", hf, bpe, arch="gemma2")
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma2'; supported: llama, qwen2"):
    s3gguf.load_gguf(bad)
  bad = write_gguf(tmp_path / "spm.gguf", hf, bpe, tokenizer_model="llama")
  with pytest.raises(ValueError, match="unsupported GGUF tokenizer 'llama'.*--tokenizer"):
    s3gguf.load_tokenizer(bad)
  bad = write_gguf(tmp_path / "pre.gguf", hf, bpe, pre="chatglm-bpe")
  with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'chatglm-bpe'"):
    s3gguf.load_tokenizer(bad)


def test_generate_cli_answers_a_chat_model_through_its_template(tiny, reference, capsys):
  """``s3jax-generate`` on a model whose tokenizer has a chat template prints only the answer."""
  from s3jax.cli import main

  path = tiny[0]
  assert main(["--model", str(path), "--prompt", "What is the capital of France?", "--max-tokens", "6"]) == 0
  out = capsys.readouterr().out
  tok = s3gguf.load_tokenizer(path)
  ids = tok.encode(
    tok.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    ),
    add_special_tokens=False,
  )
  with torch.no_grad():
    ref = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, eos_token_id=2)[0, len(ids) :]
  assert out.rstrip("\n") == tok.decode([t for t in ref.tolist() if t != 2])
  assert main(["--model", str(path), "--prompt", "Paris is", "--max-tokens", "2", "--no-chat"]) == 0
  assert capsys.readouterr().out.startswith("Paris is")
