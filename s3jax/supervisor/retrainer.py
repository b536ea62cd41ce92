"""Online retraining: the length predictor learns from every finished request while serving.

Shape legend: N examples, B batch, D embedding width.

Every finished request reaches the retrainer (through the engine's `MispredictionLog`) as (prompt,
true length). Its prompt is embedded once by the predictor's own executables (the MiniLM predictor's
pooled embedding, or the served model's hidden state for a ``SelfLengthPredictor``) and kept in a
bounded `ReplayBuffer`; a stable quarter of the prompts is held back. A run (every `every`
completions, or sooner when the live overflow rate drifts `drift_margin` above the target)
fine-tunes what the predictor lets learn (``head_learning_mask``: the served generator's offset,
slope and spread of a MiniLM head; the whole linear head of a self-prediction head) with Optax on
those embeddings (a pure jitted step of one static shape), then judges the candidate against the
serving version on the held-back slice:

  both are calibrated on one half of the held-back requests and measured on the other, and the other
  way round (2-fold cross-fitting); the candidate is accepted when its overflow rate is at most
  max(target, the serving version's) + `tolerance` and it reserves fewer tokens on average.

Whatever the decision, the served head is recalibrated on all held-back requests (so the margin
follows the served model even when its parameters stay), and the new version, parameters and
calibration together, is swapped in atomically (the predictor's `swap`): a prediction reads one
version or the other. Same shapes, same executables: a swap compiles nothing. Each installed version
is saved with Orbax (the last `keep`); a restart loads the newest.

Training runs on its own thread and sleeps between steps so that it takes at most `device_share` of
the wall time: serving keeps the rest of the device.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from s3jax.extras import missing_extra

try:
  import optax
except ModuleNotFoundError as e:
  raise missing_extra(e, "train", "online retraining") from e

from s3jax.predictor.calibration import OBSERVED, Calibration, reserved_answer_tokens
from s3jax.predictor.losses import gaussian_nll
from s3jax.predictor.metrics import reservation_metrics
from s3jax.predictor.model import ANY_GENERATOR
from s3jax.predictor.predictor import LengthPredictor, PredictorVersion
from s3jax.predictor.self_head import SelfLengthPredictor
from s3jax.supervisor.buffer import Example, ReplayBuffer, held_back
from s3jax.supervisor.log import LengthObservation

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrainConfig:
  """When and how the predictor retrains online.

  Attributes:
    every: completions between scheduled runs.
    drift_margin: run early when the overflow rate over the last `window` requests exceeds the target
      by this much (and at least `min_new` requests arrived since the last run).
    window: requests the live rates (and the drift trigger) are measured over.
    min_new: fewest new observations for a drift-triggered run.
    min_examples: fewest examples (held back included) before the first run.
    recent, reservoir: the replay buffer's newest-examples window and its reservoir of older ones.
    held_back: share of prompts held back to judge candidates and calibrate the margin.
    epochs, batch_size, learning_rate: the head's fine-tuning with Adam.
    tolerance: overflow-rate slack of the acceptance rule.
    device_share: most of the wall time training may take (it sleeps the rest).
    checkpoint_dir: where installed versions are saved (None: not saved).
    keep: installed versions kept on disk.
  """

  every: int = 200
  drift_margin: float = 0.1
  window: int = 200
  min_new: int = 32
  min_examples: int = 64
  recent: int = 2048
  reservoir: int = 2048
  held_back: float = 0.25
  epochs: int = 30
  batch_size: int = 64
  learning_rate: float = 1e-3
  tolerance: float = 0.02
  device_share: float = 0.25
  checkpoint_dir: str | None = None
  keep: int = 5

  def __post_init__(self):
    if not 0.0 < self.device_share <= 1.0:
      raise ValueError(f"device_share must be in (0, 1], got {self.device_share}")
    if not 0.0 < self.held_back < 1.0:
      raise ValueError(f"held_back must be in (0, 1), got {self.held_back}")
    if min(self.every, self.window, self.min_examples, self.batch_size, self.keep) < 1:
      raise ValueError("every, window, min_examples, batch_size and keep must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrainStats:
  """What /metrics reports about online retraining."""

  version: int
  runs: int
  accepted: int
  rejected: int
  skipped: int  # runs due that found too few training or held-back examples (``run_once``'s floor)
  seconds_since_swap: float | None
  observations: int
  buffered: int
  window: int  # requests the live rates are measured over (at most RetrainConfig.window)
  live_overflow_rate: float
  live_exact_rate: float  # the reservation's bucket is the answer's bucket
  live_within_one_rate: float


class OnlineRetrainer:
  """Retrains `predictor`'s served head from the requests an engine finishes (see the module doc).

  `attach(engine)` subscribes to its observations; `start()` runs the trigger loop on a thread;
  `run_once()` is one run, synchronously (tests, benchmarks).
  """

  def __init__(self, predictor: LengthPredictor | SelfLengthPredictor, config: RetrainConfig = RetrainConfig()):
    self.predictor = predictor
    self._reads_text = not getattr(predictor, "reads_token_ids", False)
    self.config = config
    self.head = predictor.generator
    self.buffer = ReplayBuffer(config.recent, config.reservoir)
    self._pending: list[LengthObservation] = []
    self._recent_outcomes: collections.deque[tuple[bool, bool, bool]] = collections.deque(maxlen=config.window)
    self._cv = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stop = False
    self._observed = self._at_last_run = 0
    self._runs = self._accepted = self._rejected = self._skipped = 0
    self._last_swap: float | None = None
    self.decisions: list[dict] = []  # one per run, newest last
    self._build_steps()
    if config.checkpoint_dir is not None:
      self._restore_newest()

  # Wiring.

  def attach(self, engine) -> None:
    """Receives every request `engine` finishes from now on."""
    engine.misprediction_log.subscribe(self.observe)

  def observe(self, observation: LengthObservation) -> None:
    """Called on the engine thread: hands the observation over, nothing more."""
    if observation.predicted_output_len is None or (self._reads_text and observation.prompt_text is None):
      return  # no prediction was made for it (another policy, or token-id prompts for a text predictor)
    true, reserved = observation.true_output_len, observation.predicted_output_len
    buckets = self.predictor.buckets
    true_bucket, reserved_bucket = buckets.bucket_of(min(true, buckets.max_length)), buckets.bucket_of(reserved)
    with self._cv:
      self._pending.append(observation)
      self._observed += 1
      self._recent_outcomes.append(
        (true > reserved, true_bucket == reserved_bucket, abs(true_bucket - reserved_bucket) <= 1)
      )
      self._cv.notify()

  def start(self) -> None:
    if self._thread is None:
      self._stop = False
      self._thread = threading.Thread(target=self._loop, name="s3jax-retrain", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def warmup(self) -> None:
    """Compiles the training and evaluation steps (off the serving path, but before serving)."""
    x = np.zeros((self.config.batch_size, self._width), np.float32)
    zeros = np.zeros(self.config.batch_size, np.float32)
    state = self.predictor.head_params(self.predictor.live)
    # Two steps: the first reads a fresh optimizer state (its step count on no device), the next
    # the one a step returns (on the parameters' device, when they are committed to one, as
    # restored checkpoints are): two signatures, both compiled here.
    stepped = self._train_step(state, self._optimizer.init(state), x, zeros, zeros)
    self._train_step(*stepped[:2], x, zeros, zeros)
    self._head_dist(state, x)

  # Status.

  def stats(self) -> RetrainStats:
    with self._cv:
      outcomes = list(self._recent_outcomes)
      rate = lambda i: float(np.mean([o[i] for o in outcomes])) if outcomes else 0.0
      return RetrainStats(
        version=self.predictor.live.number,
        runs=self._runs,
        accepted=self._accepted,
        rejected=self._rejected,
        skipped=self._skipped,
        observations=self._observed,
        buffered=len(self.buffer),
        seconds_since_swap=None if self._last_swap is None else time.time() - self._last_swap,
        window=len(outcomes),
        live_overflow_rate=rate(0),
        live_exact_rate=rate(1),
        live_within_one_rate=rate(2),
      )

  # The loop.

  def _loop(self) -> None:
    while True:
      with self._cv:
        self._cv.wait_for(lambda: self._stop or self._pending)
        if self._stop:
          return
      try:
        self._ingest()
        if self._due():
          self.run_once()
      except Exception:  # a failed run must not stop serving; the next trigger tries again
        logger.exception("online retraining run failed; the serving predictor is unchanged")

  def _due(self) -> bool:
    if len(self.buffer) < self.config.min_examples:
      return False
    new = self._observed - self._at_last_run
    if new >= self.config.every:
      return True
    stats = self.stats()
    drifted = stats.live_overflow_rate > self.predictor.max_under_rate + self.config.drift_margin
    return drifted and new >= self.config.min_new and stats.window >= min(self.config.window, self.config.min_new)

  def _ingest(self) -> None:
    """Embeds the pending observations (the predictor's executables, batched) into the buffer."""
    with self._cv:
      pending, self._pending = self._pending, []
    for i in range(0, len(pending), 32):
      chunk = pending[i : i + 32]
      pooled = self.predictor.embed([o.prompt_text if self._reads_text else o.prompt_ids for o in chunk])
      for o, x in zip(chunk, pooled):
        key = o.prompt_text if self._reads_text else ",".join(map(str, o.prompt_ids))
        self.buffer.add(Example(pooled=x, length=o.true_output_len, held_back=held_back(key, self.config.held_back)))

  def run_once(self) -> dict:
    """One run: fine-tune a candidate, judge it, install the chosen version. Returns the decision."""
    self._ingest()
    examples = self.buffer.examples()
    train = [e for e in examples if not e.held_back]
    judge = [e for e in examples if e.held_back]
    with self._cv:
      self._at_last_run = self._observed
    if len(train) < self.config.batch_size // 2 or len(judge) < 8:
      self._skipped += 1
      reason = (
        f"{len(train)} training and {len(judge)} held-back examples are too few (it needs "
        f"{self.config.batch_size // 2} and 8)"
      )
      logger.info("online retraining skipped: %s", reason)
      return {"skipped": reason}
    t0 = time.perf_counter()
    serving = self.predictor.live
    serving_head = self.predictor.head_params(serving)
    candidate_head = self._fine_tune(serving_head, train)
    x_judge = np.stack([e.pooled for e in judge])
    y_judge = np.asarray([e.length for e in judge])
    serving_dist, candidate_dist = self._dists(serving_head, x_judge), self._dists(candidate_head, x_judge)
    current, proposed = self._judge(serving_dist, y_judge), self._judge(candidate_dist, y_judge)
    target = self.predictor.max_under_rate
    accept = (
      proposed["overflow"] <= max(target, current["overflow"]) + self.config.tolerance
      and proposed["mean_reserved"] < current["mean_reserved"]
    )
    chosen, chosen_dist = (candidate_head, candidate_dist) if accept else (serving_head, serving_dist)
    version = self._version(serving, chosen, chosen_dist, y_judge)
    self.predictor.swap(version)
    self._runs += 1
    self._accepted += accept
    self._rejected += not accept
    self._last_swap = time.time()
    decision = {
      "version": version.number,
      "accepted": bool(accept),
      "train": len(train),
      "held_back": len(judge),
      "current": current,
      "candidate": proposed,
      "target": target,
      "seconds": round(time.perf_counter() - t0, 3),
      "at_perf_s": time.perf_counter(),
    }
    self.decisions.append(decision)
    logger.info(
      "online retraining: candidate %s (held-back overflow %.3f vs %.3f, mean reserved %.0f vs %.0f "
      "tokens; %d train / %d held back); serving version %d, recalibrated",
      "accepted" if accept else "rejected",
      proposed["overflow"],
      current["overflow"],
      proposed["mean_reserved"],
      current["mean_reserved"],
      len(train),
      len(judge),
      version.number,
    )
    if self.config.checkpoint_dir is not None:
      self._save(version, decision)
    return decision

  # Training and judging (pure functions of the head's parameters).

  def _build_steps(self) -> None:
    dist = self.predictor.head_dist_fn()
    grad_mask = self.predictor.head_learning_mask(self.predictor.head_params())
    self._width = self.predictor.embedding_width
    self._optimizer = optax.adam(self.config.learning_rate)
    opt = self._optimizer

    def loss(head_state, pooled, y, mask):
      d = dist(head_state, pooled)
      return gaussian_nll(d[:, :1], d[:, 1:], y[:, None], mask[:, None])

    @jax.jit
    def train_step(head_state, opt_state, pooled, y, mask):
      value, grads = jax.value_and_grad(loss)(head_state, pooled, y, mask)
      grads = jax.tree.map(jnp.multiply, grads, grad_mask)
      updates, opt_state = opt.update(grads, opt_state, head_state)
      return optax.apply_updates(head_state, updates), opt_state, value

    self._train_step = train_step
    self._head_dist = jax.jit(dist)

  def _fine_tune(self, head_state, train: list[Example]):
    b = self.config.batch_size
    x = np.stack([e.pooled for e in train])
    y = np.log1p(np.asarray([e.length for e in train], np.float64)).astype(np.float32)
    rng = np.random.default_rng(len(train))
    opt_state = self._optimizer.init(head_state)
    for _ in range(self.config.epochs):
      order = rng.permutation(len(train))
      for i in range(0, len(order), b):
        rows = order[i : i + b]
        xb, yb, mask = np.zeros((b, self._width), np.float32), np.zeros(b, np.float32), np.zeros(b, np.float32)
        xb[: len(rows)], yb[: len(rows)], mask[: len(rows)] = x[rows], y[rows], 1.0
        t0 = time.perf_counter()
        head_state, opt_state, _ = self._train_step(head_state, opt_state, xb, yb, mask)
        jax.block_until_ready(head_state)
        self._yield_device(time.perf_counter() - t0)
    return head_state

  def _yield_device(self, busy_s: float) -> None:
    share = self.config.device_share
    if share < 1.0:
      time.sleep(busy_s * (1.0 - share) / share)

  def _dists(self, head_state, x: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, 2] in chunks of the training batch shape (one executable)."""
    b, out = self.config.batch_size, []
    for i in range(0, len(x), b):
      chunk = np.zeros((b, self._width), np.float32)
      chunk[: len(x[i : i + b])] = x[i : i + b]
      out.append(np.asarray(self._head_dist(head_state, chunk))[: len(x[i : i + b])])
    return np.concatenate(out).astype(np.float64)

  def _judge(self, dist: np.ndarray, true: np.ndarray) -> dict:
    """Overflow rate and mean reserved tokens at the target, calibrated on one half of the held-back
    requests and measured on the other, both ways round."""
    halves = (np.arange(len(true)) % 2 == 0, np.arange(len(true)) % 2 == 1)
    rule, target, max_length = self.predictor.rule, self.predictor.max_under_rate, self.predictor.max_length
    overflow, reserved = [], []
    for calib, test in (halves, halves[::-1]):
      c = Calibration(samples={self.head: np.column_stack([dist[calib], true[calib]])}, max_length=max_length)
      r = reserved_answer_tokens(dist[test], c.threshold(self.head, target, rule), max_length, rule)
      m = reservation_metrics(r, true[test], max_length)
      overflow.append(m["overflow"] * test.sum())
      reserved.append(m["mean_reserved"] * test.sum())
    return {"overflow": float(sum(overflow) / len(true)), "mean_reserved": float(sum(reserved) / len(true))}

  def _version(self, serving: PredictorVersion, head_state, dist: np.ndarray, true: np.ndarray) -> PredictorVersion:
    """The serving parameters with `head_state` as the head, calibrated on the held-back requests."""
    old = serving.calibration
    calibration = Calibration(
      samples={**old.samples, self.head: np.column_stack([dist, true])},
      cold_start=OBSERVED if self.head == ANY_GENERATOR else old.cold_start,
      max_length=old.max_length,
    )
    return self.predictor.with_head_params(head_state, calibration, serving)

  # Checkpoints.

  def _save(self, version: PredictorVersion, decision: dict) -> None:
    root = pathlib.Path(self.config.checkpoint_dir).resolve()
    path = root / f"version-{version.number:06d}"
    head = nnx.to_pure_dict(self.predictor.head_params(version))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path / "head", head, force=True)
      ckptr.wait_until_finished()
    version.calibration.save(path)
    (path / "decision.json").write_text(
      json.dumps({**decision, "head": self.head, "generators": list(self.predictor.generators)}) + "\n"
    )
    for old in sorted(root.glob("version-*"))[: -self.config.keep]:
      shutil.rmtree(old)

  def _restore_newest(self) -> None:
    versions = sorted(pathlib.Path(self.config.checkpoint_dir).glob("version-*/decision.json"))
    if not versions:
      return
    path = versions[-1].parent
    decision = json.loads(versions[-1].read_text())
    if decision["generators"] != list(self.predictor.generators) or decision["head"] != self.head:
      raise ValueError(
        f"{path} was retrained for head {decision['head']!r} of another predictor; serve with "
        f"that predictor and head, or point the retraining directory elsewhere"
      )
    head = self.predictor.head_params()
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(path / "head", jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(head)))
    nnx.replace_by_pure_dict(head, restored)
    version = self.predictor.with_head_params(head, Calibration.load(path))
    self.predictor.swap(dataclasses.replace(version, number=decision["version"]))
    logger.info("online retraining: restored version %d from %s", decision["version"], path)
