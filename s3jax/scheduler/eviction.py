"""Who is evicted when a decoded row needs a page and the pool has none free.

The policies that reserve nothing ahead (``Policy.reserves`` false) grant pages as rows cross page
boundaries; when a step needs more pages than are free, running sequences are evicted (their
pages freed, their KV recomputed when they resume) in the policy's victim order until the rest
fit. The sequence that needs the page is a candidate like any other: if it is chosen, its own
need goes with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class VictimCandidate:
  """A running sequence as victim orders see it.

  Attributes:
    admitted: the sequence number of its latest admission (fresh or resumed).
    prompt_len: its prompt's tokens.
    generated: tokens generated so far.
    pages: pages it holds.
    page_steps: pages x steps it is predicted to hold from now on (s3 and the oracle).
    finishing: predicted to end before the pages it would free matter (s3 and the oracle).
  """

  admitted: int
  prompt_len: int
  generated: int
  pages: int
  page_steps: float = 0.0
  finishing: bool = False


def newest_first(candidates: Sequence[VictimCandidate]) -> list[int]:
  """vLLM v1 (``vllm/v1/core/sched/scheduler.py``, ``self.running.pop()`` under FCFS): the most
  recently admitted request first."""
  return sorted(range(len(candidates)), key=lambda i: -candidates[i].admitted)


def fewest_generated_first(candidates: Sequence[VictimCandidate]) -> list[int]:
  """SGLang (``ScheduleBatch.retract_decode``): the fewest generated tokens first, ties the
  longest prompt (then the newest)."""
  return sorted(
    range(len(candidates)), key=lambda i: (candidates[i].generated, -candidates[i].prompt_len, -candidates[i].admitted)
  )


def least_waste_first(candidates: Sequence[VictimCandidate]) -> list[int]:
  """s3: the sequence whose recompute wastes least per page-step it frees first.

  Evicting a sequence throws away the KV of its ``prompt_len + generated`` tokens (recomputed on
  resume) and frees its pages for as long as it would have held them: its predicted page-steps.
  A sequence about to finish frees its pages soon anyway, so evicting it buys almost nothing for
  all its work: sequences marked ``finishing`` come last, whatever their score.
  """
  waste = np.array([c.prompt_len + c.generated for c in candidates], float)
  freed = np.array([c.page_steps for c in candidates], float)
  score = waste / np.maximum(freed, 1e-9)
  return sorted(range(len(candidates)), key=lambda i: (candidates[i].finishing, score[i], -candidates[i].admitted))
