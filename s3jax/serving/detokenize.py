"""Incremental detokenization and stop strings for streamed answers.

Decoding the whole answer after every token costs O(n^2); like vLLM we decode
a short window (``prefix_offset:``) and emit only text that is final: text
ending in an incomplete UTF-8 sequence (U+FFFD) waits for the next token, and
text that may be the start of a stop string is held back until it is not.
The joined deltas always equal the final text.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int | None:
  """Index where the earliest stop string starts in ``text``, or None."""
  hits = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
  """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
  longest = 0
  for s in stops:
    for n in range(min(len(s) - 1, len(text)), longest, -1):
      if text.endswith(s[:n]):
        longest = n
        break
  return longest


class TextStream:
  """Turns a growing list of token ids into text deltas, honouring stop strings."""

  def __init__(self, tokenizer, stops: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.stops = tuple(stops)
    self.ids: list[int] = []
    self.text = ""  # decoded so far (complete characters only)
    self._sent = 0  # characters already emitted
    self._prefix_offset = 0
    self._read_offset = 0
    self._max_stop = max((len(s) for s in self.stops), default=0)

  def push(self, tokens: Sequence[int]) -> None:
    self.ids.extend(tokens)
    prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
    window = self.tokenizer.decode(self.ids[self._prefix_offset :])
    if len(window) > len(prefix) and not window.endswith("\ufffd"):
      self.text += window[len(prefix) :]
      self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

  def stop_index(self) -> int | None:
    """Where a stop string starts, searching only the text that can contain a new one."""
    if not self.stops:
      return None
    start = max(0, self._sent - self._max_stop)
    i = find_stop(self.text[start:], self.stops)
    return None if i is None else start + i

  def delta(self, final: bool) -> str:
    """Text safe to emit now; with ``final``, all the rest up to any stop string."""
    if final:  # flush characters still waiting for more bytes
      self.text = self.tokenizer.decode(self.ids)
    cut = self.stop_index()
    if cut is not None:
      end = cut
    elif final:
      end = len(self.text)
    else:
      end = len(self.text) - _held_back(self.text, self.stops)
    end = max(end, self._sent)
    out, self._sent = self.text[self._sent : end], end
    return out

  @property
  def emitted(self) -> str:
    return self.text[: self._sent]
