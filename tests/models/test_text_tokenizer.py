"""The shipped GPT-2 tokenizer, a user's own tokenizer directory, and the generate CLI."""

from __future__ import annotations

import shutil

import pytest

from s3jax.cli import main
from s3jax.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer


@pytest.fixture(scope="module")
def user_tokenizer_dir(tmp_path_factory):
  """A small byte-level BPE trained here and saved as a Hugging Face tokenizer directory."""
  from tokenizers import ByteLevelBPETokenizer
  from transformers import PreTrainedTokenizerFast

  bpe = ByteLevelBPETokenizer()
  text = ["the quick brown fox jumps over the lazy dog " * 4, "hello world, this is a test of my tokenizer"]
  bpe.train_from_iterator(text, vocab_size=320, min_frequency=1, special_tokens=["<|end|>"])
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>")
  path = tmp_path_factory.mktemp("user_tokenizer")
  tok.save_pretrained(path)
  return path


def test_shipped_tokenizer_is_gpt2():
  tok = load_tokenizer()
  assert len(tok) == 50257
  ids = tok.encode("Hello world, this is a test.")
  assert len(ids) == 8  # GPT-2's own count
  assert tok.decode(ids) == "Hello world, this is a test."
  assert tok.eos_token_id == 50256
  assert DEFAULT_TOKENIZER_DIR.is_dir()


def test_shipped_tokenizer_equals_transformers_loading_the_same_files():
  """The shipped tokenizer skips transformers at start-up; transformers on its files agrees."""
  ours, theirs = load_tokenizer(None), load_tokenizer(DEFAULT_TOKENIZER_DIR)
  texts = ["a b c", "Hello  world,\n\n this is <|endoftext|> a test.", "émoji 😀 ok", " leading space"]
  for text in texts:
    ids = theirs.encode(text)
    assert ours.encode(text) == ids and ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids[:3]) == theirs.decode(ids[:3])  # a partial UTF-8 sequence decodes alike
  assert ours(texts)["input_ids"] == theirs(texts, add_special_tokens=False)["input_ids"]
  assert len(ours) == len(theirs) and ours.eos_token_id == theirs.eos_token_id


def test_user_tokenizer_dir(user_tokenizer_dir):
  tok = load_tokenizer(user_tokenizer_dir)
  assert 0 < len(tok) <= 320
  ids = tok.encode("the quick brown fox")
  assert tok.decode(ids) == "the quick brown fox"
  assert max(ids) < len(tok)


def test_unloadable_tokenizer_dirs(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load_tokenizer(tmp_path / "nope")
  with pytest.raises(ValueError, match="could not load a tokenizer"):
    load_tokenizer(tmp_path)  # empty directory


def test_cli_default_tokenizer_named_config(capsys):
  rc = main(["--model", "tiny", "--prompt", "Hello world", "--max-tokens", "6", "--seed", "3"])
  out, err = capsys.readouterr()
  assert rc == 0
  assert out.startswith("Hello world")
  assert "tokens/s" in err and "generated 6" in err


def test_cli_user_checkpoint_and_tokenizer(gpt2_checkpoint, user_tokenizer_dir, tmp_path, capsys):
  """A user's checkpoint with its own tokenizer, greedy and sampled."""
  ckpt = tmp_path / "ckpt"
  shutil.copytree(gpt2_checkpoint.path, ckpt)
  for f in user_tokenizer_dir.iterdir():
    shutil.copy(f, ckpt)
  greedy = ["--model", str(ckpt), "--tokenizer", str(ckpt), "--prompt", "the lazy dog", "--max-tokens", "10"]
  assert main(greedy) == 0
  assert capsys.readouterr().out.startswith("the lazy dog")
  sampled = greedy + ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "5"]
  assert main(sampled) == 0
  a = capsys.readouterr().out
  assert main(sampled) == 0
  assert capsys.readouterr().out == a  # same seed, same text


def test_cli_errors(capsys):
  assert main(["--model", "tiny", "--max-tokens", "100000"]) == 2
  assert "maximum sequence length" in capsys.readouterr().err
  assert main(["--model", "tiny", "--tokenizer", "/nonexistent/dir"]) == 2
  assert "does not exist" in capsys.readouterr().err
