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


def _ordered_keys(x):
  """uint32 keys with the order of the float32 values ``x`` (negative floats flip every bit)."""
  u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _largest_key(ok):
  """Per row, the largest uint32 ``t`` with ``ok(t)`` [B] true, for ``ok`` true at 0 and false
  from some point on: 32 halvings of the whole uint32 range, each one masked pass over V."""
  def halve(_, bounds):
    lo, hi = bounds  # ok(lo); the answer is in [lo, hi]
    gap = hi - lo
    mid = lo + (gap >> 1) + (gap & 1)  # upper middle, without overflowing
    good = ok(mid)
    return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)
  rows = ok(jnp.uint32(0)).shape[0]
  lo = jnp.zeros((rows,), jnp.uint32)
  return jax.lax.fori_loop(0, 32, halve, (lo, jnp.full_like(lo, 0xFFFFFFFF)))[0]


def _top_k_top_p(scaled, s: SlotSampling):
  """Masks every token outside each row's top-k, then outside its top-p nucleus; [B, V] -> [B, V].

  Exact, without sorting the vocabulary (a sort of [32, 50257] took ~300 ms on XLA:CPU): the
  k-th largest value is the largest t with k values >= t, and the nucleus's smallest value the
  largest t whose values >= t hold top_p of the top-k mass; both are found by halving the
  range of the values' bit patterns. Rows without top-k or top-p keep every token.
  """
  v = scaled.shape[-1]
  keys = _ordered_keys(scaled)                                   # [B, V]
  probs = jax.nn.softmax(scaled, axis=-1)
  k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, v), v)[:, None]
  mass = lambda t: jnp.where(keys >= t[..., None], probs, 0.0).sum(-1)
  kth = _largest_key(lambda t: (keys >= t[..., None]).sum(-1) >= k[:, 0])
  wanted = s.top_p * mass(kth)  # top_p of the top-k's mass: top-p applies after top-k
  nucleus = _largest_key(lambda t: mass(t) >= wanted)
  return jnp.where(keys >= nucleus[:, None], scaled, -jnp.inf)


def _sample_rows(logits, s: SlotSampling):
  """Temperature / top-k / top-p sampling of every row; [B, V] -> [B].

  The draw is over the vocabulary in token order: noise indexed by rank would move with any
  1e-7 reordering of near-equal logits (different batch shapes round differently), and the same
  seed would then pick different tokens.
  """
  scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
  restricts = (s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1))
  masked = jax.lax.cond(jnp.any(restricts), lambda: _top_k_top_p(scaled, s), lambda: scaled)
  keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seed, s.step)
  return jax.vmap(jax.random.categorical)(keys, masked)


def sample(logits, s: SlotSampling):
  """Next token of every row; the sampling work only runs when some row samples."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampled = jax.lax.cond(jnp.any(s.temperature > 0), lambda: _sample_rows(logits, s).astype(jnp.int32),
                         lambda: greedy)
  return jnp.where(s.temperature > 0, sampled, greedy)
