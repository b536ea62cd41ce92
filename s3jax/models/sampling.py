"""Per-slot sampling: greedy, temperature, top-k, top-p, per-request seeds.

Shape legend: B slots, V vocab.

Every knob is a per-slot array, never a static argument, so a new temperature
or seed never recompiles. Randomness is a pure function of (seed, index of the
token in its answer): the same request samples the same tokens whichever
slot, batch or policy it lands in.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SlotSampling:
  temperature: jax.Array  # [B] f32, 0 = greedy
  top_k: jax.Array        # [B] i32, 0 = no limit
  top_p: jax.Array        # [B] f32 in (0, 1]
  seed: jax.Array         # [B] u32
  step: jax.Array         # [B] i32, index of the token being sampled in its answer

  @classmethod
  def from_host(cls, temperature, top_k, top_p, seed, step) -> "SlotSampling":
    return cls(temperature=np.asarray(temperature, np.float32), top_k=np.asarray(top_k, np.int32),
               top_p=np.asarray(top_p, np.float32), seed=np.asarray(seed, np.uint32),
               step=np.asarray(step, np.int32))

  @classmethod
  def greedy(cls, b: int) -> "SlotSampling":
    return cls.from_host(np.zeros(b), np.zeros(b), np.ones(b), np.zeros(b), np.zeros(b))


def _sample_rows(logits, s: SlotSampling):
  """Temperature / top-k / top-p sampling of every row; [B, V] -> [B].

  The top-k and top-p cut-offs are found on sorted logits, but the draw is
  over the vocabulary in token order: noise indexed by rank would move with
  any 1e-7 reordering of near-equal logits (different batch shapes round
  differently), and the same seed would then pick different tokens.
  """
  v = logits.shape[-1]
  scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
  sorted_desc = -jnp.sort(-scaled, axis=-1)                              # [B, V]
  rank = jnp.arange(v)[None, :]
  k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, v), v)[:, None]
  in_top_k = rank < k
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this rank
  kept = in_top_k & ((before < s.top_p[:, None]) | (rank == 0))
  threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
  masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seed, s.step)
  return jax.vmap(jax.random.categorical)(keys, masked)


def sample(logits, s: SlotSampling):
  """Next token of every slot; the sort only runs when some slot samples."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampled = jax.lax.cond(jnp.any(s.temperature > 0), lambda: _sample_rows(logits, s).astype(jnp.int32),
                         lambda: greedy)
  return jnp.where(s.temperature > 0, sampled, greedy)
