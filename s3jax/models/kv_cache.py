"""The KV cache pytree and every operation on it.

Shape legend: L layers, B slots, K kv heads, S cache length, H head dim,
P prefill batch, T prefill tokens.

A cache of one length class is an arena ``[L, B, K, S, H]`` for keys and one
for values. Heads come before length: on XLA:CPU this layout ran decode
attention 2-3.8x faster than ``[L, B, S, K, H]`` (see NOTES.md), and it keeps
each (slot, head) row contiguous for the per-slot copies below.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from s3jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  keys: jax.Array    # [L, B, K, S, H]
  values: jax.Array  # [L, B, K, S, H]

  @property
  def slots(self) -> int:
    return self.keys.shape[1]

  @property
  def cache_len(self) -> int:
    return self.keys.shape[3]

  @property
  def nbytes(self) -> int:
    return self.keys.nbytes + self.values.nbytes


def cache_shape(cfg: ModelConfig, slots: int, cache_len: int) -> tuple[int, ...]:
  return (cfg.n_layers, slots, cfg.n_kv_heads, cache_len, cfg.head_dim)


def init_cache(cfg: ModelConfig, slots: int, cache_len: int, dtype) -> KVCache:
  shape = cache_shape(cfg, slots, cache_len)
  return KVCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype))


def insert(cache: KVCache, keys, values, slots) -> KVCache:
  """Writes prefilled rows into cache slots (jit this with the cache donated).

  Args:
    cache: arena [L, B, K, S, H].
    keys, values: [L, P, K, T, H] with T <= S, from ``prefill``.
    slots: [P] int32 destination slot of each row; out-of-range (e.g. B) rows
      are padding and are dropped.
  """
  t = keys.shape[3]
  k = cache.keys.at[:, slots, :, :t].set(keys, mode="drop")
  v = cache.values.at[:, slots, :, :t].set(values, mode="drop")
  return KVCache(keys=k, values=v)


def copy_slot(src: KVCache, dst: KVCache, src_slot, dst_slot) -> KVCache:
  """Copies one sequence's whole row from a shorter arena into a longer one."""
  row_k = jax.lax.dynamic_slice_in_dim(src.keys, src_slot, 1, axis=1)
  row_v = jax.lax.dynamic_slice_in_dim(src.values, src_slot, 1, axis=1)
  start = (0, dst_slot, 0, 0, 0)
  return KVCache(keys=jax.lax.dynamic_update_slice(dst.keys, row_k, start),
                 values=jax.lax.dynamic_update_slice(dst.values, row_v, start))


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
      kept = {"keys": np.asarray(cache.keys[:, src]), "values": np.asarray(cache.values[:, src])}
    cache.keys.delete()
    cache.values.delete()
  if new_slots == 0:
    return None
  shape = cache_shape(cfg, new_slots, cache_len)
  host = {"keys": np.zeros(shape, dtype), "values": np.zeros(shape, dtype)}
  if kept:
    dst = np.asarray([new for _, new in row_map])
    for name in host:
      host[name][:, dst] = kept[name]
  return KVCache(keys=jax.device_put(host["keys"]), values=jax.device_put(host["values"]))
