"""Bad inputs fail loudly with a ValueError that says what is wrong; nothing truncates silently."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from s3jax.models.checkpoint import load_hf_checkpoint
from s3jax.models.runner import ModelRunner
from s3jax.models.sampling import SlotSampling


@pytest.fixture(scope="module")
def runner(gpt2_checkpoint):
  return ModelRunner.load(gpt2_checkpoint.path)


def test_prompt_longer_than_model_maximum(runner):
  too_long = np.zeros(runner.cfg.max_seq_len + 1, np.int32)
  with pytest.raises(ValueError, match="maximum sequence length"):
    runner.prefill([too_long], SlotSampling.greedy(1), runner.cfg.max_seq_len)


def test_prompt_longer_than_cache_length(runner):
  with pytest.raises(ValueError, match="cache length 32"):
    runner.prefill([np.zeros(40, np.int32)], SlotSampling.greedy(1), 32)


def test_prompt_exactly_cache_length_is_kept_whole(runner):
  prompt = np.arange(32, dtype=np.int32) % runner.cfg.vocab_size
  first, keys, _ = runner.prefill([prompt], SlotSampling.greedy(1), 32)
  ref = runner.forward_logits(prompt[None])[0, -1]
  assert keys[0].shape[2] == 32 and int(np.asarray(first)[0]) == int(np.argmax(ref))


def test_unknown_model_type_names_supported(gpt2_checkpoint, tmp_path):
  shutil.copytree(gpt2_checkpoint.path, tmp_path / "ckpt")
  cfg_path = tmp_path / "ckpt" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["model_type"] = "llama"
  cfg_path.write_text(json.dumps(cfg))
  for load in (load_hf_checkpoint, ModelRunner.load):
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*gpt2.*gptj.*gpt_neox"):
      load(tmp_path / "ckpt")


def test_unknown_model_name_lists_named_configs():
  with pytest.raises(ValueError, match="gpt2-small"):
    ModelRunner.load("no-such-model")


def _edit_tensors(src, dst, edit):
  shutil.copytree(src, dst)
  (file,) = dst.glob("*.safetensors")
  tensors = load_file(str(file))
  edit(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})
  return dst


def test_missing_tensors_are_listed(gpt2_checkpoint, tmp_path):
  def drop(t):
    del t["transformer.h.0.attn.c_proj.weight"]
    del t["transformer.h.1.mlp.c_fc.bias"]
  ckpt = _edit_tensors(gpt2_checkpoint.path, tmp_path / "ckpt", drop)
  with pytest.raises(ValueError, match="missing") as e:
    load_hf_checkpoint(ckpt)
  assert "h.0.attn.c_proj.weight" in str(e.value) and "h.1.mlp.c_fc.bias" in str(e.value)


def test_misshaped_tensors_are_listed(gpt2_checkpoint, tmp_path):
  def reshape(t):
    t["transformer.wpe.weight"] = t["transformer.wpe.weight"][:64]
    t["transformer.h.1.ln_2.weight"] = np.ones(65, np.float32)
  ckpt = _edit_tensors(gpt2_checkpoint.path, tmp_path / "ckpt", reshape)
  with pytest.raises(ValueError, match="mis-shaped") as e:
    load_hf_checkpoint(ckpt)
  assert "wpe.weight" in str(e.value) and "h.1.ln_2.weight" in str(e.value)


def test_directory_without_weights(tmp_path):
  with pytest.raises(ValueError, match="unknown model"):
    ModelRunner.load(tmp_path)  # no config.json, no tensors
