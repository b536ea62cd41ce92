"""Text <-> token ids for the served model: the shipped GPT-2 BPE or a user's own.

The default is GPT-2's real byte-level BPE, committed at
``checkpoints/gpt2-tokenizer/`` so that it works offline and token counts
match what GPT-2/GPT-J/NeoX users see. It is built directly with the
``tokenizers`` library (the engine ``transformers``' fast tokenizers wrap):
importing ``transformers`` took 1.8 s of the server's start-up, and the
encodings and decodings are the same (checked on 605 alpaca_eval texts). Any
Hugging Face tokenizer directory (``tokenizer.json`` or ``vocab.json`` +
``merges.txt`` with a ``tokenizer_config.json``) can replace it, loaded by
``transformers``.
"""

from __future__ import annotations

from pathlib import Path

from s3jax.assets import GPT2_TOKENIZER_DIR

DEFAULT_TOKENIZER_DIR = GPT2_TOKENIZER_DIR
GPT2_VOCAB_SIZE = 50257


class ByteLevelBPE:
  """GPT-2's byte-level BPE with the ``transformers`` methods s3jax calls: ``encode``, ``decode``,
  ``len()``, ``eos_token_id`` and ``__call__(texts)["input_ids"]``. No special tokens are added."""

  def __init__(self, directory: Path, eos_token: str = "<|endoftext|>"):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    self._tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    self._tok.decoder = decoders.ByteLevel()
    self._tok.add_special_tokens([AddedToken(eos_token, special=True)])
    self.eos_token = eos_token
    self.eos_token_id = self._tok.token_to_id(eos_token)

  def __len__(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def get_vocab(self) -> dict[str, int]:
    return self._tok.get_vocab(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
    return {"input_ids": [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]}


# A normalizer may shrink text before it is split (NFC composes a Hangul syllable of three jamo):
# tokenizers that may have one get this much slack in ``max_chars_per_token``.
_NORMALIZER_SLACK = 4


def max_chars_per_token(tokenizer) -> int:
  """An upper bound on the characters of text one token can cover.

  Lets a caller refuse a prompt that cannot fit in N tokens without tokenizing it: a text of more
  than ``N * max_chars_per_token`` characters needs more than N tokens. Vocabulary entries are at
  least as long as the text they cover (byte-level BPE spells each byte as one character;
  SentencePiece spells a space as one); added tokens such as ``<|endoftext|>`` count too.
  """
  longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
  return longest if isinstance(tokenizer, ByteLevelBPE) else longest * _NORMALIZER_SLACK


def load_tokenizer(path: str | Path | None = None):
  """Loads the shipped GPT-2 tokenizer or a user's ``transformers`` tokenizer.

  Args:
    path: a Hugging Face tokenizer (or checkpoint) directory, or a GGUF file;
      None for the shipped GPT-2 tokenizer.

  Returns:
    A ``ByteLevelBPE`` for the shipped tokenizer, else a
    ``transformers.PreTrainedTokenizerBase``.

  Raises:
    ValueError: the directory is missing or holds no loadable tokenizer, or
      the tokenizer came back empty.
  """
  shipped = path is None
  directory = DEFAULT_TOKENIZER_DIR if shipped else Path(path)
  if not shipped and not _has_tokenizer_files(directory):
    from s3jax.models import gguf

    gguf_file = gguf.find_gguf(directory)
    if gguf_file is not None:
      return gguf.load_tokenizer(gguf_file)
  if not directory.is_dir():
    raise ValueError(f"tokenizer directory {str(directory)!r} does not exist")
  if shipped:
    tokenizer = ByteLevelBPE(directory)
    if len(tokenizer) != GPT2_VOCAB_SIZE:
      raise ValueError(f"shipped GPT-2 tokenizer has {len(tokenizer)} tokens, expected {GPT2_VOCAB_SIZE}")
    return tokenizer
  from transformers import AutoTokenizer  # heavy import (1.8 s); only a user's tokenizer pays it

  try:
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
  except Exception as e:  # transformers raises OSError, ValueError, KeyError... depending on what is missing
    raise ValueError(
      f"could not load a tokenizer from {str(directory)!r} ({type(e).__name__}: {e}); expected a "
      "Hugging Face tokenizer directory (tokenizer.json, or vocab.json + merges.txt, with "
      "tokenizer_config.json or config.json)"
    ) from e
  # transformers 5.x can silently build an empty vocabulary from incomplete files.
  if len(tokenizer) == 0:
    raise ValueError(f"tokenizer loaded from {str(directory)!r} has an empty vocabulary")
  return tokenizer


def _has_tokenizer_files(directory: Path) -> bool:
  return any((directory / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def load_model_tokenizer(source, path: str | Path | None = None):
  """The tokenizer of a loaded model (``ModelRunner.source``): ``path`` when given, else the
  checkpoint's own tokenizer when it ships one (a GGUF file always does), else the shipped GPT-2
  BPE."""
  from s3jax.models.hub import tokenizer_dir

  if path is None and source is not None and source.is_gguf:
    path = source.checkpoint
  return load_tokenizer(path if path is not None else tokenizer_dir(source))
