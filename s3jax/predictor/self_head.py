"""Self-prediction (issue 30): the served model's own hidden state predicts its answer's length.

Shape legend: B batch, T prompt tokens, D the served model's width.

A decoder's middle-layer residual stream at the prompt's last token ranks its own answers'
lengths better than a separate encoder reading the prompt's text (TRAIL, Shahout et al. 2025;
measured here for SmolLM2-135M-Instruct, BENCHMARKS.md "Self-prediction at the prompt": Kendall
tau 0.43 against MiniLM's 0.22 on the same held-out prompts). ``SelfLengthPredictor`` serves that
signal: it runs the served model's first ``layer`` blocks over each arriving prompt (its own
parameters, no KV written; batched, one executable per (batch, tokens) shape, compiled ahead of
time) and a linear head on the hidden state at the last token gives the log-length distribution.

Why at arrival and not out of the prefill (which computes the same hidden state): the scheduler
needs a request's length before it admits it (admission against the forecast peak, shortest
first), and the prefill comes after admission. The price is ``layer / n_layers`` of a prefill per
request; the head itself is one [D, 2] product.

Calibrated as the MiniLM heads are (calibration.py: a conformal margin on held-out prompts, and
the held-out residuals' moments for the distribution the scheduler reads); trained with Optax
(``train_self_head``); saved with Orbax beside its config, buckets and calibration.
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
import orbax.checkpoint as ocp
from flax import nnx

from s3jax.assets import SELF_HEAD_DIR
from s3jax.buckets import BucketScheme
from s3jax.models import gpt
from s3jax.predictor.calibration import OBSERVED, Calibration, ReservationRule, reserved_answer_tokens
from s3jax.predictor.losses import gaussian_nll, length_labels
from s3jax.predictor.predictor import DEFAULT_MAX_UNDER_RATE, head_key

CONFIG_FILENAME = "config.json"
PARAMS_DIRNAME = "params"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfHeadConfig:
  """What a self-prediction head reads (saved with it).

  Attributes:
    served_model: the model whose hidden states and answers the head learned (``head_key``).
    layer: blocks run before the hidden state is read (0: the embedding).
    width: D, the served model's width.
    max_tokens: prompt tokens read: a longer prompt is read from its last ``max_tokens`` tokens.
    token_shapes, batch_shapes: the padded shapes compiled (the last token shape is ``max_tokens``).
  """

  served_model: str
  layer: int
  width: int
  max_tokens: int = 1024
  token_shapes: tuple[int, ...] = (64, 256, 1024)
  batch_shapes: tuple[int, ...] = (1, 8)

  def __post_init__(self):
    shapes = tuple(sorted({min(t, self.max_tokens) for t in self.token_shapes} | {self.max_tokens}))
    object.__setattr__(self, "token_shapes", shapes)
    object.__setattr__(self, "batch_shapes", tuple(sorted(set(self.batch_shapes))))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> SelfHeadConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


class SelfHead(nnx.Module):
  """[B, D] hidden states -> [B, 2] mean and log scale of log(tokens + 1): a linear map of the
  standardized hidden state (the standardization is the training features', fixed)."""

  def __init__(self, d: int, *, rngs: nnx.Rngs):
    self.center = nnx.Variable(jnp.zeros((d,)))
    self.spread = nnx.Variable(jnp.ones((d,)))
    self.out = nnx.Linear(d, 2, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, hidden):  # [B, D] -> [B, 2]
    return self.out((hidden - self.center[...]) / self.spread[...])


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfHeadVersion:
  """The head's parameters and the calibration fitted to them, swapped in whole."""

  state: nnx.State
  calibration: Calibration
  number: int = 0


class SelfLengthPredictor:
  """The engine's length predictor (``s3jax.engine.Predictor``) from the served model's hidden state.

  Args:
    runner: the served model's ``ModelRunner`` (its parameters are read, never copied).
    head: the trained ``SelfHead``.
    config: what it reads.
    buckets, calibration, max_under_rate, rule: as for ``LengthPredictor``.
  """

  reads_token_ids = True  # the engine hands it each prompt's token ids, not its text

  def __init__(
    self,
    runner,
    head: SelfHead,
    config: SelfHeadConfig,
    *,
    buckets: BucketScheme,
    calibration: Calibration,
    max_under_rate: float = DEFAULT_MAX_UNDER_RATE,
    rule: ReservationRule = ReservationRule.MIN_COST,
    number: int = 0,
  ):
    if runner.stage_model is not None:
      raise ValueError("self-prediction reads the served model's blocks whole: use a runner without pipeline stages")
    if config.width != runner.cfg.d_model or not 0 <= config.layer <= runner.cfg.n_layers:
      raise ValueError(
        f"this head reads width {config.width} after block {config.layer}; the served model has width "
        f"{runner.cfg.d_model} and {runner.cfg.n_layers} blocks: train a head for it (scripts/train_self_head.py)"
      )
    self.config = config
    self.generator = config.served_model  # the calibration's head name
    self.buckets = buckets
    self.max_length = buckets.max_length
    self.max_under_rate = max_under_rate
    self.rule = ReservationRule(rule)
    self._runner = runner
    head_graphdef, state = nnx.split(head)
    self.head_graphdef = head_graphdef  # online retraining tunes the head alone
    self.embedding_width = config.width
    self.live = SelfHeadVersion(state=jax.tree.map(jnp.asarray, state), calibration=calibration, number=number)
    model_graphdef, layer = runner.graphdef, config.layer

    def forward(params, head_state, tokens, last):  # [B, T], [B] -> [B, 2], [B, D]
      hidden = gpt.hidden_at(nnx.merge(model_graphdef, params), tokens, last, layer).astype(jnp.float32)
      return nnx.merge(head_graphdef, head_state)(hidden), hidden

    self._jit_forward = jax.jit(forward)
    self._executables: dict[tuple[int, int], object] = {}
    self._lock = threading.Lock()

  # -- persistence ---------------------------------------------------------------

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    directory = pathlib.Path(path).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(directory / PARAMS_DIRNAME, nnx.to_pure_dict(self.live.state), force=True)
      ckptr.wait_until_finished()
    meta = {
      "config": self.config.to_dict(),
      "max_under_rate": self.max_under_rate,
      "reservation_rule": self.rule.value,
      "version": self.live.number,
    }
    (directory / CONFIG_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")
    self.buckets.save(directory)
    self.live.calibration.save(directory)
    return directory

  @classmethod
  def load(cls, path: str | pathlib.Path, runner, *, max_under_rate: float | None = None) -> SelfLengthPredictor:
    """A head saved by ``save`` (scripts/train_self_head.py), reading ``runner``'s model."""
    directory = pathlib.Path(path).resolve()
    meta = json.loads((directory / CONFIG_FILENAME).read_text())
    config = SelfHeadConfig.from_dict(meta["config"])
    head = SelfHead(config.width, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(head)
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(directory / PARAMS_DIRNAME, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, restored)
    return cls(
      runner,
      nnx.merge(graphdef, abstract),
      config,
      buckets=BucketScheme.load(directory),
      calibration=Calibration.load(directory),
      max_under_rate=max_under_rate or meta["max_under_rate"],
      rule=meta["reservation_rule"],
      number=meta.get("version", 0),
    )

  @classmethod
  def load_shipped(cls, runner, served_model: str | None = None, **kwargs) -> SelfLengthPredictor:
    """The shipped head (``checkpoints/self_head/``) for ``served_model`` (default: the runner's)."""
    name = head_key(served_model or (runner.source.name if runner.source else None))
    for path in sorted(SELF_HEAD_DIR.glob(f"*/{CONFIG_FILENAME}")):
      if head_key(path.parent.name) == name:
        return cls.load(path.parent, runner, **kwargs)
    shipped = sorted(p.parent.name for p in SELF_HEAD_DIR.glob(f"*/{CONFIG_FILENAME}"))
    raise ValueError(
      f"no self-prediction head for {name!r} (shipped: {shipped}); train one with scripts/train_self_head.py"
    )

  @property
  def calibration(self) -> Calibration:
    return self.live.calibration

  @property
  def generators(self) -> tuple[str, ...]:
    """The one head there is: the served model's."""
    return (self.generator,)

  # -- compiled shapes ---------------------------------------------------------------

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """Every (batch, tokens) shape prediction can run."""
    return [(b, t) for b in self.config.batch_shapes for t in self.config.token_shapes]

  @property
  def num_compilations(self) -> int:
    return len(self._executables)

  def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> int:
    for b, t in shapes or self.shapes:
      self._executable(b, t)
    self.level()  # the margin's conformal scores (a bisection per sample under MIN_COST), once
    return self.num_compilations

  def _executable(self, b: int, t: int):
    exe = self._executables.get((b, t))
    if exe is None:
      with self._lock:
        exe = self._executables.get((b, t))
        if exe is None:
          tokens, last = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)
          exe = self._jit_forward.lower(self._runner.params, self.live.state, tokens, last).compile()
          self._executables[b, t] = exe
    return exe

  # -- prediction ----------------------------------------------------------------

  def _run(self, prompt_ids: Sequence[Sequence[int]], state) -> tuple[np.ndarray, np.ndarray]:
    """[B] prompts' token ids -> [B, 2] the head's distributions and [B, D] the hidden states."""
    seqs = [list(ids)[-self.config.max_tokens :] for ids in prompt_ids]
    if any(not s for s in seqs):
      raise ValueError("self-prediction needs at least one prompt token")
    dists = np.zeros((len(seqs), 2), np.float64)
    hidden = np.zeros((len(seqs), self.config.width), np.float32)
    by_shape: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
      by_shape.setdefault(next(t for t in self.config.token_shapes if t >= len(s)), []).append(i)
    for t, rows in by_shape.items():
      while rows:
        b = next((b for b in self.config.batch_shapes if b >= len(rows)), self.config.batch_shapes[-1])
        chunk, rows = rows[:b], rows[b:]
        tokens, last = np.zeros((b, t), np.int32), np.zeros((b,), np.int32)
        for j, i in enumerate(chunk):
          tokens[j, : len(seqs[i])], last[j] = seqs[i], len(seqs[i]) - 1
        d, h = self._executable(b, t)(self._runner.params, state, tokens, last)
        dists[chunk], hidden[chunk] = np.asarray(d)[: len(chunk)], np.asarray(h)[: len(chunk)]
    return dists, hidden

  def predict_dist(self, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[B] prompts' token ids -> [B, 2] mean and log scale of log(tokens + 1), uncalibrated."""
    return self._run(prompt_ids, self.live.state)[0]

  def hidden_states(self, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[B, D] the hidden states the head reads (training)."""
    return self._run(prompt_ids, self.live.state)[1]

  def level(self, max_under_rate: float | None = None, live: SelfHeadVersion | None = None) -> float:
    return (live or self.live).calibration.threshold(self.generator, max_under_rate or self.max_under_rate, self.rule)

  def predict_lengths(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[B] prompts' token ids -> ([B] output tokens to reserve, [B, 2] the calibrated distribution
    of log(tokens + 1), mean and scale), as ``LengthPredictor.predict_lengths``."""
    live = self.live  # one version for the distribution, its margin and its moments
    dist = self._run(prompt_ids, live.state)[0]
    reserve = reserved_answer_tokens(dist, self.level(None, live), self.max_length, self.rule)
    shift, spread = live.calibration.residual_moments(self.generator)
    scale = np.exp(dist[:, 1])
    return reserve, np.column_stack([dist[:, 0] + shift * scale, spread * scale])

  # -- online retraining (s3jax.supervisor.retrainer) ------------------------------------

  def embed(self, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[B] prompts' token ids -> [B, D] what the head reads (the retrainer's features)."""
    return self.hidden_states(prompt_ids)

  def head_params(self, version: SelfHeadVersion | None = None) -> nnx.State:
    """A copy of the head's parameters in `version` (default: the serving one)."""
    return jax.tree.map(jnp.array, (version or self.live).state)

  def with_head_params(
    self, head: nnx.State, calibration: Calibration, version: SelfHeadVersion | None = None
  ) -> SelfHeadVersion:
    """`head` and `calibration` as a version numbered one more than `version`: ready to `swap` in."""
    return SelfHeadVersion(state=head, calibration=calibration, number=(version or self.live).number + 1)

  def head_dist_fn(self):
    """The head as a pure function ``(head parameters, [B, D] hidden) -> [B, 2]``."""
    graph = self.head_graphdef
    return lambda head, hidden: nnx.merge(graph, head)(hidden)

  def head_learning_mask(self, head: nnx.State) -> nnx.State:
    """1 on the linear map (kernel and bias), 0 on the standardization: observed requests refit
    how the state maps to a length, not what a typical state is. All 2D + 2 numbers learn, unlike a
    MiniLM head's 3: this head has no trunk shared with other generators to keep, and the
    retrainer's held-back judge rejects a candidate that overfits."""
    return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.full_like(leaf, "out" in jax.tree_util.keystr(path)), head
    )

  def swap(self, version: SelfHeadVersion) -> None:
    """Installs a new head and its calibration at once (same shapes: nothing compiles)."""
    shapes = lambda state: jax.tree.map(lambda a: (a.shape, a.dtype), state)
    if shapes(version.state) != shapes(self.live.state):
      raise ValueError("swap needs head parameters of the same shapes as the current ones")
    self.live = version


def calibration_for(served_model: str, dist: np.ndarray, lengths: np.ndarray, max_length: int) -> Calibration:
  """The head's held-out samples: [P, 2] its distributions on calibration prompts, [P] their lengths."""
  samples = np.column_stack([np.asarray(dist, np.float64), np.asarray(lengths, np.float64)])
  return Calibration(samples={served_model: samples}, cold_start=OBSERVED, max_length=max_length)


def train_self_head(
  hidden: np.ndarray,
  lengths: np.ndarray,
  calib_hidden: np.ndarray,
  calib_lengths: np.ndarray,
  *,
  l2: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
  steps: int = 2000,
  learning_rate: float = 1e-3,
  seed: int = 0,
) -> tuple[SelfHead, dict]:
  """Fits a ``SelfHead`` with Optax (Adam, full batch: a few hundred prompts) by the Gaussian
  likelihood of log(tokens + 1) plus ``l2`` times the kernel's squared norm (a ridge: there are
  about as many hidden dimensions as prompts); the penalty and the step are the
  ones of least negative log-likelihood on the calibration prompts.

  Args:
    hidden, lengths: [P, D] training hidden states and [P] their answers' tokens.
    calib_hidden, calib_lengths: held-out ones, for the choice.

  Returns:
    The head and a record of the choice (per penalty: best step and its calibration NLL).
  """
  import optax

  hidden, calib_hidden = np.asarray(hidden, np.float32), np.asarray(calib_hidden, np.float32)
  y, y_calib = length_labels(np.asarray(lengths)), length_labels(np.asarray(calib_lengths))
  head = SelfHead(hidden.shape[1], rngs=nnx.Rngs(seed))
  head.center[...] = jnp.asarray(hidden.mean(0))
  head.spread[...] = jnp.asarray(hidden.std(0) + 1e-6)
  head.out.bias[...] = jnp.asarray([float(y.mean()), float(jnp.log(y.std()))])
  graphdef, params, fixed = nnx.split(head, nnx.Param, ...)

  def nll(params, x, y):
    dist = nnx.merge(graphdef, params, fixed)(x)
    return gaussian_nll(dist[:, :1], dist[:, 1:], y[:, None], jnp.ones_like(y[:, None]))

  opt = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, strength):  # -> new parameters, and the calibration NLL of `params`
    def loss(p):
      return nll(p, hidden, y) + strength * jnp.sum(p["out"]["kernel"][...] ** 2)

    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll(params, calib_hidden, y_calib)

  record, best = {}, (np.inf, params, None)
  for strength in l2:
    p, opt_state, mine = params, opt.init(params), (np.inf, params, -1)
    for i in range(steps):
      p_next, opt_state, calib = step(p, opt_state, strength)
      if float(calib) < mine[0]:
        mine = (float(calib), p, i)
      p = p_next
    record[str(strength)] = {"calib_nll": mine[0], "step": mine[2]}
    if mine[0] < best[0]:
      best = (mine[0], mine[1], strength)
  record["chosen_l2"] = best[2]
  return nnx.merge(graphdef, best[1], fixed), record
