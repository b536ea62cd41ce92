"""From a length distribution to a reservation: two rules, a calibrated margin, and the cold start.

Shape legend: B batch, R candidate reservations.

The model gives each prompt a log-normal distribution of its answer's length (mean `m` and scale `s`
of `log(tokens + 1)`). A `ReservationRule` turns it into tokens to reserve at a *level*:

* QUANTILE reserves `exp(m + q s) - 1`: every request at the same quantile of its own distribution.
* MIN_COST reserves `argmin_r r + lam * P(length > r)`: the fewest expected reserved tokens for the
  overflows it allows (the Lagrangian of "reserve least subject to an overflow rate"). It reserves
  tightly where the distribution is narrow and gives up early on prompts whose answer could be
  anything, which a common quantile cannot do.

Both are monotone in their level, so each calibration request has a score, the smallest level at
which it does not overflow, and taking the level at the `ceil((n + 1)(1 - alpha))`-th smallest of `n`
held-out scores keeps the overflow rate at or below `alpha` for new requests exchangeable with them
(split conformal). The held-out samples (`m`, `s`, true length) are stored, so any rule and target can
be chosen at load time.

A newly served model is not exchangeable with the generators the model was trained on: its typical
length is unknown. The `<any>` head's samples are therefore taken **leave one generator out** (a
model trained without generator h predicts h's answers, for every h), so the level covers the error
of guessing a new generator's typical length, not only a prompt's. Once the served model's own
lengths are observed, `adapt` estimates its offset from them and calibrates on them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import pathlib

import numpy as np
from scipy import stats

CALIBRATION_FILENAME = "calibration.json"
# Observations needed before a cold-started head calibrates on its own lengths (below this the
# leave-one-generator-out samples are used; see `adapt`).
MIN_ADAPT_OBSERVATIONS = 20
# Pseudo-observations of offset 0 that `adapt` shrinks the estimated offset towards.
OFFSET_PRIOR_COUNT = 2.0
# `Calibration.cold_start` of a head calibrated on the served model's own observed lengths.
OBSERVED = "observed"


class ReservationRule(enum.Enum):
  QUANTILE = "quantile"
  MIN_COST = "min_cost"


def effective_rule(rule: ReservationRule, cold: bool) -> ReservationRule:
  """`rule`, except QUANTILE for a cold-started head that has not yet calibrated on its own lengths.

  Its error is mostly one offset shared by every request (the new generator's typical length), and
  MIN_COST, built for independent per-request errors, answers a wide distribution by giving up on
  the request: under a shared offset that gives up on, or over-covers, whole generators at once.
  """
  return ReservationRule.QUANTILE if cold else rule


def log_length(tokens) -> np.ndarray:
  return np.log1p(np.maximum(np.asarray(tokens, np.float64), 0.0))


@functools.cache
def _candidates(max_length: int) -> np.ndarray:
  """[R] reservations MIN_COST chooses from: 1 token to `max_length`, spaced by about 2%."""
  return np.unique(np.round(np.geomspace(1, max_length, 400))).astype(np.int64)


def _min_cost(dist: np.ndarray, lam: np.ndarray, max_length: int) -> np.ndarray:
  """[B, 2], [B] levels -> [B] the candidate minimising `r + lam * P(length > r)`."""
  r = _candidates(max_length)
  z = (np.log1p(r)[None] - dist[:, :1]) * np.exp(-dist[:, 1:])  # [B, R]
  cost = r[None] + np.asarray(lam, np.float64).reshape(-1, 1) * stats.norm.sf(z)
  return r[np.argmin(cost, axis=1)]


def reserved_answer_tokens(
  dist: np.ndarray, level: float, max_length: int, rule: ReservationRule = ReservationRule.QUANTILE
) -> np.ndarray:
  """[B, 2] distributions -> [B] tokens to reserve at `level` (1 to `max_length`)."""
  dist = np.asarray(dist, np.float64)
  if math.isinf(level):
    return np.full(len(dist), max_length, np.int64)
  if rule is ReservationRule.MIN_COST:
    return _min_cost(dist, np.full(len(dist), level), max_length)
  tokens = np.expm1(dist[:, 0] + level * np.exp(dist[:, 1]))
  # The 1e-6 keeps float noise (exp(log(101)) - 1 = 100.00000000000001) from reserving a token more.
  return np.clip(np.ceil(np.minimum(tokens, max_length) - 1e-6), 1, max_length).astype(np.int64)


def conformal_scores(
  dist: np.ndarray, lengths: np.ndarray, rule: ReservationRule = ReservationRule.QUANTILE, max_length: int = 2048
) -> np.ndarray:
  """[B, 2], [B] true tokens -> [B] the smallest level at which each request fits its reservation."""
  dist = np.asarray(dist, np.float64)
  true = np.minimum(np.asarray(lengths, np.float64), max_length)
  if rule is ReservationRule.QUANTILE:
    # Integer reservations: from this score on, exp(m + q s) - 1 >= L - 0.5 rounds up to L or more
    # (half a token from the float edge at L - 1).
    return (np.log(true + 0.5) - dist[:, 0]) * np.exp(-dist[:, 1])
  # MIN_COST: bisection on log(level); the reservation is non-decreasing in the level. A request far
  # in its distribution's tail fits at no level (its survival underflows): score +inf.
  lo, hi = np.full(len(true), -5.0), np.full(len(true), 30.0)
  reachable = _min_cost(dist, np.exp(hi), max_length) >= true
  for _ in range(40):
    mid = (lo + hi) / 2
    fits = _min_cost(dist, np.exp(mid), max_length) >= true
    hi, lo = np.where(fits, mid, hi), np.where(fits, lo, mid)
  return np.where(reachable, np.exp(hi), np.inf)


def threshold_for(scores: np.ndarray, max_under_rate: float) -> float:
  """The level whose overflow rate is at most `max_under_rate` (conformal).

  Returns +inf (reserve the maximum) when there are too few scores to certify the target.
  """
  if not 0.0 < max_under_rate < 1.0:
    raise ValueError(f"max_under_rate must be in (0, 1), got {max_under_rate}")
  s = np.sort(np.asarray(scores, dtype=np.float64))
  k = math.ceil((len(s) + 1) * (1.0 - max_under_rate))
  if k > len(s):
    return math.inf
  return float(np.nextafter(s[max(k, 1) - 1], np.inf))


def expected_tokens(dist: np.ndarray) -> np.ndarray:
  """[B, 2] -> [B] mean of the log-normal, in tokens (a ranking score, e.g. shortest-first)."""
  return np.expm1(dist[:, 0] + 0.5 * np.exp(2 * dist[:, 1]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
  """Held-out samples per generator head, saved beside a checkpoint.

  Attributes:
    samples: head name -> [n, 3] (mean, log scale, true tokens) of held-out requests; `<any>`'s are
      leave one generator out where `cold_start` says so.
    cold_start: how `<any>` was calibrated: "leave-one-generator-out", "pooled" (its samples on the
      training generators' held-out prompts: a new generator will overflow more than asked), or
      `OBSERVED` (on the served model's own lengths: adapted, or retrained online).
    max_length: the longest reservation.
  """

  samples: dict[str, np.ndarray]
  cold_start: str = "pooled"
  max_length: int = 2048
  _scores: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  def threshold(self, generator: str, max_under_rate: float, rule: ReservationRule = ReservationRule.QUANTILE) -> float:
    return threshold_for(self.scores(generator, rule), max_under_rate)

  def scores(self, generator: str, rule: ReservationRule = ReservationRule.QUANTILE) -> np.ndarray:
    """The head's conformal scores under `rule` (computed once: MIN_COST's take a bisection)."""
    if (generator, rule) not in self._scores:
      s = self.samples[generator]
      self._scores[generator, rule] = conformal_scores(s[:, :2], s[:, 2], rule, self.max_length)
    return self._scores[generator, rule]

  def residual_moments(self, generator: str) -> tuple[float, float]:
    """Mean and standard deviation of the head's held-out residuals ``(log(tokens + 1) - m) / s``:
    what turns its distribution into a calibrated one (``m + mean s``, ``std s``)."""
    if ("moments", generator) not in self._scores:
      s = self.samples[generator]
      z = (log_length(s[:, 2]) - s[:, 0]) * np.exp(-s[:, 1])
      self._scores["moments", generator] = (float(z.mean()), float(z.std())) if len(z) > 1 else (0.0, 1.0)
    return self._scores["moments", generator]

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(directory) / CALIBRATION_FILENAME
    path.write_text(
      json.dumps(
        {
          "cold_start": self.cold_start,
          "max_length": self.max_length,
          "samples": {g: np.asarray(v, np.float64).tolist() for g, v in self.samples.items()},
        }
      )
      + "\n"
    )
    return path

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> Calibration:
    d = json.loads((pathlib.Path(directory) / CALIBRATION_FILENAME).read_text())
    return cls(
      samples={g: np.asarray(v, np.float64).reshape(-1, 3) for g, v in d["samples"].items()},
      cold_start=d["cold_start"],
      max_length=d["max_length"],
    )


def fit_calibration(
  generators: tuple[str, ...],
  dists: np.ndarray,
  lengths: np.ndarray,
  *,
  max_length: int,
  cold_start_samples: np.ndarray | None = None,
) -> Calibration:
  """Every head's held-out samples on calibration prompts.

  Args:
    generators: the heads, `generators[0]` is `<any>`.
    dists: [P, G, 2] the heads' distributions on the calibration prompts.
    lengths: [P, G - 1] their true lengths (-1: not answered by that generator).
    max_length: the longest reservation.
    cold_start_samples: `<any>`'s leave-one-generator-out samples; without them `<any>` is sampled
      on every training generator's answers ("pooled").
  """
  samples = {}
  for g, name in enumerate(generators[1:], start=1):
    seen = lengths[:, g - 1] >= 0
    samples[name] = np.column_stack([dists[seen, g], lengths[seen, g - 1]])
  if cold_start_samples is not None:
    samples[generators[0]] = np.asarray(cold_start_samples, np.float64)
    return Calibration(samples=samples, cold_start="leave-one-generator-out", max_length=max_length)
  rows, cols = np.nonzero(lengths >= 0)
  samples[generators[0]] = np.column_stack([dists[rows, 0], lengths[rows, cols]])
  return Calibration(samples=samples, cold_start="pooled", max_length=max_length)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adaptation:
  """A cold-started head fitted to a served model's first observed lengths.

  Attributes:
    offset: added to the `<any>` head's mean log length (the served model's typical length relative
      to the training generators').
    calibration: one head, `<any>`: leave-one-out samples of the observations themselves once there
      are `MIN_ADAPT_OBSERVATIONS`, else the cold-start samples.
    observations: how many lengths it was fitted to.
  """

  offset: float
  calibration: Calibration
  observations: int


def adapt(dist: np.ndarray, lengths: np.ndarray, cold_start: Calibration, head: str) -> Adaptation:
  """Fits the served model's offset from N observations of the `<any>` head.

  Args:
    dist: [N, 2] the `<any>` head's distributions for the observed prompts.
    lengths: [N] their true output tokens.
    cold_start: the predictor's calibration (its `head` samples are used while N is small).
    head: the cold-start head's name.

  The offset is the mean residual `log(tokens + 1) - m`, shrunk towards 0 by `OFFSET_PRIOR_COUNT`
  pseudo-observations. Each observation's sample is shifted by the offset fitted to the *other*
  observations, so the samples carry the offset's estimation error the way a new request does.
  """
  dist = np.asarray(dist, np.float64)
  resid = log_length(lengths) - dist[:, 0]
  n = len(resid)
  offset = float(resid.sum() / (n + OFFSET_PRIOR_COUNT))
  if n < MIN_ADAPT_OBSERVATIONS:
    calib = Calibration(
      samples={head: cold_start.samples[head]}, cold_start=cold_start.cold_start, max_length=cold_start.max_length
    )
  else:
    loo_offset = (resid.sum() - resid) / (n - 1 + OFFSET_PRIOR_COUNT)
    samples = np.column_stack([dist[:, 0] + loo_offset, dist[:, 1], lengths])
    calib = Calibration(samples={head: samples}, cold_start=OBSERVED, max_length=cold_start.max_length)
  return Adaptation(offset=offset, calibration=calib, observations=n)
