"""Text <-> token ids for the served model: the shipped GPT-2 BPE or a user's own.

The default is GPT-2's real byte-level BPE, committed at
``checkpoints/gpt2-tokenizer/`` so that it works offline and token counts
match what GPT-2/GPT-J/NeoX users see. Any Hugging Face tokenizer directory
(``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` with a
``tokenizer_config.json``) can replace it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "checkpoints" / "gpt2-tokenizer"
GPT2_VOCAB_SIZE = 50257


def load_tokenizer(path: str | Path | None = None):
  """Loads a ``transformers`` tokenizer.

  Args:
    path: a Hugging Face tokenizer (or checkpoint) directory; None for the
      shipped GPT-2 tokenizer.

  Returns:
    A ``transformers.PreTrainedTokenizerBase``.

  Raises:
    ValueError: the directory is missing or holds no loadable tokenizer, or
      the tokenizer came back empty.
  """
  from transformers import AutoTokenizer  # heavy import; only callers that need text pay it

  shipped = path is None
  directory = DEFAULT_TOKENIZER_DIR if shipped else Path(path)
  if not directory.is_dir():
    raise ValueError(f"tokenizer directory {str(directory)!r} does not exist")
  try:
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
  except Exception as e:  # transformers raises OSError, ValueError, KeyError... depending on what is missing
    raise ValueError(
        f"could not load a tokenizer from {str(directory)!r} ({type(e).__name__}: {e}); expected a "
        "Hugging Face tokenizer directory (tokenizer.json, or vocab.json + merges.txt, with "
        "tokenizer_config.json or config.json)") from e
  # transformers 5.x can silently build an empty vocabulary from incomplete files (NOTES.md).
  if len(tokenizer) == 0:
    raise ValueError(f"tokenizer loaded from {str(directory)!r} has an empty vocabulary")
  if shipped and len(tokenizer) != GPT2_VOCAB_SIZE:
    raise ValueError(f"shipped GPT-2 tokenizer has {len(tokenizer)} tokens, expected {GPT2_VOCAB_SIZE}")
  return tokenizer
