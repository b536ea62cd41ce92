"""The KV cache pytree and every operation on it.

Shape legend: L layers, B slots, K kv heads, S cache length, H head dim,
P prefill batch, T prefill tokens.

A cache of one length class is an arena: per layer, one ``[B, K, S, H]``
array of keys and one of values. Heads come before length: on XLA:CPU this
layout ran decode attention 2-3.8x faster than ``[B, S, K, H]`` (see
NOTES.md). One array per layer rather than one ``[L, B, K, S, H]`` array:
XLA:CPU copied each layer's slice of a stacked cache out before attending,
every decode step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from s3jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  keys: tuple[jax.Array, ...]    # L x [B, K, S, H]
  values: tuple[jax.Array, ...]  # L x [B, K, S, H]

  @property
  def slots(self) -> int:
    return self.keys[0].shape[0]

  @property
  def cache_len(self) -> int:
    return self.keys[0].shape[2]

  @property
  def dtype(self):
    return self.keys[0].dtype

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.keys + self.values)


def layer_shape(cfg: ModelConfig, slots: int, cache_len: int) -> tuple[int, ...]:
  """[B, K, S, H] of one layer's keys (or values)."""
  return (slots, cfg.n_kv_heads, cache_len, cfg.head_dim)


def init_cache(cfg: ModelConfig, slots: int, cache_len: int, dtype) -> KVCache:
  shape = layer_shape(cfg, slots, cache_len)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return KVCache(keys=zeros(), values=zeros())


def insert(cache: KVCache, keys, values, slots) -> KVCache:
  """Writes prefilled rows into cache slots (jit this with the cache donated).

  Args:
    cache: the arena, L x [B, K, S, H].
    keys, values: L x [P, K, T, H] with T <= S, from ``prefill``.
    slots: [P] int32 destination slot of each row; out-of-range (e.g. B) rows
      are padding and are dropped.
  """
  t = keys[0].shape[2]
  put = lambda arena, rows: tuple(a.at[slots, :, :t].set(r, mode="drop") for a, r in zip(arena, rows))
  return KVCache(keys=put(cache.keys, keys), values=put(cache.values, values))


def copy_slot(src: KVCache, dst: KVCache, src_slot, dst_slot) -> KVCache:
  """Copies one sequence's whole row from a shorter arena into a longer one."""
  def copy(src_arena, dst_arena):
    return tuple(jax.lax.dynamic_update_slice(d, jax.lax.dynamic_slice_in_dim(s, src_slot, 1, axis=0),
                                              (dst_slot, 0, 0, 0))
                 for s, d in zip(src_arena, dst_arena))
  return KVCache(keys=copy(src.keys, dst.keys), values=copy(src.values, dst.values))


def resize_via_host(cache: KVCache | None, cfg: ModelConfig, new_slots: int, cache_len: int, dtype,
                    row_map: tuple[tuple[int, int], ...]) -> KVCache | None:
  """Re-allocates an arena with a different slot count, keeping mapped rows.

  The kept rows are staged through host memory and the old arena is deleted
  before the new one is allocated, so device memory never holds both: the
  scheduler's byte budget stays exact while arenas change size. Staging and
  ``device_put`` compile nothing, so resizing never adds compilations.
  """
  kept = {}
  if cache is not None:
    if row_map:
      src = np.asarray([old for old, _ in row_map])
      kept = {name: [np.asarray(a[src]) for a in getattr(cache, name)] for name in ("keys", "values")}
    for a in cache.keys + cache.values:
      a.delete()
  if new_slots == 0:
    return None
  shape = layer_shape(cfg, new_slots, cache_len)
  arenas = {}
  for name in ("keys", "values"):
    layers = []
    for layer in range(cfg.n_layers):
      host = np.zeros(shape, dtype)
      if kept:
        host[np.asarray([new for _, new in row_map])] = kept[name][layer]
      layers.append(jax.device_put(host))
    arenas[name] = tuple(layers)
  return KVCache(**arenas)
