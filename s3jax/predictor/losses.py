"""Losses of the length model: likelihood of the observed lengths, ranking, pooled demand.

Shape legend: B batch, G generators with labels (the `<any>` head excluded).

Labels are `y = log(output tokens + 1)` with a mask, since a user's data need not have every
generator's answer to every prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def length_labels(lengths):
  """Output tokens -> the model's target scale (log1p: a length of 0 is allowed)."""
  return jnp.log1p(jnp.maximum(lengths, 0).astype(jnp.float32))


def gaussian_nll(mean, log_scale, y, mask):
  """Mean negative log-likelihood of `y` under Normal(mean, exp(log_scale)), over observed labels.

  All arguments [B, G]; `mask` is 1 where a label exists.
  """
  z = (y - mean) * jnp.exp(-log_scale)
  nll = 0.5 * z * z + log_scale
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def pairwise_rank_loss(score, y, mask, temperature: float = 0.5):
  """RankNet loss per generator: for every pair of prompts in the batch whose true lengths differ,
  the longer one should score higher. score, y, mask: [B, G]."""
  diff = score[:, None, :] - score[None, :, :]  # [B, B, G]
  longer = (y[:, None, :] > y[None, :, :]) & (mask[:, None, :] > 0) & (mask[None, :, :] > 0)
  losses = jax.nn.softplus(-diff / temperature)
  return jnp.sum(jnp.where(longer, losses, 0.0)) / jnp.maximum(jnp.sum(longer), 1)


def demand_loss(demand, target, has_target):
  """Mean squared error of the predicted [B] demand against the pooled [B] target."""
  err = (demand - target) ** 2
  return jnp.sum(err * has_target) / jnp.maximum(jnp.sum(has_target), 1.0)
