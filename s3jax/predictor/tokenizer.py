"""Prompt tokenization for the predictor's encoder, with static padded shapes.

Shape legend: B batch, T tokens.

Behaviour at the edges (documented contract):
  * Empty prompt: encodes as `[CLS] [SEP]`; the predictor then returns the
    length it learnt for a content-free prompt. Never an error.
  * Prompt longer than `max_tokens`: truncated to its first `max_tokens - 2 -
    tail` and last `tail` word pieces (`tail = (max_tokens - 2) // 4`), then
    wrapped in `[CLS] ... [SEP]`. The head holds the instruction, the tail
    the actual question in "context + question" prompts.
`max_tokens` is at most the encoder's 512 positions.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from s3jax.predictor.encoder import backbone_dir

# Padded token lengths that get a compiled executable (with the batch sizes in
# predictor.py). Few shapes keep compile time and the executable cache small.
TOKEN_SHAPES = (32, 64, 128, 256, 512)


class PromptTokenizer:
  """WordPiece tokenizer of the backbone, truncating and padding to shapes."""

  def __init__(self, path: str | pathlib.Path | None = None, max_tokens: int = 128):
    if not 2 < max_tokens <= 512:
      raise ValueError("max_tokens must be in (2, 512]")
    path = pathlib.Path(path or backbone_dir())
    if path.is_dir():
      path = path / "tokenizer.json"
    self._tok = Tokenizer.from_file(str(path))
    # Truncation and padding are ours (head + tail, shape buckets).
    self._tok.no_truncation()
    self._tok.no_padding()
    self.max_tokens = max_tokens
    self.cls_id = self._tok.token_to_id("[CLS]")
    self.sep_id = self._tok.token_to_id("[SEP]")
    self.pad_id = self._tok.token_to_id("[PAD]")

  def encode(self, prompts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each prompt, `[CLS] ... [SEP]`, at most `max_tokens`."""
    prompts = [p if isinstance(p, str) else str(p) for p in prompts]
    encs = self._tok.encode_batch(prompts, add_special_tokens=False)
    budget = self.max_tokens - 2
    tail = budget // 4
    out = []
    for e in encs:
      ids = e.ids
      if len(ids) > budget:
        ids = ids[: budget - tail] + ids[len(ids) - tail :]
      out.append(np.asarray([self.cls_id, *ids, self.sep_id], np.int32))
    return out

  def padded_length(self, n: int) -> int:
    """Smallest token shape >= n (capped at `max_tokens`)."""
    for t in TOKEN_SHAPES:
      if t >= n:
        return min(t, self.max_tokens)
    return self.max_tokens

  def pad(
    self, seqs: Sequence[np.ndarray], length: int | None = None, batch: int | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Pads to `[batch, length]` ids and mask (defaults: tight shape bucket).

    Padding rows (beyond `len(seqs)`) are `[CLS] [SEP]` so they stay finite.
    """
    length = length or self.padded_length(max(len(s) for s in seqs))
    batch = batch or len(seqs)
    ids = np.full((batch, length), self.pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i in range(batch):
      s = seqs[i] if i < len(seqs) else np.asarray([self.cls_id, self.sep_id])
      ids[i, : len(s)] = s
      mask[i, : len(s)] = 1
    return ids, mask
