"""Peak-aware admission: the pages the running sequences will hold over the coming steps.

Shape legend: N sequences, K future steps (the forecast's grid).

After this step's plan a sequence has ``n`` tokens (prompt + generated, ``g`` of them generated).
In the plan ``k`` steps later it decodes position ``n - 2 + k``, holding ``m(k) = ceil((n - 1 +
k) / page_size)`` pages, if it has not ended by then: with its results read ``lag`` plans late
(the engine's pipeline depth), that is when ``L >= g + k - lag``, and never past ``max_tokens``.
So its pages at step ``k`` are ``m(k)`` with probability ``s(k) = P(L >= g + k - lag | what it
has generated)``, else 0: a request that finishes early frees its pages for the others.

Summed over independent sequences, the pool's use at step ``k`` has mean ``sum s m`` and variance
``sum s (1 - s) m^2``. A candidate is admitted when, with it, ``mean + z sqrt(variance)`` stays
within the pool at every step of the grid, ``z`` the normal quantile of ``1 - risk``: the
predicted *peak* of future use fits, at the configured risk. With known lengths (the oracle) the
variance is 0 and the test is exact: the use only drops when a sequence ends, so its peaks are
at the last step before an end (a known length's or ``max_tokens``'), and the grid holds each.

With prefix caching a page several sequences read is counted once: each sequence's ``m(k)``
leaves out its cached prefix pages, and the forecast holds those pages throughout (a constant
term, conservative: a shared page is freed only when its last reader ends).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Sequence

import numpy as np

from s3jax.scheduler.length import LengthDist, survival_given

# Geometric steps of the grid, from 1 to the model's maximum length: at 48 points each step is
# about 17% beyond the previous one, finer than the spread of any predicted length distribution.
GRID_POINTS = 48


@functools.cache
def _grid(max_len: int) -> np.ndarray:
  return np.unique(np.round(np.geomspace(1, max_len, GRID_POINTS)))


@dataclasses.dataclass(frozen=True, slots=True)
class SeqForecast:
  """What the forecast needs of one sequence, as it will be after this step's plan.

  Attributes:
    tokens: n, prompt + generated tokens.
    generated: g.
    max_tokens: its cap on generated tokens.
    length: its answer-length distribution.
    shared_pages: its pages counted among the forecast's ``shared_pages`` instead (a cached
      prefix).
  """

  tokens: int
  generated: int
  max_tokens: int
  length: LengthDist
  shared_pages: int = 0


class PeakForecast:
  """Mean and variance of the pool's pages at each step of a grid, as sequences are added."""

  def __init__(
    self,
    running: Sequence[SeqForecast],
    candidates: Sequence[SeqForecast],
    *,
    num_pages: int,
    page_size: int,
    max_len: int,
    risk: float,
    lag: int,
    shared_pages: int = 0,
  ):
    """Builds the forecast of ``running``; ``candidates`` are the sequences ``fits`` may be asked
    about (their known ends join the grid). ``shared_pages``: cached prefix pages in use, held at
    every step of the forecast (they may outlive the sequences that read them)."""
    self.num_pages, self.page_size, self.lag = num_pages, page_size, lag
    self.z = statistics.NormalDist().inv_cdf(1.0 - risk)
    # The last step each sequence may hold its pages: at ``max_tokens``, and at a known end.
    seqs = (*running, *candidates)
    ends = [s.max_tokens - s.generated for s in seqs]
    ends += [s.length.exact_tokens - s.generated + lag for s in seqs if s.length.is_exact]
    self.steps = np.union1d(_grid(max_len), np.clip(ends, 1, max_len)).astype(np.int64)  # [K]
    self.pages, self.alive = self.rows(running)  # [N, K] each
    self.mean, self.var, self.worst = self._moments(self.pages, self.alive)
    self.share(shared_pages)

  def share(self, pages: int) -> None:
    """``pages`` more cached prefix pages are held from now on."""
    self.mean, self.worst = self.mean + pages, self.worst + pages

  def rows(self, seqs: Sequence[SeqForecast]) -> tuple[np.ndarray, np.ndarray]:
    """[N] sequences -> [N, K] pages held at each step if still running, and the probability it is."""
    if not seqs:
      empty = np.zeros((0, len(self.steps)))
      return empty, empty
    n = np.array([s.tokens for s in seqs])[:, None]
    g = np.array([s.generated for s in seqs])
    shared = np.array([s.shared_pages for s in seqs])[:, None]
    pages = np.maximum(-(-(n - 1 + self.steps[None]) // self.page_size) - shared, 0)
    # A decode past ``max_tokens`` never happens (the release is exact, without a late read).
    alive = survival_given(
      np.array([s.length.mu for s in seqs]),
      np.array([s.length.sigma for s in seqs]),
      np.maximum(g - self.lag, 1),
      g[:, None] + self.steps[None] - self.lag,
      np.array([s.max_tokens for s in seqs]) - self.lag,
    )
    return pages.astype(float), alive

  @staticmethod
  def _moments(pages: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, K] -> [K] mean, variance and worst case (every sequence that may run, running)."""
    return (alive * pages).sum(axis=0), (alive * (1 - alive) * pages**2).sum(axis=0), ((alive > 0) * pages).sum(axis=0)

  def peak(self, extra: SeqForecast | None = None) -> float:
    """The predicted peak of the pool's use, in pages, at the risk level (``extra`` added), never
    above the worst case: a sequence alone that fits the pool always fits."""
    mean, var, worst = self.mean, self.var, self.worst
    if extra is not None:
      m, v, w = self._moments(*self.rows([extra]))
      mean, var, worst = mean + m, var + v, worst + w
    return float(np.max(np.minimum(mean + self.z * np.sqrt(var), worst), initial=0.0))

  def fits(self, seq: SeqForecast, shared_pages: int = 0) -> bool:
    """Whether the running sequences' predicted peak, with ``seq`` and ``shared_pages`` more
    cached pages added, fits the pool."""
    return self.peak(seq) + shared_pages <= self.num_pages

  def add(self, seq: SeqForecast) -> None:
    m, v, w = self._moments(*self.rows([seq]))
    self.mean, self.var, self.worst = self.mean + m, self.var + v, self.worst + w

  def page_steps(self) -> np.ndarray:
    """[N] the pages x steps each running sequence is predicted to hold from now on (the
    trapezoid rule over the grid, from step 0)."""
    held = self.alive * self.pages
    steps = np.concatenate([[0], self.steps])
    held = np.concatenate([held[:, :1], held], axis=1)
    return ((held[:, 1:] + held[:, :-1]) / 2 * np.diff(steps)[None]).sum(axis=1)
