"""Per-slot sampling: greedy, temperature, top-k, top-p, per-request seeds, and log-probabilities.

Shape legend: B slots, V vocab, K ``MAX_TOP_LOGPROBS``.

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

# Most alternatives a request may ask log-probabilities of, per token (OpenAI's chat API allows 20).
MAX_TOP_LOGPROBS = 20


@flax.struct.dataclass
class SlotSampling:
  temperature: jax.Array  # [B] f32, 0 = greedy
  top_k: jax.Array  # [B] i32, 0 = no limit
  top_p: jax.Array  # [B] f32 in (0, 1]
  seed: jax.Array  # [B] u32
  step: jax.Array  # [B] i32, index of the token being sampled in its answer
  logprobs: jax.Array  # [B] i32, alternatives to report log-probabilities of (0..K); -1 = none at all

  @classmethod
  def from_host(cls, temperature, top_k, top_p, seed, step, logprobs=None) -> "SlotSampling":
    logprobs = np.full(np.shape(temperature), -1) if logprobs is None else logprobs
    return cls(
      temperature=np.asarray(temperature, np.float32),
      top_k=np.asarray(top_k, np.int32),
      top_p=np.asarray(top_p, np.float32),
      seed=np.asarray(seed, np.uint32),
      step=np.asarray(step, np.int32),
      logprobs=np.asarray(logprobs, np.int32),
    )

  @classmethod
  def greedy(cls, b: int) -> "SlotSampling":
    return cls.from_host(np.zeros(b), np.zeros(b), np.ones(b), np.zeros(b), np.zeros(b))

  @classmethod
  def abstract(cls, b: int) -> "SlotSampling":
    """Shapes and dtypes of ``b`` slots' settings, for compiling."""
    rows = lambda dt: jax.ShapeDtypeStruct((b,), dt)
    return cls(
      temperature=rows(jnp.float32),
      top_k=rows(jnp.int32),
      top_p=rows(jnp.float32),
      seed=rows(jnp.uint32),
      step=rows(jnp.int32),
      logprobs=rows(jnp.int32),
    )


@flax.struct.dataclass
class Sampled:
  """Each slot's sampled token and, for slots that asked (``logprobs >= 0``), log-probabilities
  under the model's distribution: the log-softmax of the logits, before temperature, top-k and
  top-p reshape them for sampling (what OpenAI and vLLM report). Zero where not asked."""

  tokens: jax.Array  # [B] i32
  logprobs: jax.Array  # [B] f32, of each slot's token
  top_ids: jax.Array  # [B, K] i32, the K most likely tokens, most likely first
  top_logprobs: jax.Array  # [B, K] f32

  @classmethod
  def zeros(cls, b: int) -> "Sampled":
    k = MAX_TOP_LOGPROBS
    return cls(
      tokens=np.zeros(b, np.int32),
      logprobs=np.zeros(b, np.float32),
      top_ids=np.zeros((b, k), np.int32),
      top_logprobs=np.zeros((b, k), np.float32),
    )

  @classmethod
  def abstract(cls, b: int) -> "Sampled":
    arr, k = jax.ShapeDtypeStruct, MAX_TOP_LOGPROBS
    return cls(
      tokens=arr((b,), jnp.int32),
      logprobs=arr((b,), jnp.float32),
      top_ids=arr((b, k), jnp.int32),
      top_logprobs=arr((b, k), jnp.float32),
    )


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
  keys = _ordered_keys(scaled)  # [B, V]
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
  sampled = jax.lax.cond(jnp.any(s.temperature > 0), lambda: _sample_rows(logits, s).astype(jnp.int32), lambda: greedy)
  return jnp.where(s.temperature > 0, sampled, greedy)


def _top_k(x, k: int):
  """The k largest values of each row and their indices, largest first; [B, V] -> [B, k] each.

  k passes of argmax in a loop: ``lax.top_k`` made every executable compile half again as long
  on XLA:CPU, for a result only the requests asking for log-probabilities pay to run."""

  def pick(i, carry):
    rest, ids, values = carry
    best = jnp.argmax(rest, axis=-1).astype(jnp.int32)  # [B]
    value = jnp.take_along_axis(rest, best[:, None], axis=-1)[:, 0]
    rest = rest.at[jnp.arange(rest.shape[0]), best].set(-jnp.inf)
    return rest, ids.at[:, i].set(best), values.at[:, i].set(value)

  b = x.shape[0]
  init = (x, jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), x.dtype))
  _, ids, values = jax.lax.fori_loop(0, k, pick, init)
  return ids, values


def sample_with_logprobs(logits, s: SlotSampling) -> Sampled:
  """``sample``, and the log-probabilities the slots asked for; the log-softmax and top-K only run
  when some slot asked."""
  tokens = sample(logits, s)
  b, k = logits.shape[0], MAX_TOP_LOGPROBS

  def measure():
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return chosen, *_top_k(logp, k)

  def skip():
    return jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)

  chosen, top_ids, top_logprobs = jax.lax.cond(jnp.any(s.logprobs >= 0), measure, skip)
  return Sampled(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_logprobs)


# Most alternatives a request may ask log-probabilities of per prompt token (OpenAI's completions
# API allows 5); a static shape of every prefill.
MAX_PROMPT_LOGPROBS = 5
# Packed tokens whose logits are formed at once when scoring a prompt: [C, V] fp32 at a time, never
# [T, V] (200 MB for 1,024 tokens of a 49k vocabulary).
PROMPT_SCORE_CHUNK = 128


@flax.struct.dataclass
class PromptScores:
  """At each packed token, the log-probability of the token that follows it in its sequence (given
  it and the tokens before it), and the ``MAX_PROMPT_LOGPROBS`` most likely alternatives'; the host
  files them under the following token (``Engine``), so a prompt prefilled in chunks is scored
  across their boundaries. Zeros at padding and past a sequence's end."""

  logprobs: jax.Array  # [T] f32
  top_ids: jax.Array  # [T, K] i32, most likely first
  top_logprobs: jax.Array  # [T, K] f32


def score_prompts(logits_fn, hidden, following, wanted) -> PromptScores:
  """Log-probabilities of the tokens that follow the packed ones; computed only when ``wanted``.

  Args:
    logits_fn: [C, D] -> [C, V] fp32, the model's final norm and unembedding.
    hidden: [T, D] the last block's output at every packed token.
    following: [T] int32, the token after each packed one in its sequence (any where none).
    wanted: bool scalar, some prompt of the pack asked for its log-probabilities.
  """
  t, k = following.shape[0], MAX_PROMPT_LOGPROBS
  c = min(PROMPT_SCORE_CHUNK, t)

  def chunk(i, scores):
    start = jnp.minimum(i * c, t - c)  # the last chunk may overlap the one before
    logp = jax.nn.log_softmax(logits_fn(jax.lax.dynamic_slice_in_dim(hidden, start, c, 0)), axis=-1)  # [C, V]
    nxt = jax.lax.dynamic_slice_in_dim(following, start, c, 0)
    chosen = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
    put = lambda all_rows, part: jax.lax.dynamic_update_slice_in_dim(all_rows, part, start, 0)
    return tuple(map(put, scores, (chosen, *_top_k(logp, k))))

  empty = lambda: (jnp.zeros((t,), jnp.float32), jnp.zeros((t, k), jnp.int32), jnp.zeros((t, k), jnp.float32))
  measure = lambda: jax.lax.fori_loop(0, -(-t // c), chunk, empty())
  logprobs, top_ids, top_logprobs = jax.lax.cond(wanted, measure, empty)
  return PromptScores(logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)
