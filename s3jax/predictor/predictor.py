"""`LengthPredictor`: the serving-side API of the output-length predictor.

Shape legend: B batch, T tokens, N buckets.

The engine calls `predict` on every request, so the forward pass is one
jitted pure function of `(params, ids, mask)` compiled ahead of
time for a few padded shapes (batch in `BATCH_SHAPES`, tokens in
`tokenizer.TOKEN_SHAPES` up to `max_tokens`); `num_compilations` lets
callers check that steady-state serving never recompiles. Larger batches are
grouped by padded prompt length and split into chunks of the batch shapes.

Thread-safety: `predict` may be called from several threads; compilation is
guarded by a lock and the executables themselves are thread-safe.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.assets import PREDICTOR_DIR
from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import Calibration, DecodeRule, bucket_at_threshold, decode
from s3jax.predictor.checkpoint import load_checkpoint, save_checkpoint
from s3jax.predictor.data import DEFAULT_GENERATOR
from s3jax.predictor.model import ANY_GENERATOR, LengthModel
from s3jax.predictor.tokenizer import TOKEN_SHAPES, PromptTokenizer

BATCH_SHAPES = (1, 8, 32)
DEFAULT_CHECKPOINT = PREDICTOR_DIR / DEFAULT_GENERATOR


class LengthPredictor:
  """Predicts each prompt's output-length bucket for one served model.

  Attributes:
    buckets: the `BucketScheme` the predictions index into.
    generator: the default generator head (the served model), or
      `ANY_GENERATOR` for a model with no observed lengths yet.
    decode_rule: how a bucket is chosen when no under-prediction target is
      given.
  """

  def __init__(self, model: LengthModel, *, buckets: BucketScheme,
               calibration: Calibration, generator: str = ANY_GENERATOR,
               decode_rule: DecodeRule = DecodeRule.MEDIAN,
               meta: dict | None = None):
    self.buckets = buckets
    self.calibration = calibration
    self.decode_rule = decode_rule
    self.meta = dict(meta or {})
    self._model = model
    self._cfg = model.cfg
    self._tok = PromptTokenizer(max_tokens=model.cfg.max_tokens)
    self.generator = self._check_generator(generator)
    # Split once; the jitted function is pure in (state, inputs).
    graphdef, self._state = nnx.split(model)

    def probs(state, ids, mask):  # [B, T], [B, T] -> [B, G, N]
      # Every head at once: one executable per shape serves all generators.
      return jax.nn.softmax(nnx.merge(graphdef, state)(ids, mask), axis=-1)

    self._jit_probs = jax.jit(probs)
    self._executables: dict[tuple[int, int], object] = {}
    self._lock = threading.Lock()

  # Construction and persistence.

  @classmethod
  def load(cls, path: str | pathlib.Path, *, generator: str | None = None,
           decode_rule: DecodeRule | None = None) -> LengthPredictor:
    """Loads a checkpoint written by `save` (or scripts/train_predictor.py).

    Args:
      path: checkpoint directory.
      generator: head to use; default: the checkpoint's default generator.
      decode_rule: override the checkpoint's decode rule.
    """
    model, scheme, calib, config = load_checkpoint(path)
    rule = decode_rule or DecodeRule(config.get("decode_rule", "median"))
    return cls(model, buckets=scheme, calibration=calib,
               generator=generator or config["default_generator"],
               decode_rule=rule, meta=config)

  @classmethod
  def load_default(cls, **kwargs) -> LengthPredictor:
    """The committed predictor for the default served model."""
    return cls.load(DEFAULT_CHECKPOINT, **kwargs)

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    meta = {**self.meta, "default_generator": self.generator,
            "decode_rule": self.decode_rule.value}
    meta.pop("model", None)
    return save_checkpoint(path, self._model, scheme=self.buckets,
                           calibration=self.calibration, meta=meta)

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
    """All (batch, tokens) shapes `predict` can run."""
    toks = sorted({self._tok.padded_length(t) for t in TOKEN_SHAPES})
    return [(b, t) for b in BATCH_SHAPES for t in toks]

  def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> int:
    """Compiles `shapes` (default: all) ahead of serving; returns the count."""
    for b, t in shapes or self.shapes:
      self._executable(b, t)
    return self.num_compilations

  # Prediction.

  def predict_proba(self, prompts: Sequence[str],
                    generator: str | None = None) -> np.ndarray:
    """[B] prompts -> [B, N] bucket probabilities for `generator`'s head."""
    gen = self.generators.index(self._check_generator(generator or
                                                      self.generator))
    return self.predict_proba_all(prompts)[:, gen]

  def predict_proba_all(self, prompts: Sequence[str]) -> np.ndarray:
    """[B] prompts -> [B, G, N] bucket probabilities of every head."""
    prompts = list(prompts)
    g, n = len(self.generators), self.buckets.num_buckets
    out = np.zeros((len(prompts), g, n), np.float32)
    if not prompts:
      return out
    seqs = self._tok.encode(prompts)
    for rows, b, t in self._plan([len(s) for s in seqs]):
      ids, mask = self._tok.pad([seqs[r] for r in rows], length=t, batch=b)
      p = self._executable(b, t)(self._state, ids, mask)
      out[rows] = np.asarray(p)[:len(rows)]
    return out

  def predict(self, prompts: Sequence[str], *, generator: str | None = None,
              max_under_rate: float | None = None) -> np.ndarray:
    """[B] prompts -> [B] int bucket indices.

    Args:
      prompts: raw prompt strings (empty and over-long prompts are fine; see
        tokenizer.py for truncation).
      generator: generator head; default `self.generator`.
      max_under_rate: safety margin: choose buckets so that the fraction of
        requests whose true length exceeds the reservation stays at or below
        this target (conformal threshold from held-out calibration data).
        None uses `decode_rule`.
    """
    gen = generator or self.generator
    probs = self.predict_proba(prompts, gen)
    if max_under_rate is None:
      return decode(probs, self.decode_rule)
    return bucket_at_threshold(probs, self.calibration.threshold(
        gen, max_under_rate))

  def reserve_tokens(self, prompts: Sequence[str], **kwargs) -> np.ndarray:
    """[B] output tokens to reserve: the predicted buckets' upper bounds."""
    return self.buckets.upper_bound(self.predict(prompts, **kwargs))

  def expected_length(self, prompts: Sequence[str],
                      generator: str | None = None) -> np.ndarray:
    """[B] expected output tokens (a ranking score, e.g. shortest-first)."""
    gen = generator or self.generator
    reps = self.calibration.representatives[gen]
    return self.predict_proba(prompts, gen) @ reps

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
      raise KeyError(f"no head for generator {name!r}; use {ANY_GENERATOR!r} "
                     f"for a model with no observed lengths. Heads: "
                     f"{self._cfg.generators}")
    return name

  def _executable(self, b: int, t: int):
    key = (b, t)
    exe = self._executables.get(key)
    if exe is None:
      with self._lock:
        exe = self._executables.get(key)
        if exe is None:
          args = (self._state, jax.ShapeDtypeStruct((b, t), jnp.int32),
                  jax.ShapeDtypeStruct((b, t), jnp.int32))
          exe = self._jit_probs.lower(*args).compile()
          self._executables[key] = exe
    return exe
