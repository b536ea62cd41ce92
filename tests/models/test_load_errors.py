"""Bad inputs fail loudly with a ValueError that says what is wrong; nothing truncates silently."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from s3jax.engine import Engine, EngineConfig, EngineRequest
from s3jax.executor.runner import ModelRunner
from s3jax.executor.step_state import Admission, PrefillPack
from s3jax.models.checkpoint import load_hf_checkpoint


@pytest.fixture(scope="module")
def runner(gpt2_checkpoint):
  return ModelRunner.load(gpt2_checkpoint.path)


def _engine(runner):
  return Engine(
    runner,
    EngineConfig.create(
      policy="max", memory_budget=runner.cfg.max_seq_len * runner.kv_bytes_per_token(), min_cache_len=16, page_size=16
    ),
  )


def test_prompt_longer_than_model_maximum(runner):
  too_long = [0] * runner.cfg.max_seq_len
  with pytest.raises(ValueError, match="exceeds 128 tokens, the longest sequence"):
    _engine(runner).submit(EngineRequest(request_id=0, prompt_ids=too_long, max_tokens=1))
  shapes = _engine(runner).shapes
  with pytest.raises(ValueError, match="at most 128 tokens"):
    PrefillPack.from_host(shapes, [Admission(tokens=too_long + [0], pages=[0] * 9, row=0)])


def test_prompt_of_the_model_maximum_is_kept_whole(runner):
  prompt = (np.arange(runner.cfg.max_seq_len - 1) % runner.cfg.vocab_size).tolist()
  engine = _engine(runner)
  request = EngineRequest(request_id=0, prompt_ids=prompt, max_tokens=1)
  engine.submit(request)
  engine.run_until_done()
  ref = runner.forward_logits(np.asarray(prompt)[None])[0, -1]
  assert request.output_ids == [int(np.argmax(ref))]


def test_unknown_model_type_names_supported(gpt2_checkpoint, tmp_path):
  shutil.copytree(gpt2_checkpoint.path, tmp_path / "ckpt")
  cfg_path = tmp_path / "ckpt" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["model_type"] = "mamba"
  cfg_path.write_text(json.dumps(cfg))
  for load in (load_hf_checkpoint, ModelRunner.load):
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'.*gpt2.*gptj.*gpt_neox.*llama.*mistral.*qwen2"):
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
