"""A bounded replay buffer of observed lengths: the newest ones, plus a uniform sample of the older.

Online retraining must follow drift (the newest requests say most about the served model now) without
forgetting what the older ones taught (a reservoir keeps a uniform sample of everything that aged out
of the recent window, Vitter's algorithm R). Its size never exceeds `recent + reservoir`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Example:
  """One finished request, as the retrainer learns from it.

  Attributes:
    pooled: [D] the predictor's pooled prompt embedding (what its head reads).
    length: the answer's true length in tokens.
    held_back: kept out of training, to judge candidates on (chosen by the prompt, see `held_back`).
  """

  pooled: np.ndarray
  length: int
  held_back: bool


def held_back(prompt: str, fraction: float) -> bool:
  """Whether a prompt belongs to the held-back slice: a stable function of its text, so a prompt
  asked twice lands on the same side (no candidate is judged on prompts it trained on)."""
  h = int.from_bytes(hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).digest()[:8], "big")
  return h / 2.0**64 < fraction


class ReplayBuffer:
  """Thread-safe: the engine's observations come in on one thread, training reads on another."""

  def __init__(self, recent: int, reservoir: int, seed: int = 0):
    if recent < 1 or reservoir < 0:
      raise ValueError("the buffer needs recent >= 1 and reservoir >= 0")
    self._recent: collections.deque[Example] = collections.deque(maxlen=recent)
    self._reservoir: list[Example] = []
    self._reservoir_size = reservoir
    self._aged = 0  # examples that have left the recent window so far
    self._rng = np.random.default_rng(seed)
    self._lock = threading.Lock()

  @property
  def capacity(self) -> int:
    return self._recent.maxlen + self._reservoir_size

  def add(self, example: Example) -> None:
    with self._lock:
      if len(self._recent) == self._recent.maxlen:
        self._age(self._recent[0])
      self._recent.append(example)

  def _age(self, example: Example) -> None:
    self._aged += 1
    if len(self._reservoir) < self._reservoir_size:
      self._reservoir.append(example)
    else:
      slot = int(self._rng.integers(self._aged))
      if slot < self._reservoir_size:
        self._reservoir[slot] = example

  def examples(self) -> list[Example]:
    with self._lock:
      return self._reservoir + list(self._recent)

  def __len__(self) -> int:
    with self._lock:
      return len(self._reservoir) + len(self._recent)
