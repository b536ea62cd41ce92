"""Training the length model with Optax on every generator's labels.

Shape legend: P prompts, B batch, T tokens, D model width, G generator heads.

Only the top `trainable_layers` encoder layers and the head are trained, so the frozen layers'
output is computed once per prompt and cached: with the encoder frozen (the default) an epoch is a
few head steps. The model is split once (`nnx.split`) and a pure `jax.jit` step runs on
`(trainable, frozen, opt state, batch)`.

The objective (see losses.py): the log-normal likelihood of every observed length under its
generator's head and under `<any>`; optionally a pairwise ranking term; and the pooled demand target,
each prompt's mean standardised log length over the generators that answered it, which the head's
shared demand score regresses on. The generators agree on which prompts are long, so their mean is a
far less noisy label than any one model's sampled answer.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from s3jax.extras import missing_extra
from s3jax.predictor.losses import demand_loss, gaussian_nll, length_labels, pairwise_rank_loss
from s3jax.predictor.model import LengthModel, LengthModelConfig, build_model, is_trainable
from s3jax.predictor.tokenizer import PromptTokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Optimisation settings.

  Attributes:
    epochs: passes over the training prompts (the best epoch on the calibration prompts is kept).
    batch_size: prompts per step (each carries one label per generator that answered it).
    encoder_lr: peak learning rate of the trained encoder layers.
    head_lr: peak learning rate of the head.
    warmup_frac: linear warm-up share of the steps, then cosine decay.
    weight_decay: AdamW decoupled weight decay.
    any_weight: weight of the `<any>` head's likelihood (all generators' labels).
    rank_weight: weight of the pairwise ranking loss on each head's mean (0: off).
    demand_weight: weight of the pooled-demand regression (0: off).
    head_dropout: dropout on the pooled embedding.
    seed: parameter init, dropout and batch order.
  """

  epochs: int = 40
  batch_size: int = 32
  encoder_lr: float = 3e-5
  head_lr: float = 1e-3
  warmup_frac: float = 0.1
  weight_decay: float = 0.01
  any_weight: float = 0.5
  rank_weight: float = 0.0
  demand_weight: float = 1.0
  head_dropout: float = 0.1
  seed: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
  model: LengthModel
  history: list[dict]
  best_epoch: int


def _batches(
  lengths: np.ndarray, tok: PromptTokenizer, batch_size: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, int]]:
  """Shuffled batches of rows grouped by padded length: (rows, T)."""
  shapes = np.asarray([tok.padded_length(n) for n in lengths])
  out = []
  for t in np.unique(shapes):
    rows = rng.permutation(np.flatnonzero(shapes == t))
    out += [(rows[i : i + batch_size], int(t)) for i in range(0, len(rows), batch_size)]
  return [out[i] for i in rng.permutation(len(out))]


def frozen_features(model: LengthModel, tok: PromptTokenizer, seqs: list[np.ndarray], batch_size: int = 32):
  """Output of the frozen layers for every prompt.

  Returns:
    hidden: [P, max_tokens, D] float32, zero beyond each prompt's length.
    ids: [P, max_tokens] ids; mask: [P, max_tokens].
  """
  first = model.cfg.first_trained_layer
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask):
    return nnx.merge(graphdef, state).encoder.hidden_after(ids, mask, first)

  ids, mask = tok.pad(seqs, length=tok.max_tokens)
  hidden = np.zeros(ids.shape + (model.encoder.cfg.hidden_size,), np.float32)
  order = np.argsort([len(s) for s in seqs])
  for i in range(0, len(order), batch_size):
    rows = order[i : i + batch_size]
    t = tok.padded_length(max(len(seqs[r]) for r in rows))
    h = run(state, jnp.asarray(ids[rows, :t]), jnp.asarray(mask[rows, :t]))
    hidden[rows, :t] = np.asarray(h)
  return hidden, ids, mask


def _optax():
  """Optax, of the ``train`` extra, imported where training uses it."""
  try:
    import optax
  except ModuleNotFoundError as e:
    raise missing_extra(e, "train", "training the length predictor") from e
  return optax


def make_optimizer(cfg: TrainConfig, total_steps: int):
  optax = _optax()

  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(
      0.0, peak, max(1, int(cfg.warmup_frac * total_steps)), max(2, total_steps), end_value=peak * 0.05
    )

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: "head" if "head" in jax.tree_util.keystr(p) else "enc", params)

  return optax.multi_transform(
    {
      "enc": optax.adamw(schedule(cfg.encoder_lr), weight_decay=cfg.weight_decay),
      "head": optax.adamw(schedule(cfg.head_lr), weight_decay=cfg.weight_decay),
    },
    labels,
  )


def label_moments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[P, G] lengths (-1: missing) -> per-generator mean and std of log length, [G] each."""
  y, obs = np.log1p(np.maximum(lengths, 0)), lengths >= 0
  n = np.maximum(obs.sum(0), 1)
  mean = (y * obs).sum(0) / n
  std = np.sqrt((((y - mean) ** 2) * obs).sum(0) / n)
  return mean, np.maximum(std, 0.1)


def demand_targets(lengths: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """[P, G] lengths -> [P] mean standardised log length over the generators that answered."""
  y, obs = np.log1p(np.maximum(lengths, 0)), lengths >= 0
  z = (y - mean) / std
  return ((z * obs).sum(1) / np.maximum(obs.sum(1), 1)).astype(np.float32)


def train(
  *,
  model_cfg: LengthModelConfig,
  train_cfg: TrainConfig,
  prompts: list[str],
  lengths: np.ndarray,
  calib_prompts: list[str] | None = None,
  calib_lengths: np.ndarray | None = None,
  progress: bool = True,
) -> TrainResult:
  """Trains the length model.

  Args:
    model_cfg: architecture; `generators[1:]` name the columns of `lengths`.
    train_cfg: optimisation.
    prompts: P training prompts.
    lengths: [P, G - 1] output lengths in tokens, one column per generator; -1 where that generator
      did not answer that prompt.
    calib_prompts, calib_lengths: held-out prompts for choosing the best epoch (by their
      likelihood); without them the last epoch is kept.
    progress: show a tqdm bar.

  Returns:
    The trained model (best epoch), per-epoch history and the best epoch.
  """
  optax = _optax()
  lengths = np.asarray(lengths)
  if lengths.ndim != 2 or lengths.shape[1] != len(model_cfg.generators) - 1:
    raise ValueError("one length column per generator head (after <any>)")
  tok = PromptTokenizer(max_tokens=model_cfg.max_tokens)
  model = build_model(model_cfg, seed=train_cfg.seed)
  mean, std = label_moments(lengths)
  any_mean, any_std = label_moments(lengths.reshape(-1, 1))
  model.head.set_prior(np.concatenate([any_mean, mean]), np.concatenate([any_std, std]))

  def features(texts, lens):
    seqs = tok.encode(texts)
    hidden, ids, mask = frozen_features(model, tok, seqs)
    labels = np.asarray(length_labels(lens))
    return seqs, hidden, ids, mask, labels, (lens >= 0).astype(np.float32), demand_targets(lens, mean, std)

  seqs, *train_arrays = features(prompts, lengths)
  if calib_prompts is not None:
    c_seqs, *calib_arrays = features(calib_prompts, np.asarray(calib_lengths))

  graphdef, trainable, frozen = nnx.split(model, is_trainable(model_cfg), ...)
  rng = np.random.default_rng(train_cfg.seed)
  steps_per_epoch = len(_batches(np.asarray([len(s) for s in seqs]), tok, train_cfg.batch_size, rng))
  opt = make_optimizer(train_cfg, steps_per_epoch * train_cfg.epochs)
  opt_state = opt.init(trainable)
  cfg = train_cfg

  def loss_fn(trainable, frozen, hidden, ids, mask, y, obs, demand_target, key):
    m = nnx.merge(graphdef, trainable, frozen)
    dist, demand = m(ids, mask, hidden=hidden, dropout_key=key, dropout_rate=cfg.head_dropout)
    mean, log_scale = dist[..., 0], dist[..., 1]  # [B, G]
    loss = gaussian_nll(mean[:, 1:], log_scale[:, 1:], y, obs)
    if cfg.any_weight:
      any_mean, any_log_scale = (jnp.broadcast_to(a[:, :1], y.shape) for a in (mean, log_scale))
      loss += cfg.any_weight * gaussian_nll(any_mean, any_log_scale, y, obs)
    if cfg.rank_weight:
      loss += cfg.rank_weight * pairwise_rank_loss(mean[:, 1:], y, obs)
    if cfg.demand_weight:
      loss += cfg.demand_weight * demand_loss(demand, demand_target, (obs.sum(1) > 0).astype(y.dtype))
    return loss

  @jax.jit
  def step(trainable, frozen, opt_state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, *batch, key)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  @jax.jit
  def calib_nll(trainable, frozen, hidden, ids, mask, y, obs):
    dist, _ = nnx.merge(graphdef, trainable, frozen)(ids, mask, hidden=hidden)
    return gaussian_nll(dist[:, 1:, 0], dist[:, 1:, 1], y, obs) * jnp.sum(obs)

  def calib_loss(trainable):
    hidden, ids, mask, y, obs, _ = calib_arrays
    total = 0.0
    for rows, t in _batches(np.asarray([len(s) for s in c_seqs]), tok, 64, np.random.default_rng(0)):
      total += float(calib_nll(trainable, frozen, hidden[rows, :t], ids[rows, :t], mask[rows, :t], y[rows], obs[rows]))
    return total / max(float(calib_arrays[4].sum()), 1.0)

  key = jax.random.key(train_cfg.seed)
  history, best, best_epoch = [], (np.inf, trainable), -1
  bar = tqdm(total=steps_per_epoch * train_cfg.epochs, disable=not progress, desc="train predictor", dynamic_ncols=True)
  for epoch in range(train_cfg.epochs):
    t0, losses = time.time(), []
    for rows, t in _batches(np.asarray([len(s) for s in seqs]), tok, train_cfg.batch_size, rng):
      key, sub = jax.random.split(key)
      hidden, ids, mask, y, obs, dem = train_arrays
      batch = (hidden[rows, :t], ids[rows, :t], mask[rows, :t], y[rows], obs[rows], dem[rows])
      trainable, opt_state, loss = step(trainable, frozen, opt_state, batch, sub)
      losses.append(float(loss))
      bar.update(1)
      bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
    rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "seconds": time.time() - t0}
    if calib_prompts is not None:
      rec["calib_nll"] = calib_loss(trainable)
      if rec["calib_nll"] < best[0]:
        best, best_epoch = (rec["calib_nll"], trainable), epoch
    history.append(rec)
  bar.close()
  if calib_prompts is None:
    best, best_epoch = (None, trainable), train_cfg.epochs - 1
  model = nnx.merge(graphdef, best[1], frozen)
  return TrainResult(model=model, history=history, best_epoch=best_epoch)
