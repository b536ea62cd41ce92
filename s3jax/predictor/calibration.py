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
model trained without generator h predicts h's answers, for every h) and kept with the generator
each came from, so the level covers the error of guessing a new generator's typical length, not
only a prompt's, and narrows as the served model's own lengths are observed (shift.py).
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
# Probability that a cold head's shift-robust level keeps the served model's overflow rate at most
# its target (`Calibration.confidence`, shift.py).
DEFAULT_CONFIDENCE = 0.8
# `Calibration.cold_start` of `<any>` samples taken leave one generator out.
LEAVE_ONE_OUT = "leave-one-generator-out"
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
  dist: np.ndarray, level, max_length: int, rule: ReservationRule = ReservationRule.QUANTILE
) -> np.ndarray:
  """[B, 2] distributions -> [B] tokens to reserve at `level` (a float, or [B] one per request; 1 to
  `max_length`)."""
  dist = np.asarray(dist, np.float64)
  level = np.broadcast_to(np.asarray(level, np.float64), (len(dist),))
  finite = np.isfinite(level)
  if rule is ReservationRule.MIN_COST:
    tokens = _min_cost(dist, np.where(finite, level, 1.0), max_length)
  else:
    # The 1e-6 keeps float noise (exp(log(101)) - 1 = 100.00000000000001) from reserving a token more.
    with np.errstate(over="ignore"):
      exact = np.expm1(dist[:, 0] + np.where(finite, level, 0.0) * np.exp(dist[:, 1]))
    tokens = np.ceil(np.minimum(exact, max_length) - 1e-6)
  return np.where(finite, np.clip(tokens, 1, max_length), max_length).astype(np.int64)


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
    cold_start: how `<any>` was calibrated: `LEAVE_ONE_OUT`, "pooled" (its samples on the training
      generators' held-out prompts: a new generator will overflow more than asked), or `OBSERVED`
      (on the served model's own lengths: retrained online).
    max_length: the longest reservation.
    groups: head name -> [n] the left-out generator of each sample. A head with groups reserves by
      the shift-robust level (shift.py) while it is cold (`cold_start` is `LEAVE_ONE_OUT`).
    observed: head name -> [k, 3] the served model's own (mean, log scale, true tokens) under that
      cold head, newest last (`with_observed`): what narrows its shift-robust level.
    confidence: probability the shift-robust level keeps the served model's overflow rate at most
      its target.
  """

  samples: dict[str, np.ndarray]
  cold_start: str = "pooled"
  max_length: int = 2048
  groups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  observed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  confidence: float = DEFAULT_CONFIDENCE
  _scores: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  def shift_robust(self, generator: str) -> bool:
    """Whether `generator` reserves by the shift-robust level (shift.py)."""
    return generator in self.groups and self.cold_start == LEAVE_ONE_OUT

  def threshold(self, generator: str, max_under_rate: float, rule: ReservationRule = ReservationRule.QUANTILE) -> float:
    if self.shift_robust(generator) and rule is ReservationRule.QUANTILE:
      return self._shift(generator).level(self.observed_scores(generator), max_under_rate, self.confidence)
    return threshold_for(self.scores(generator, rule), max_under_rate)

  def scores(self, generator: str, rule: ReservationRule = ReservationRule.QUANTILE) -> np.ndarray:
    """The head's conformal scores under `rule` (computed once: MIN_COST's take a bisection)."""
    if (generator, rule) not in self._scores:
      s = self.samples[generator]
      self._scores[generator, rule] = conformal_scores(s[:, :2], s[:, 2], rule, self.max_length)
    return self._scores[generator, rule]

  def observed_scores(self, generator: str) -> np.ndarray:
    """[k] QUANTILE scores of the served model's observed lengths under a cold head."""
    s = self.observed.get(generator, np.zeros((0, 3)))
    return conformal_scores(s[:, :2], s[:, 2], ReservationRule.QUANTILE, self.max_length)

  def _shift(self, generator: str):
    from s3jax.predictor.shift import GeneratorShift  # shift.py reads this module's conformal rule

    if ("shift", generator) not in self._scores:
      self._scores["shift", generator] = GeneratorShift.from_scores(self.scores(generator), self.groups[generator])
    return self._scores["shift", generator]

  def residual_moments(self, generator: str) -> tuple[float, float]:
    """Mean and standard deviation of the head's held-out residuals ``(log(tokens + 1) - m) / s``:
    what turns its distribution into a calibrated one (``m + mean s``, ``std s``). A shift-robust
    head's are those of its offset's posterior given the observed lengths (shift.py)."""
    if self.shift_robust(generator):
      return self._shift(generator).moments(self.observed_scores(generator))
    if ("moments", generator) not in self._scores:
      s = self.samples[generator]
      z = (log_length(s[:, 2]) - s[:, 0]) * np.exp(-s[:, 1])
      self._scores["moments", generator] = (float(z.mean()), float(z.std())) if len(z) > 1 else (0.0, 1.0)
    return self._scores["moments", generator]

  def with_observed(self, generator: str, samples: np.ndarray) -> Calibration:
    """This calibration with [k, 3] more observed (mean, log scale, true tokens) of `generator`
    (this one unchanged: a swap installs the new one whole)."""
    old = self.observed.get(generator, np.zeros((0, 3)))
    both = np.concatenate([old, np.asarray(samples, np.float64).reshape(-1, 3)])
    return dataclasses.replace(self, observed={**self.observed, generator: both})

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(directory) / CALIBRATION_FILENAME
    as_lists = lambda d: {g: np.asarray(v).tolist() for g, v in d.items()}
    path.write_text(
      json.dumps(
        {
          "cold_start": self.cold_start,
          "max_length": self.max_length,
          "confidence": self.confidence,
          "groups": as_lists(self.groups),
          "observed": as_lists(self.observed),
          "samples": as_lists(self.samples),
        }
      )
      + "\n"
    )
    return path

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> Calibration:
    d = json.loads((pathlib.Path(directory) / CALIBRATION_FILENAME).read_text())
    triples = lambda m: {g: np.asarray(v, np.float64).reshape(-1, 3) for g, v in m.items()}
    return cls(
      samples=triples(d["samples"]),
      cold_start=d["cold_start"],
      max_length=d["max_length"],
      groups={g: np.asarray(v) for g, v in d.get("groups", {}).items()},
      observed=triples(d.get("observed", {})),
      confidence=d.get("confidence", DEFAULT_CONFIDENCE),
    )


def fit_calibration(
  generators: tuple[str, ...],
  dists: np.ndarray,
  lengths: np.ndarray,
  *,
  max_length: int,
  cold_start_samples: np.ndarray | None = None,
  cold_start_groups: np.ndarray | None = None,
) -> Calibration:
  """Every head's held-out samples on calibration prompts.

  Args:
    generators: the heads, `generators[0]` is `<any>`.
    dists: [P, G, 2] the heads' distributions on the calibration prompts.
    lengths: [P, G - 1] their true lengths (-1: not answered by that generator).
    max_length: the longest reservation.
    cold_start_samples: `<any>`'s leave-one-generator-out samples; without them `<any>` is sampled
      on every training generator's answers ("pooled").
    cold_start_groups: the left-out generator of each of them (the shift-robust level, shift.py).
  """
  samples = {}
  for g, name in enumerate(generators[1:], start=1):
    seen = lengths[:, g - 1] >= 0
    samples[name] = np.column_stack([dists[seen, g], lengths[seen, g - 1]])
  if cold_start_samples is not None:
    samples[generators[0]] = np.asarray(cold_start_samples, np.float64)
    groups = {} if cold_start_groups is None else {generators[0]: np.asarray(cold_start_groups)}
    return Calibration(samples=samples, cold_start=LEAVE_ONE_OUT, max_length=max_length, groups=groups)
  rows, cols = np.nonzero(lengths >= 0)
  samples[generators[0]] = np.column_stack([dists[rows, 0], lengths[rows, cols]])
  return Calibration(samples=samples, cold_start="pooled", max_length=max_length)
