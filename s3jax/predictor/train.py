"""Training the length classifier with Optax on every generator's labels.

Shape legend: P prompts, B batch, T tokens, D model width, G generator heads,
N buckets.

Only the top `trainable_layers` encoder layers and the head are trained, so
the frozen layers' output is computed once per prompt and cached: an epoch
then costs a fraction of a full forward/backward. The model is split once
(`nnx.split`) and a pure `jax.jit` step runs on `(trainable, frozen, opt
state, batch)`.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from s3jax.buckets import BucketScheme
from s3jax.predictor.losses import LossKind, bucket_loss
from s3jax.predictor.model import LengthModel, ModelConfig, build_model, is_trainable
from s3jax.predictor.tokenizer import PromptTokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Optimisation settings.

  Attributes:
    epochs: passes over the training prompts.
    batch_size: prompts per step (each carries one label per generator).
    encoder_lr: peak learning rate of the trained encoder layers.
    head_lr: peak learning rate of the head.
    warmup_frac: linear warm-up share of the steps, then cosine decay.
    weight_decay: AdamW decoupled weight decay.
    loss: bucket loss (see losses.py).
    ordinal_weight: weight of the ordinal term of the loss.
    any_weight: weight of the `<any>` head's loss (all generators' labels).
    head_dropout: dropout on the pooled embedding.
    seed: parameter init, dropout and batch order.
  """

  epochs: int = 8
  batch_size: int = 32
  encoder_lr: float = 1e-4
  head_lr: float = 1e-3
  warmup_frac: float = 0.1
  weight_decay: float = 0.01
  loss: LossKind = LossKind.ORDINAL_EMD
  ordinal_weight: float = 1.0
  any_weight: float = 0.5
  head_dropout: float = 0.1
  seed: int = 0

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "loss": self.loss.value}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
  model: LengthModel
  history: list[dict]
  best_epoch: int


def _batches(lengths: np.ndarray, tok: PromptTokenizer, batch_size: int,
             rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
  """Shuffled batches of rows grouped by padded length: (rows, T)."""
  shapes = np.asarray([tok.padded_length(n) for n in lengths])
  out = []
  for t in np.unique(shapes):
    rows = rng.permutation(np.flatnonzero(shapes == t))
    out += [(rows[i:i + batch_size], int(t))
            for i in range(0, len(rows), batch_size)]
  return [out[i] for i in rng.permutation(len(out))]


def frozen_features(model: LengthModel, tok: PromptTokenizer,
                    seqs: list[np.ndarray], batch_size: int = 32):
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
    rows = order[i:i + batch_size]
    t = tok.padded_length(max(len(seqs[r]) for r in rows))
    h = run(state, jnp.asarray(ids[rows, :t]), jnp.asarray(mask[rows, :t]))
    hidden[rows, :t] = np.asarray(h)
  return hidden, ids, mask


def make_optimizer(cfg: TrainConfig, total_steps: int):
  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(1, int(cfg.warmup_frac * total_steps)),
        max(2, total_steps), end_value=peak * 0.05)

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "head" if "head" in jax.tree_util.keystr(p) else "enc",
        params)

  return optax.multi_transform(
      {"enc": optax.adamw(schedule(cfg.encoder_lr),
                          weight_decay=cfg.weight_decay),
       "head": optax.adamw(schedule(cfg.head_lr),
                           weight_decay=cfg.weight_decay)}, labels)


def train(*, model_cfg: ModelConfig, train_cfg: TrainConfig,
          scheme: BucketScheme, prompts: list[str], lengths: np.ndarray,
          calib_prompts: list[str] | None = None,
          calib_lengths: np.ndarray | None = None,
          progress: bool = True) -> TrainResult:
  """Fine-tunes the classifier.

  Args:
    model_cfg: architecture; `generators[1:]` name the columns of `lengths`.
    train_cfg: optimisation.
    scheme: buckets the labels are drawn from.
    prompts: P training prompts.
    lengths: [P, G - 1] output lengths in tokens, one column per generator.
    calib_prompts, calib_lengths: held-out prompts for choosing the best
      epoch (by their mean loss); the last epoch is kept without them.
    progress: show a tqdm bar.

  Returns:
    The trained model (best epoch), per-epoch history and the best epoch.
  """
  if lengths.shape[1] != len(model_cfg.generators) - 1:
    raise ValueError("one length column per generator head (after <any>)")
  tok = PromptTokenizer(max_tokens=model_cfg.max_tokens)
  model = build_model(model_cfg, seed=train_cfg.seed)
  seqs = tok.encode(prompts)
  hidden, ids, mask = frozen_features(model, tok, seqs)
  labels = scheme.bucket_of(lengths).astype(np.int32)  # [P, G-1]
  if calib_prompts is not None:
    c_seqs = tok.encode(calib_prompts)
    c_hidden, c_ids, c_mask = frozen_features(model, tok, c_seqs)
    c_labels = scheme.bucket_of(calib_lengths).astype(np.int32)

  graphdef, trainable, frozen = nnx.split(model, is_trainable(model_cfg), ...)
  rng = np.random.default_rng(train_cfg.seed)
  steps_per_epoch = len(_batches(np.asarray([len(s) for s in seqs]), tok,
                                 train_cfg.batch_size, rng))
  opt = make_optimizer(train_cfg, steps_per_epoch * train_cfg.epochs)
  opt_state = opt.init(trainable)

  def loss_fn(trainable, frozen, hidden, ids, mask, labels, key):
    m = nnx.merge(graphdef, trainable, frozen)
    logits = m(ids, mask, hidden=hidden, dropout_key=key,
               dropout_rate=train_cfg.head_dropout)  # [B, G, N]
    per_gen = bucket_loss(logits[:, 1:], labels, train_cfg.loss,
                          train_cfg.ordinal_weight)  # [B, G-1]
    g = labels.shape[1]
    any_logits = jnp.broadcast_to(logits[:, :1], (logits.shape[0], g,
                                                  logits.shape[2]))
    any_loss = bucket_loss(any_logits, labels, train_cfg.loss,
                           train_cfg.ordinal_weight)
    return per_gen.mean() + train_cfg.any_weight * any_loss.mean()

  @jax.jit
  def step(trainable, frozen, opt_state, hidden, ids, mask, labels, key):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, hidden, ids,
                                              mask, labels, key)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  eval_loss = jax.jit(lambda *a: loss_fn(*a, None))

  def calib_loss(trainable):
    total, n = 0.0, len(c_seqs)
    for rows, t in _batches(np.asarray([len(s) for s in c_seqs]), tok, 64,
                            np.random.default_rng(0)):
      total += float(eval_loss(trainable, frozen, c_hidden[rows, :t],
                               c_ids[rows, :t], c_mask[rows, :t],
                               c_labels[rows])) * len(rows)
    return total / n

  key = jax.random.key(train_cfg.seed)
  history, best, best_epoch = [], (np.inf, trainable), -1
  bar = tqdm(total=steps_per_epoch * train_cfg.epochs, disable=not progress,
             desc="train predictor", dynamic_ncols=True)
  for epoch in range(train_cfg.epochs):
    t0, losses = time.time(), []
    for rows, t in _batches(np.asarray([len(s) for s in seqs]), tok,
                            train_cfg.batch_size, rng):
      key, sub = jax.random.split(key)
      trainable, opt_state, loss = step(
          trainable, frozen, opt_state, hidden[rows, :t], ids[rows, :t],
          mask[rows, :t], labels[rows], sub)
      losses.append(float(loss))
      bar.update(1)
      bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
    rec = {"epoch": epoch, "train_loss": float(np.mean(losses)),
           "seconds": time.time() - t0}
    if calib_prompts is not None:
      rec["calib_loss"] = calib_loss(trainable)
      if rec["calib_loss"] < best[0]:
        best, best_epoch = (rec["calib_loss"], trainable), epoch
    history.append(rec)
    tqdm.write(f"epoch {epoch}: " + ", ".join(
        f"{k}={v:.4f}" for k, v in rec.items() if k != "epoch"))
  bar.close()
  if calib_prompts is None:
    best, best_epoch = (None, trainable), train_cfg.epochs - 1
  model = nnx.merge(graphdef, best[1], frozen)
  return TrainResult(model=model, history=history, best_epoch=best_epoch)
