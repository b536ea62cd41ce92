"""Who is evicted when a decoded row needs a page and the pool has none free.

The policies that reserve nothing ahead (``Policy.reserves`` false) grant pages as rows cross page
boundaries; when a step needs more pages than are free, running sequences are evicted (their
pages freed, their KV recomputed when they resume) in the policy's victim order until the rest
fit. The sequence that needs the page is a candidate like any other: if it is chosen, its own
need goes with it. s3 and the oracle first try pausing (``rows_to_pause``): a row that skips a
step keeps its KV, where an evicted one recomputes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from s3jax.scheduler.config import Policy
from s3jax.scheduler.peak import PeakForecast
from s3jax.scheduler.sequence import Seq

# The most steps in a row a row is paused for want of a page before eviction takes over: a pause
# costs the row one step, an eviction its whole context's prefill (about 12 decode steps of a
# 500-token context on the development CPU, 1.2 ms a token against 50 ms a step).
HOLD_STEPS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class VictimCandidate:
  """A running sequence as victim orders see it.

  Attributes:
    admitted: the sequence number of its latest admission (fresh or resumed).
    prompt_len: its prompt's tokens.
    generated: tokens generated so far.
    pages: pages it alone holds (freed if it is evicted).
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


VICTIM_ORDERS = {
  Policy.ON_DEMAND: newest_first,
  Policy.ADAPTIVE: fewest_generated_first,
  Policy.S3: least_waste_first,
  Policy.ORACLE: least_waste_first,
}


def rows_to_pause(
  running: list[Seq], needy: list[Seq], forecast: PeakForecast, short: int, freed: Sequence[int]
) -> list[Seq]:
  """s3 and the oracle: ``short`` of the ``needy`` rows (those that need a page this step) to
  pause, when the forecast expects the rows that go on decoding to end within ``HOLD_STEPS``
  steps and free that many pages (``freed``: the pages each running sequence alone holds, freed
  when it ends); none if it does not.

  A paused row keeps its KV and skips this step's decode (a step lost for it); an eviction
  would recompute its whole context. No row is paused more than ``HOLD_STEPS`` steps in a row,
  so a forecast that is wrong ends in evictions, not in a stall. The rows paused are those
  predicted to run longest (they lose least, relative to their time left).
  """
  n = len(running)  # the forecast's first sequences; prompts being prefilled in chunks may follow
  remaining = forecast.page_steps()[:n]
  pausable = [i for i, s in enumerate(running) if s in needy and s.held_steps < HOLD_STEPS]
  paused = sorted(pausable, key=lambda i: -remaining[i])[:short]
  if len(paused) < short:
    return []
  k = min(int(np.searchsorted(forecast.steps, HOLD_STEPS)), len(forecast.steps) - 1)
  ending = 1.0 - forecast.alive[:n, k]  # a paused row cannot end: it does not decode
  ending[paused] = 0.0
  if float((ending * np.asarray(freed)).sum()) < short:
    return []
  return [running[i] for i in paused]


def choose_victims(
  policy: Policy,
  running: list[Seq],
  needy: list[Seq],
  free_pages: int,
  forecast: PeakForecast | None,
  freed: Sequence[int],
) -> list[Seq]:
  """The running sequences to evict, in the policy's victim order, until the pages the ``needy``
  rows start this step are free (a victim's own need leaves with it). ``freed``: the pages each
  running sequence alone holds (pages it shares with others stay in use)."""
  candidates = [
    VictimCandidate(admitted=s.admitted, prompt_len=s.req.prompt_len, generated=s.generated, pages=n)
    for s, n in zip(running, freed)
  ]
  if forecast is not None:
    # Finishing: more likely than not to have ended before a page it frees could be reused.
    soon = forecast.alive[: len(running), np.searchsorted(forecast.steps, forecast.lag + 1)] < 0.5
    candidates = [
      dataclasses.replace(c, page_steps=float(p), finishing=bool(f))
      for c, p, f in zip(candidates, forecast.page_steps(), soon)
    ]
  need, needs, victims = len(needy), {id(s) for s in needy}, []
  for i in VICTIM_ORDERS[policy](candidates):
    seq = running[i]
    victims.append(seq)
    free_pages += freed[i]
    need -= id(seq) in needs
    if need <= free_pages:
      break
  return victims
