"""The paged KV pool and every operation on it.

Shape legend: L layers, Pn pages in the pool, P pages a decode scans (its extent), G tokens per
page, B decode rows, M pages per sequence (a page-table row), K kv heads (== N heads here),
H head dim, X tokens written at once.

The pool holds all KV memory the budget allows, allocated once: per layer one
``[Pn, K, G, H]`` array of keys and one of values. A sequence's tokens live in the pages its
page-table row names, in logical order: position ``p`` is token ``p % G`` of page
``table[p // G]``. Page ``Pn`` means "no page": writes to it are dropped and attention skips it.

Why pages, not one ``[slots, K, S, H]`` arena per cache-length class (the A/B is in
BENCHMARKS.md): with arenas, one decode step for every live class needs one executable per
combination of arena sizes (1,433 for the benchmark's budget), so wave 1 ran one call per arena
and read the weights once per arena; a move to a longer class copied the sequence's KV; and
attention scanned every slot's whole class length. With pages, one executable per
(rows, pages scanned) serves every mix of classes, a move is a page-table entry, attention scans
only the pages in use, and the memory never changes size. Heads come before tokens in a page
(on XLA:CPU ``[.., K, S, H]`` ran decode attention 2-3.8x faster than ``[.., S, K, H]``), and
each layer has its own array (a stacked ``[L, ...]`` cache was copied per layer every step).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from s3jax.models.config import ModelConfig

MASK_VALUE = -1e30  # finite: rows and pages with nothing visible must not produce NaN


@flax.struct.dataclass
class PagePool:
  keys: tuple[jax.Array, ...]    # L x [Pn, K, G, H]
  values: tuple[jax.Array, ...]  # L x [Pn, K, G, H]

  @property
  def num_pages(self) -> int:
    return self.keys[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.keys[0].shape[2]

  @property
  def dtype(self):
    return self.keys[0].dtype

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.keys + self.values)


def layer_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
  """[Pn, K, G, H] of one layer's keys (or values)."""
  return (num_pages, cfg.n_kv_heads, page_size, cfg.head_dim)


def pool_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> int:
  return num_pages * page_size * cfg.kv_bytes_per_token(jnp.dtype(dtype).itemsize)


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> PagePool:
  """A zeroed pool; built on the host and copied, so that creating one compiles nothing."""
  zeros = np.zeros(layer_shape(cfg, num_pages, page_size), jnp.dtype(dtype))
  layers = lambda: tuple(jax.device_put(zeros) for _ in range(cfg.n_layers))
  return PagePool(keys=layers(), values=layers())


def write(layer, rows, pages, offsets):
  """Writes token rows into one layer of the pool (jit with the pool donated: in place).

  Args:
    layer: [Pn, K, G, H].
    rows: [X, K, H] keys or values of X tokens.
    pages, offsets: [X] page and token-in-page of each; page Pn drops the row.
  """
  return layer.at[pages, :, offsets].set(rows.astype(layer.dtype), mode="drop")


def page_owners(page_table, extent: int):
  """Which row owns each scanned page, and where the page sits in that row's sequence.

  Args:
    page_table: [B, M] int32 page ids; ids >= ``extent`` (Pn included) are not scanned.
    extent: P, the pages scanned.

  Returns:
    owner [P] (B where no row owns the page) and logical [P] (page index in its sequence).
  """
  b, m = page_table.shape
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, m))
  logical = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[None, :], (b, m))
  owner = jnp.full((extent,), b, jnp.int32).at[page_table].set(rows, mode="drop")
  index = jnp.zeros((extent,), jnp.int32).at[page_table].set(logical, mode="drop")
  return owner, index


def paged_attention(q, keys, values, page_table, positions, owner, logical):
  """One query per row against that row's pages, scanning the whole extent once.

  Every scanned page is scored against its owner's query (a gather of B queries, never of
  the pages), then each row combines its pages' partial softmaxes in logical page order, so a
  row's result does not depend on where its pages sit in the pool or on the other rows.

  Args:
    q: [B, N, H] scaled queries.
    keys, values: [P, K, G, H], the scanned extent of one layer.
    page_table: [B, M]; ids >= P are skipped.
    positions: [B] the last visible position of each row.
    owner, logical: [P] from ``page_owners``.

  Returns:
    [B, N, H] attention outputs in fp32.
  """
  b = q.shape[0]
  p, _, g, _ = keys.shape
  mine = jnp.minimum(owner, b - 1)
  scores = jnp.einsum("pnh,pngh->png", q[mine], keys, preferred_element_type=jnp.float32)
  token = logical[:, None] * g + jnp.arange(g, dtype=jnp.int32)[None, :]        # [P, G]
  visible = (owner < b)[:, None] & (token <= positions[mine][:, None])           # [P, G]
  scores = jnp.where(visible[:, None, :], scores, MASK_VALUE)
  page_max = scores.max(-1)                                                      # [P, N]
  weights = jnp.where(visible[:, None, :], jnp.exp(scores - page_max[..., None]), 0.0)
  page_sum = weights.sum(-1)                                                     # [P, N]
  page_out = jnp.einsum("png,pngh->pnh", weights.astype(values.dtype), values,
                        preferred_element_type=jnp.float32)                      # [P, N, H]
  # Gather each row's partials in logical order; index P is an empty page.
  table = jnp.where(page_table < p, page_table, p)
  pad = lambda a, fill: jnp.concatenate([a, jnp.full((1,) + a.shape[1:], fill, a.dtype)])
  row_max = pad(page_max, MASK_VALUE)[table]                                     # [B, M, N]
  best = row_max.max(1, keepdims=True)                                           # [B, 1, N]
  scale = jnp.exp(row_max - best)                                                # [B, M, N]
  denom = (scale * pad(page_sum, 0.0)[table]).sum(1)                             # [B, N]
  out = (scale[..., None] * pad(page_out, 0.0)[table]).sum(1)                    # [B, N, H]
  return out / jnp.maximum(denom, 1e-30)[..., None]
