"""A request's answer length as the scheduler sees it: a log-normal distribution, or a known length.

Shape legend: N sequences, K future steps.

The length predictor gives each prompt a normal distribution of ``log(L + 1)`` (``mu``, ``sigma``),
L the answer's tokens; the oracle knows L (``sigma == 0``). What the scheduler asks of it is
always *conditional on what the request has generated*: a request that outlived its prediction
is re-predicted from the distribution given ``L >= n``, never by a fixed step.

Integer lengths: ``P(L >= x) = P(log(L + 1) > log(x + 0.5))`` (half a token of continuity), so a
known length is the limit of a narrow distribution around it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special


@dataclasses.dataclass(frozen=True, slots=True)
class LengthDist:
  """The answer's length L in tokens: ``log(L + 1) ~ Normal(mu, sigma)``; ``sigma == 0`` is exactly
  ``exp(mu) - 1`` (``LengthDist.exact``)."""

  mu: float
  sigma: float

  def __post_init__(self):
    if not (math.isfinite(self.mu) and math.isfinite(self.sigma) and self.sigma >= 0):
      raise ValueError(f"a length distribution needs a finite mu and a finite sigma >= 0, got {self.mu}, {self.sigma}")

  @classmethod
  def exact(cls, tokens: int) -> LengthDist:
    return cls(math.log1p(max(int(tokens), 0)), 0.0)

  @property
  def is_exact(self) -> bool:
    return self.sigma == 0.0

  @property
  def exact_tokens(self) -> int:
    return round(math.expm1(self.mu))

  def quantile_given(self, q: float, generated: int) -> int:
    """The ``q``-quantile of L given ``L >= generated``: the re-prediction of a request that has
    generated ``generated`` tokens (its prediction, for ``generated <= 0``)."""
    if self.is_exact:
      return max(self.exact_tokens, generated)
    # The length x whose survival is (1 - q) P(L >= generated), solved in log-survival space so
    # that it stays accurate far in the tail.
    z_known = (math.log(generated + 0.5) - self.mu) / self.sigma if generated > 0 else -math.inf
    log_known = float(special.log_ndtr(-z_known)) if generated > 0 else 0.0
    target = math.log1p(-q) + log_known
    if target > -700:
      z = -float(special.ndtri(math.exp(target)))
    else:  # beyond float range: the normal tail is exponential there, Q(z + d) / Q(z) ~ exp(-z d)
      z = z_known - math.log1p(-q) / z_known
    return max(generated, math.ceil(math.exp(self.mu + self.sigma * z) - 1.5))


def survival_given(mu: np.ndarray, sigma: np.ndarray, known: np.ndarray, at: np.ndarray, cap: np.ndarray) -> np.ndarray:
  """[N] distributions, [N] lengths reached, [N, K] lengths, [N] caps -> [N, K] ``P(L >= at | L >=
  known)``, 0 where ``at > cap`` (an answer stops at ``max_tokens``).

  A known length (``sigma == 0``) gives 1 up to it and 0 beyond.
  """
  mu, sigma = mu[:, None], sigma[:, None]
  known = np.maximum(known, 0)[:, None]
  exact = sigma == 0
  safe = np.where(exact, 1.0, sigma)
  log_sf = lambda x: np.where(x <= 0.5, 0.0, special.log_ndtr(-(np.log(np.maximum(x, 0.5) + 0.5) - mu) / safe))
  smooth = np.exp(np.minimum(log_sf(at) - log_sf(known), 0.0))
  length = np.round(np.expm1(mu))
  s = np.where(exact, (at <= np.maximum(length, known)).astype(float), smooth)
  return np.where(at > cap[:, None], 0.0, s)
