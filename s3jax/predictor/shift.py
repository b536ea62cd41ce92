"""The cold start's margin for a served model unlike the training generators: shift-robust, and
narrowing with every observed length.

Shape legend: G training generators, N samples, K observations of the served model.

Under the QUANTILE rule a request's score is `z = (log(tokens + 0.5) - m) / s` (calibration.py): it
fits its reservation at every level >= z. Left one generator out, generator g's scores are
`a_g + e`: `a_g` its *offset* (how much longer g answers than the `<any>` head guesses, in units of
the head's scale) and `e` the per-prompt error. A new served model has an unknown offset `a`, and
the pooled conformal level (every generator's samples together) only keeps its promise on average
over generators: a model longer than most overflows far more than asked (BENCHMARKS.md, issue 30).

`GeneratorShift` keeps the two apart:

* a prior over `a`: a Gaussian kernel on each training generator's offset (Silverman's bandwidth),
  so an offset beyond every training generator's keeps some mass;
* the pooled within-generator errors `e`, whose conformal `(1 - alpha)` quantile `q` is the margin
  a request needs once the offset is known.

The level is `a_hi + q`, where `a_hi` is the `confidence` quantile of the offset's posterior given
the served model's observed scores (each kernel updated conjugately, errors of variance
`spread**2`): with that confidence the served model's overflow rate is at most `alpha`. With no
observation `a_hi` is an upper quantile of the generators' offsets (a wide margin); after K
observations the posterior narrows as `spread / sqrt(K)` around their mean.

A served model's per-prompt errors need not spread as the training generators' do (text-davinci-003,
whose answers are short, spreads wider: left out, it overflowed 0.18 at a 0.1 target after 50
observations with the pooled `q`). So once lengths are observed, `q` is the weighted conformal
quantile of the pooled errors and the served model's own residuals (its observed scores less the
offset's posterior mean), the residuals weighing `K / (K + OWN_ERRORS_PRIOR)` in all.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

from s3jax.predictor.calibration import DEFAULT_CONFIDENCE, threshold_for

# Observations at which the served model's own residuals weigh as much as every pooled error
# together. Left one generator out, 20 and 50 gave the same realised overflow after 50 observations
# within 0.01 (BENCHMARKS.md, cold start).
OWN_ERRORS_PRIOR = 20


@dataclasses.dataclass(frozen=True)
class GeneratorShift:
  """Offsets of the training generators and their pooled per-prompt errors (see the module doc).

  Attributes:
    offsets: [G] each left-out generator's mean score.
    errors: [N] every sample's score less its generator's offset.
    bandwidth: the prior kernels' standard deviation.
  """

  offsets: np.ndarray
  errors: np.ndarray
  bandwidth: float

  @classmethod
  def from_scores(cls, scores: np.ndarray, groups: np.ndarray) -> GeneratorShift:
    """[N] QUANTILE scores of leave-one-generator-out samples, [N] the generator of each."""
    scores, groups = np.asarray(scores, np.float64), np.asarray(groups)
    names = np.unique(groups)
    if len(names) < 2:
      raise ValueError("a shift-robust margin needs samples of at least two generators")
    offsets = np.array([scores[groups == g].mean() for g in names])
    errors = scores - offsets[np.searchsorted(names, groups)]
    bandwidth = 1.06 * offsets.std(ddof=1) * len(offsets) ** -0.2  # Silverman's rule
    return cls(offsets=offsets, errors=errors, bandwidth=float(bandwidth))

  @property
  def spread(self) -> float:
    """Standard deviation of the per-prompt errors (the likelihood of an observed score)."""
    return float(self.errors.std())

  def posterior(self, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """[K] observed scores -> the offset's posterior: [G] kernel weights, [G] means, their sd."""
    observed = np.asarray(observed, np.float64)
    k, h2, s2 = len(observed), self.bandwidth**2, self.spread**2
    if k == 0:
      return np.full(len(self.offsets), 1.0 / len(self.offsets)), self.offsets, self.bandwidth
    mean = observed.mean()
    precision = 1.0 / h2 + k / s2
    means = (self.offsets / h2 + k * mean / s2) / precision
    log_w = stats.norm.logpdf(mean, self.offsets, math.sqrt(h2 + s2 / k))
    w = np.exp(log_w - log_w.max())
    return w / w.sum(), means, float(precision**-0.5)

  def offset_bound(self, observed: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The `confidence` quantile of the offset's posterior (bisection on the mixture's CDF)."""
    w, means, sd = self.posterior(observed)
    lo, hi = means.min() - 10 * sd, means.max() + 10 * sd
    for _ in range(60):
      mid = (lo + hi) / 2
      below = float(w @ stats.norm.cdf(mid, means, sd)) < confidence
      lo, hi = (mid, hi) if below else (lo, mid)
    return hi

  def error_quantile(self, observed: np.ndarray, max_under_rate: float) -> float:
    """The margin `q` a request needs beyond the offset: the conformal quantile of the pooled errors,
    the served model's own residuals mixed in as they are observed (see the module doc)."""
    observed = np.asarray(observed, np.float64)
    k, n = len(observed), len(self.errors)
    if k == 0:
      return threshold_for(self.errors, max_under_rate)
    w, means, _ = self.posterior(observed)
    own = k / (k + OWN_ERRORS_PRIOR)
    values = np.concatenate([self.errors, observed - float(w @ means)])
    weights = np.concatenate([np.full(n, (1.0 - own) / n), np.full(k, own / k)])
    order = np.argsort(values)
    cdf = np.cumsum(weights[order])
    # As threshold_for: the (1 - alpha)(1 + 1 / samples) quantile, +inf when it is beyond them all.
    at = np.searchsorted(cdf, (1.0 - max_under_rate) * (1.0 + 1.0 / (n + k)) - 1e-12)
    return math.inf if at >= len(values) else float(np.nextafter(values[order][at], np.inf))

  def level(self, observed: np.ndarray, max_under_rate: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The QUANTILE level for the served model after its `observed` scores."""
    return self.offset_bound(observed, confidence) + self.error_quantile(observed, max_under_rate)

  def moments(self, observed: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of a new request's score: the calibrated distribution the
    scheduler's forecasts read (`m + mean s`, `sd s`)."""
    w, means, sd = self.posterior(observed)
    mean = float(w @ means)
    var_offset = float(w @ (means - mean) ** 2) + sd**2
    return mean, math.sqrt(self.spread**2 + var_offset)
