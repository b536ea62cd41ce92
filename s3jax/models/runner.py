"""ModelRunner: parameters plus one compiled executable per static shape.

Shape legend: P prefill batch, T padded prompt tokens, B arena slots,
S arena cache length, V vocab.

The runner knows nothing of buckets or scheduling. It exposes the JetStream-
shaped contract the engine drives: ``prefill`` (padded prompts -> first
tokens + KV rows padded to an arena's length), ``insert`` (rows into arena
slots), ``decode`` (one token for every slot of an arena). Each is a pure
function of (params, state) compiled ahead of time per shape
(``jit(...).lower(...).compile()``) and kept in a dict keyed by shape; caches
are donated so XLA updates them in place. ``compilations`` counts those
compiles; ``xla_compilations()`` counts every XLA compile in the process, so a
test can prove that steady-state serving compiles nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.models import gpt, kv_cache
from s3jax.models.checkpoint import load_hf_checkpoint, random_params
from s3jax.models.config import ModelConfig, load_model_config
from s3jax.models.kv_cache import KVCache
from s3jax.models.sampling import SlotSampling, sample

_xla_compiles = 0
_listener_lock = threading.Lock()
_listener_installed = False


def xla_compilations() -> int:
  """Number of XLA backend compilations in this process so far."""
  global _listener_installed
  with _listener_lock:
    if not _listener_installed:
      def on_event(event: str, duration: float, **kwargs):
        global _xla_compiles
        if event == "/jax/core/compile/backend_compile_duration":
          _xla_compiles += 1
      jax.monitoring.register_event_duration_secs_listener(on_event)
      _listener_installed = True
  return _xla_compiles


DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def prefill_lengths(max_seq_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Padded prompt lengths compiled for prefill: powers of two up to the maximum."""
  lengths, n = [], smallest
  while n < max_seq_len:
    lengths.append(n)
    n *= 2
  return tuple(lengths) + (max_seq_len,)


class ModelRunner:
  """Owns the model's parameters and its compiled step functions."""

  def __init__(self, cfg: ModelConfig, graphdef, params, *, dtype=jnp.float32,
               prefill_batch_sizes: tuple[int, ...] = (1, 4, 16)):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.graphdef = graphdef
    self.params = params
    self.prefill_lengths = prefill_lengths(cfg.max_seq_len)
    self.prefill_batch_sizes = tuple(sorted(prefill_batch_sizes))
    self.compilations = 0
    self._executables: dict[tuple, object] = {}
    xla_compilations()  # install the listener before the first compile

  @classmethod
  def load(cls, model: str | Path = "tiny", *, dtype: str = "float32", seed: int = 0, **kwargs) -> "ModelRunner":
    """A named config under ``configs/models/`` (random weights) or a checkpoint directory."""
    jdtype = DTYPES.get(dtype)
    if jdtype is None:
      raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    path = Path(model)
    if path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))):
      cfg, graphdef, params = load_hf_checkpoint(path, jdtype)
    else:
      cfg = load_model_config(model)
      graphdef, params = random_params(cfg, seed, jdtype)
    return cls(cfg, graphdef, params, dtype=jdtype, **kwargs)

  @property
  def param_bytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.params))

  def kv_bytes_per_token(self) -> int:
    return self.cfg.kv_bytes_per_token(self.dtype.itemsize)

  # -- compiled executables ------------------------------------------------

  def _executable(self, key: tuple, fn, args, donate: tuple[int, ...] = ()):
    exe = self._executables.get(key)
    if exe is None:
      exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
      self._executables[key] = exe
      self.compilations += 1
    return exe

  def _prefill_fn(self, cache_len: int):
    graphdef = self.graphdef

    def fn(params, tokens, lengths, sampling):
      model = nnx.merge(graphdef, params)
      logits, keys, values = gpt.prefill(model, tokens, lengths)
      pad = [(0, 0), (0, 0), (0, cache_len - tokens.shape[1]), (0, 0)]
      return (sample(logits, sampling), tuple(jnp.pad(k, pad) for k in keys),
              tuple(jnp.pad(v, pad) for v in values))
    return fn

  def _decode_fn(self):
    graphdef = self.graphdef

    def fn(params, cache: KVCache, tokens, positions, sampling):
      model = nnx.merge(graphdef, params)
      logits, keys, values = gpt.decode(model, cache.keys, cache.values, tokens, positions)
      return sample(logits, sampling), KVCache(keys=keys, values=values)
    return fn

  # -- the engine contract --------------------------------------------------

  def padded_prefill_shape(self, batch: int, max_len: int) -> tuple[int, int]:
    """(P, T) a prefill of ``batch`` prompts of up to ``max_len`` tokens runs at."""
    if max_len > self.cfg.max_seq_len:
      raise ValueError(f"prompt of {max_len} tokens exceeds the model's maximum sequence length "
                       f"{self.cfg.max_seq_len}; shorten the prompt")
    t = next(n for n in self.prefill_lengths if n >= max_len)
    p = next((n for n in self.prefill_batch_sizes if n >= batch), None)
    if p is None:
      raise ValueError(f"prefill batch {batch} exceeds the largest compiled size {self.prefill_batch_sizes[-1]}")
    return p, t

  def prefill(self, prompts: list[np.ndarray], sampling: SlotSampling, cache_len: int):
    """Prefills right-padded prompts and samples each one's first answer token.

    Args:
      prompts: token-id arrays, each of 1..cache_len tokens.
      sampling: per-prompt settings, padded to the compiled batch P.
      cache_len: S of the arena the rows will be inserted into.

    Returns:
      next_tokens [P] (device), keys and values L x [P, K, S, H] (device).
    """
    p, t = self.padded_prefill_shape(len(prompts), max(len(x) for x in prompts))
    if t > cache_len:
      t = cache_len
      if max(len(x) for x in prompts) > cache_len:
        raise ValueError(f"prompt longer than the arena's cache length {cache_len}")
    tokens = np.zeros((p, t), np.int32)
    lengths = np.ones((p,), np.int32)
    for i, x in enumerate(prompts):
      tokens[i, :len(x)] = x
      lengths[i] = len(x)
    args = (self.params, tokens, lengths, sampling)
    exe = self._executable(("prefill", p, t, cache_len), self._prefill_fn(cache_len), args)
    return exe(*args)

  def insert(self, cache: KVCache, keys, values, slots: np.ndarray) -> KVCache:
    """Writes prefilled rows into slots; ``slots[i] == cache.slots`` drops row i."""
    args = (cache, keys, values, np.asarray(slots, np.int32))
    exe = self._executable(("insert", cache.slots, cache.cache_len, keys[0].shape[0]), kv_cache.insert, args,
                           donate=(0,))
    return exe(*args)

  def decode(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray, sampling: SlotSampling):
    """One decode step for every slot; returns (next_tokens [B] device, cache)."""
    args = (self.params, cache, np.asarray(tokens, np.int32), np.asarray(positions, np.int32), sampling)
    exe = self._executable(("decode", cache.slots, cache.cache_len), self._decode_fn(), args, donate=(1,))
    return exe(*args)

  def copy_slot(self, src: KVCache, dst: KVCache, src_slot: int, dst_slot: int) -> KVCache:
    """Copies a sequence's KV row from ``src`` into ``dst`` (a longer arena)."""
    args = (src, dst, np.int32(src_slot), np.int32(dst_slot))
    key = ("copy", src.slots, src.cache_len, dst.slots, dst.cache_len)
    return self._executable(key, kv_cache.copy_slot, args, donate=(1,))(*args)

  def init_cache(self, slots: int, cache_len: int) -> KVCache:
    return kv_cache.init_cache(self.cfg, slots, cache_len, self.dtype)

  def resize_cache(self, cache: KVCache | None, new_slots: int, cache_len: int,
                   row_map: tuple[tuple[int, int], ...]) -> KVCache | None:
    return kv_cache.resize_via_host(cache, self.cfg, new_slots, cache_len, self.dtype, row_map)

  def forward_logits(self, tokens: np.ndarray) -> np.ndarray:
    """All-position logits [B, T, V] without a cache (reference path for tests)."""
    return np.asarray(gpt.forward_full(nnx.merge(self.graphdef, self.params), jnp.asarray(tokens)))
