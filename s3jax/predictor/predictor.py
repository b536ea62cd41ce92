"""`LengthPredictor`: the serving-side API of the output-length predictor.

Shape legend: B batch, T tokens, G generator heads, N buckets.

The engine calls `reserve_tokens` on every batch of arrivals, so the forward pass is one jitted pure
function of `(params, ids, mask)` compiled ahead of time for a few padded shapes (batch in
`BATCH_SHAPES`, tokens in `tokenizer.TOKEN_SHAPES` up to `max_tokens`); `num_compilations` lets
callers check that steady-state serving never recompiles. Larger batches are grouped by padded prompt
length and split into chunks of the batch shapes.

Thread-safety: prediction may be called from several threads; compilation is guarded by a lock and
the executables themselves are thread-safe.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from s3jax.assets import PREDICTOR_DIR
from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import (
  OBSERVED,
  Calibration,
  ReservationRule,
  effective_rule,
  expected_tokens,
  fit_calibration,
  reserved_answer_tokens,
  threshold_for,
)
from s3jax.predictor.checkpoint import load_checkpoint, save_checkpoint
from s3jax.predictor.data import DEFAULT_GENERATOR
from s3jax.predictor.model import ANY_GENERATOR, LengthModel, LengthModelConfig
from s3jax.predictor.tokenizer import TOKEN_SHAPES, PromptTokenizer

BATCH_SHAPES = (1, 8, 32)
DEFAULT_CHECKPOINT = PREDICTOR_DIR / DEFAULT_GENERATOR


def head_key(served_model: str | None) -> str:
  """What a head's name is matched against: the served model's last path component, lower case."""
  return pathlib.PurePath(str(served_model or "")).name.lower()


def shipped_checkpoint_for(served_model: str | None) -> pathlib.Path:
  """The shipped checkpoint (under ``checkpoints/predictor/``) with a head named like
  ``served_model`` (``head_key``), else ``DEFAULT_CHECKPOINT``."""
  name = head_key(served_model)
  for path in [DEFAULT_CHECKPOINT, *sorted(p.parent for p in PREDICTOR_DIR.glob("*/config.json"))]:
    config = path / "config.json"
    if config.is_file() and name in (g.lower() for g in json.loads(config.read_text())["model"]["generators"]):
      return path
  return DEFAULT_CHECKPOINT


# Overflow rate the reservation is calibrated to when none is asked for: one request in five outgrows
# its reservation and is re-bucketed (a page-table write in the paged engine, unless memory is full).
DEFAULT_MAX_UNDER_RATE = 0.2


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictorVersion:
  """Parameters and the calibration fitted to them: what a prediction reads, swapped in whole.

  Attributes:
    state: the model's parameters (an `nnx.State`).
    calibration: held-out samples of these parameters' predictions.
    number: 0 for the loaded checkpoint, then one more for each version online retraining installs.
  """

  state: nnx.State
  calibration: Calibration
  number: int = 0


class LengthPredictor:
  """Predicts each prompt's output length, and what to reserve for it, for one served model.

  Attributes:
    buckets: the `BucketScheme` reservations are labelled with (metrics, logs, the paper's buckets).
    generator: the head in use (the served model's), or `ANY_GENERATOR` for a model with no observed
      lengths (the cold start).
    max_under_rate: overflow rate the reservations are calibrated to.
    rule: how a distribution becomes a reservation (calibration.ReservationRule).
    max_length: the longest reservation (the scheme's last bound).
    live: the `PredictorVersion` (parameters and calibration) predictions read; `swap` replaces it.
  """

  def __init__(
    self,
    model: LengthModel,
    *,
    buckets: BucketScheme,
    calibration: Calibration,
    generator: str = ANY_GENERATOR,
    max_under_rate: float = DEFAULT_MAX_UNDER_RATE,
    rule: ReservationRule = ReservationRule.MIN_COST,
    meta: dict | None = None,
  ):
    self.buckets = buckets
    self.meta = dict(meta or {})
    self.max_length = buckets.max_length
    self._cfg = model.cfg
    self._tok = PromptTokenizer(max_tokens=model.cfg.max_tokens)
    self.generator = self._check_generator(generator)
    self.max_under_rate = max_under_rate
    threshold_for([0.0], max_under_rate)  # validates the rate
    self.rule = ReservationRule(rule)
    # Split once; the jitted function is pure in (state, inputs), so new parameters of the same
    # shapes (`swap`) run on the same executables.
    self._graphdef, state = nnx.split(model)
    # Device arrays: immutable (checkpoints load as NumPy, which an in-place write would change under
    # every copy of the state) and not sent to the device again at every call.
    state = jax.tree.map(jnp.asarray, state)
    self.head_graphdef = nnx.split(model.head)[0]  # the head alone (online retraining tunes it)
    self.embedding_width = model.encoder.cfg.hidden_size
    self.live = PredictorVersion(state=state, calibration=calibration, number=self.meta.get("version", 0))

    def forward(state, ids, mask):  # [B, T], [B, T] -> [B, G, 2], [B, D]
      # Every head at once: one executable per shape serves all generators; the pooled embedding
      # is what online retraining fits the head on.
      model = nnx.merge(self._graphdef, state)
      pooled = model.embed(ids, mask)
      return model.head(pooled)[0], pooled

    self._jit_forward = jax.jit(forward)
    self._executables: dict[tuple[int, int], object] = {}
    self._lock = threading.Lock()
    self._swap_lock = threading.Lock()  # `observe` reads, recalibrates and swaps as one step

  # Construction and persistence.

  @classmethod
  def load(
    cls,
    path: str | pathlib.Path,
    *,
    generator: str | None = None,
    max_under_rate: float | None = None,
    rule: ReservationRule | str | None = None,
  ) -> LengthPredictor:
    """Loads a checkpoint written by `save` (or scripts/train_predictor.py).

    Args:
      path: checkpoint directory.
      generator: head to use; default: the checkpoint's default generator.
      max_under_rate: overflow target; default: the checkpoint's (else `DEFAULT_MAX_UNDER_RATE`).
      rule: reservation rule; default: the checkpoint's.
    """
    model, scheme, calib, config = load_checkpoint(path)
    return cls(
      model,
      buckets=scheme,
      calibration=calib,
      generator=generator or config["default_generator"],
      max_under_rate=max_under_rate or config.get("max_under_rate", DEFAULT_MAX_UNDER_RATE),
      rule=rule or config.get("reservation_rule", ReservationRule.MIN_COST.value),
      meta=config,
    )

  @classmethod
  def load_default(cls, served_model: str | None = None, **kwargs) -> LengthPredictor:
    """A committed predictor: the shipped checkpoint with a head of ``served_model``'s own (as
    ``head_for`` matches it, e.g. SmolLM2-135M-Instruct's), else the one trained on 15 public
    LLMs' answers (whose ``<any>`` head serves a model with no observed lengths)."""
    return cls.load(shipped_checkpoint_for(served_model), **kwargs)

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    meta = {
      **self.meta,
      "default_generator": self.generator,
      "max_under_rate": self.max_under_rate,
      "reservation_rule": self.rule.value,
    }
    meta.pop("model", None)
    live = self.live
    return save_checkpoint(
      path,
      nnx.merge(self._graphdef, live.state),
      scheme=self.buckets,
      calibration=live.calibration,
      meta={**meta, "version": live.number},
    )

  @property
  def calibration(self) -> Calibration:
    return self.live.calibration

  @property
  def config(self) -> LengthModelConfig:
    return self._cfg

  def head_params(self, version: PredictorVersion | None = None) -> nnx.State:
    """A copy of the head's parameters in `version` (default: the serving one): what online
    retraining tunes. A copy: changing it must not change what is serving."""
    return nnx.state(nnx.merge(self._graphdef, (version or self.live).state, copy=True).head)

  def with_head_params(
    self, head: nnx.State, calibration: Calibration, version: PredictorVersion | None = None
  ) -> PredictorVersion:
    """`version` (default: the serving one) with `head` as its head's parameters and `calibration`,
    numbered one more: ready to `swap` in."""
    base = version or self.live
    model = nnx.merge(self._graphdef, base.state, copy=True)  # `base` itself stays as it is
    nnx.update(model.head, head)
    return PredictorVersion(state=nnx.split(model)[1], calibration=calibration, number=base.number + 1)

  def head_dist_fn(self):
    """The served head as a pure function ``(head parameters, [B, D] pooled) -> [B, 2]`` (online
    retraining trains and judges it)."""
    graph, column = self.head_graphdef, self.generators.index(self.generator)
    return lambda head, pooled: nnx.merge(graph, head)(pooled)[0][:, column]

  def head_learning_mask(self, head: nnx.State) -> nnx.State:
    """1 where online retraining may change `head`, else 0. Only the served generator's offset,
    slope and spread learn (3 numbers): the shared trunk and demand score, trained on 15 generators,
    stay. A few hundred observations refit a generator's scale well; with its 512-number correction
    kernel too, the candidates overfit and lost to the serving version on the held-back requests."""
    column = self.generators.index(self.generator)

    def own(path, leaf):  # 1 on the served generator's row of its own parameters, else 0
      if not any(k in jax.tree_util.keystr(path) for k in ("loc", "slope", "log_scale")):
        return jnp.zeros_like(leaf)
      row = jnp.zeros(leaf.shape[0], leaf.dtype).at[column].set(1)
      return jnp.broadcast_to(row.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf.shape)

    return jax.tree_util.tree_map_with_path(own, head)

  def swap(self, version: PredictorVersion) -> None:
    """Installs new parameters and calibration at once: a prediction reads one version or the
    other, never a mix. The parameters must have the current ones' shapes (nothing compiles)."""
    old = jax.tree.map(lambda a: (a.shape, a.dtype), self.live.state)
    if jax.tree.map(lambda a: (a.shape, a.dtype), version.state) != old:
      raise ValueError("swap needs parameters of the same shapes as the current ones")
    with self._swap_lock:
      self.live = version

  def with_options(
    self, generator: str | None = None, max_under_rate: float | None = None, rule: ReservationRule | str | None = None
  ) -> LengthPredictor:
    """The same parameters and executables with another head, overflow target or rule (this one
    unchanged)."""
    clone = object.__new__(LengthPredictor)
    clone.__dict__.update(self.__dict__)  # shares the parameters, executables and their lock
    clone.generator = self._check_generator(generator or self.generator)
    clone.max_under_rate = max_under_rate or self.max_under_rate
    threshold_for([0.0], clone.max_under_rate)
    clone.rule = ReservationRule(rule or self.rule)
    return clone

  def calibrated(
    self, prompts: Sequence[str], lengths: np.ndarray, *, cold_start: tuple[np.ndarray, Sequence[str]] | None = None
  ) -> LengthPredictor:
    """This predictor with every head calibrated on held-out `prompts` and their [P, G - 1] true
    `lengths` (-1: not answered), and `<any>` on `cold_start`, its leave-one-generator-out samples
    and the generator of each, when given (see calibration.fit_calibration). The same parameters
    and executables; this one unchanged."""
    samples, groups = cold_start if cold_start is not None else (None, None)
    calibration = fit_calibration(
      self.generators,
      self.predict_dist_all(prompts),
      np.asarray(lengths),
      max_length=self.max_length,
      cold_start_samples=samples,
      cold_start_groups=groups,
    )
    clone = self.with_options()
    clone.live = dataclasses.replace(self.live, calibration=calibration)
    return clone

  def head_for(self, served_model: str | None) -> str:
    """The head for a served model: its own if this predictor has one (matched on the last path
    component, case-insensitively), else the cold-start head `ANY_GENERATOR`."""
    name = head_key(served_model)
    return next((g for g in self.generators if g.lower() == name), ANY_GENERATOR)

  # Introspection.

  @property
  def generators(self) -> tuple[str, ...]:
    """Heads this predictor has (index 0 is `ANY_GENERATOR`)."""
    return self._cfg.generators

  @property
  def num_compilations(self) -> int:
    """Executables compiled so far (one per padded (batch, tokens) shape)."""
    return len(self._executables)

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """All (batch, tokens) shapes prediction can run."""
    toks = sorted({self._tok.padded_length(t) for t in TOKEN_SHAPES})
    return [(b, t) for b in BATCH_SHAPES for t in toks]

  def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> int:
    """Compiles `shapes` (default: all) ahead of serving, and computes the served head's calibration
    scores (a bisection per sample under `min_cost`); returns the executables compiled."""
    for b, t in shapes or self.shapes:
      self._executable(b, t)
    self.level()
    return self.num_compilations

  # Prediction.

  def predict_dist_all(self, prompts: Sequence[str], live: PredictorVersion | None = None) -> np.ndarray:
    """[B] prompts -> [B, G, 2] mean and log scale of every head's log(tokens + 1)."""
    return self._run(prompts, live or self.live)[0]

  def embed(self, prompts: Sequence[str]) -> np.ndarray:
    """[B] prompts -> [B, D] the pooled encoder embedding the head reads (online retraining)."""
    return self._run(prompts, self.live)[1]

  def _run(self, prompts: Sequence[str], live: PredictorVersion) -> tuple[np.ndarray, np.ndarray]:
    prompts = list(prompts)
    dists = np.zeros((len(prompts), len(self.generators), 2), np.float32)
    pooled = np.zeros((len(prompts), self.embedding_width), np.float32)
    if not prompts:
      return dists, pooled
    seqs = self._tok.encode(prompts)
    for rows, b, t in self._plan([len(s) for s in seqs]):
      ids, mask = self._tok.pad([seqs[r] for r in rows], length=t, batch=b)
      d, x = self._executable(b, t)(live.state, ids, mask)
      dists[rows], pooled[rows] = np.asarray(d)[: len(rows)], np.asarray(x)[: len(rows)]
    return dists, pooled

  def predict_dist(
    self, prompts: Sequence[str], generator: str | None = None, live: PredictorVersion | None = None
  ) -> np.ndarray:
    """[B] prompts -> [B, 2] the head's log-length distributions."""
    gen = self._check_generator(generator or self.generator)
    return self.predict_dist_all(prompts, live)[:, self.generators.index(gen)].astype(np.float64)

  def rule_for(self, generator: str | None = None) -> ReservationRule:
    """The rule a head reserves by: `self.rule`, but QUANTILE for the cold-start head until it has
    calibrated on its own lengths (calibration.effective_rule)."""
    gen = generator or self.generator
    return effective_rule(self.rule, cold=gen == ANY_GENERATOR and self._calibration_for(gen).cold_start != OBSERVED)

  def _calibration_for(self, gen: str, live: PredictorVersion | None = None) -> Calibration:
    return (live or self.live).calibration

  def level(
    self, generator: str | None = None, max_under_rate: float | None = None, live: PredictorVersion | None = None
  ) -> float:
    """The calibrated level of the head's rule for an overflow target (see calibration.py)."""
    gen = generator or self.generator
    return self._calibration_for(gen, live).threshold(gen, max_under_rate or self.max_under_rate, self.rule_for(gen))

  def reserve_tokens(
    self, prompts: Sequence[str], *, generator: str | None = None, max_under_rate: float | None = None
  ) -> np.ndarray:
    """[B] prompts -> [B] output tokens to reserve, so that at most `max_under_rate` of requests
    (default: this predictor's) outgrow their reservation."""
    live = self.live  # one version for both the distribution and its margin
    return reserved_answer_tokens(
      self.predict_dist(prompts, generator, live),
      self.level(generator, max_under_rate, live),
      self.max_length,
      self.rule_for(generator),
    )

  def predict_lengths(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """[B] prompts -> ([B] output tokens to reserve, as `reserve_tokens`; [B, 2] the calibrated
    distribution of log(tokens + 1), mean and scale (not log scale)), from one forward pass.

    Calibrated: the head's distribution shifted and widened by its held-out residuals' mean and
    standard deviation (`Calibration.residual_moments`), so that the scheduler's forecasts, which
    read the whole distribution, are as honest as the reservation's conformal margin.
    """
    live = self.live
    dist = self.predict_dist(prompts, None, live)
    reserve = reserved_answer_tokens(dist, self.level(None, None, live), self.max_length, self.rule_for())
    shift, spread = self._calibration_for(self.generator, live).residual_moments(self.generator)
    scale = np.exp(dist[:, 1])
    return reserve, np.column_stack([dist[:, 0] + shift * scale, spread * scale])

  def predict(self, prompts: Sequence[str], **kwargs) -> np.ndarray:
    """[B] prompts -> [B] the buckets of `reserve_tokens` (same arguments)."""
    return self.buckets.bucket_of(self.reserve_tokens(prompts, **kwargs))

  def predict_proba(self, prompts: Sequence[str], generator: str | None = None) -> np.ndarray:
    """[B] prompts -> [B, N] probability of each bucket under the head's distribution."""
    dist = self.predict_dist(prompts, generator)
    edges = np.log1p(np.asarray(self.buckets.upper_bounds[:-1], np.float64) + 0.5)
    cdf = stats.norm.cdf((edges[None] - dist[:, :1]) / np.exp(dist[:, 1:]))  # [B, N - 1]
    cdf = np.concatenate([np.zeros_like(cdf[:, :1]), cdf, np.ones_like(cdf[:, :1])], axis=1)
    return np.diff(cdf, axis=1)

  def expected_length(self, prompts: Sequence[str], generator: str | None = None) -> np.ndarray:
    """[B] expected output tokens (a ranking score, e.g. shortest-first)."""
    return expected_tokens(self.predict_dist(prompts, generator))

  def adapted(self, prompts: Sequence[str], lengths: Sequence[int]) -> LengthPredictor:
    """This predictor's cold-start head after observing a served model's first lengths (this one
    unchanged): its shift-robust level narrows around their offset (shift.py)."""
    clone = self.with_options(ANY_GENERATOR)
    clone.live = dataclasses.replace(self.live, calibration=self._observed_calibration(prompts, lengths, self.live))
    return clone

  def observe(self, prompts: Sequence[str], lengths: Sequence[int]) -> bool:
    """Feeds the served model's observed lengths to a cold head's shift-robust level (serving: see
    s3jax.supervisor.adapter), swapping in the recalibrated version whole. Returns False, changing
    nothing, once the head is no longer cold (online retraining calibrated it on its own lengths)."""
    with self._swap_lock:
      live = self.live
      if not live.calibration.shift_robust(self.generator):
        return False
      self.live = dataclasses.replace(live, calibration=self._observed_calibration(prompts, lengths, live))
    return True

  def _observed_calibration(self, prompts, lengths, live: PredictorVersion) -> Calibration:
    dist = self.predict_dist_all(prompts, live)[:, 0].astype(np.float64)
    return live.calibration.with_observed(ANY_GENERATOR, np.column_stack([dist, np.asarray(lengths, np.float64)]))

  # Internals.

  def _plan(self, lengths: list[int]) -> list[tuple[np.ndarray, int, int]]:
    """Groups prompts into (rows, batch shape, token shape) chunks.

    Prompts are grouped by padded token length first, so one long prompt
    does not pad 31 short ones to its length (attention and MLP cost grow
    with the padded shape); each group is cut into the largest batch shapes
    that fit, the remainder padded up to the next batch shape.
    """
    pads = np.asarray([self._tok.padded_length(n) for n in lengths])
    plan = []
    for t in np.unique(pads):
      rows = np.flatnonzero(pads == t)
      while len(rows):
        b = self._batch_shape(len(rows))
        plan.append((rows[:b], b, int(t)))
        rows = rows[b:]
    return plan

  @staticmethod
  def _batch_shape(n: int) -> int:
    """Batch shape for the next chunk when `n` rows are left.

    A call costs a fixed overhead plus its padded rows: full chunks take 32;
    24+ rows take one padded 32; 2-23 rows go in chunks of 8 (the last one
    padded); a single row runs alone.
    """
    small, mid, large = BATCH_SHAPES
    if n >= large * 3 // 4:
      return large
    return mid if n >= 2 else small

  def _check_generator(self, name: str) -> str:
    if name not in self._cfg.generators:
      raise KeyError(
        f"no head for generator {name!r}; use {ANY_GENERATOR!r} "
        f"for a model with no observed lengths. Heads: "
        f"{self._cfg.generators}"
      )
    return name

  def _executable(self, b: int, t: int):
    key = (b, t)
    exe = self._executables.get(key)
    if exe is None:
      with self._lock:
        exe = self._executables.get(key)
        if exe is None:
          args = (self.live.state, jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32))
          exe = self._jit_forward.lower(*args).compile()
          self._executables[key] = exe
    return exe
