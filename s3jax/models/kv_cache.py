"""The paged KV pool and every operation on it.

Shape legend: L layers, Pn pages in the pool, C pages per attention chunk, G tokens per page,
B decode rows, M pages per sequence (a page-table row), N query heads, K kv heads, R query heads
per kv head (N = K R; R > 1 is grouped-query attention), H head dim, X tokens written at once.

The pool holds all KV memory the budget allows, allocated once: per layer one
``[Pn, K, G, H]`` array of keys and one of values. A sequence's tokens live in the pages its
page-table row names, in logical order: position ``p`` is token ``p % G`` of page
``table[p // G]``. Page ``Pn`` means "no page": writes to it are dropped and attention skips it.

Why pages, not one ``[slots, K, S, H]`` arena per cache-length class (the A/B is in
BENCHMARKS.md): with arenas, one decode step for every live class needs one executable per
combination of arena sizes (1,433 for the benchmark's budget), so wave 1 ran one call per arena
and read the weights once per arena; a move to a longer class copied the sequence's KV; and
attention scanned every slot's whole class length. With pages, one executable per number of rows
serves every mix of classes, a move is a page-table entry, attention scans only as far as the
pages in use reach, and the memory never changes size. Heads come before tokens in a page
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
  """Per layer one array of keys and one of values, [Pn, K, G, H]; split into pipeline stages,
  per layer slot one [S, Pn, K, G, H] (``s3jax.parallel.pipeline``)."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]

  @property
  def num_pages(self) -> int:
    return self.keys[0].shape[-4]

  @property
  def page_size(self) -> int:
    return self.keys[0].shape[-2]

  @property
  def dtype(self):
    return self.keys[0].dtype

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.keys + self.values)


def layer_shape(cfg: ModelConfig, num_pages: int, page_size: int, stages: int = 1) -> tuple[int, ...]:
  """[Pn, K, G, H] of one layer's keys (or values); [S, Pn, K, G, H] of one slot over S stages."""
  return (stages,) * (stages > 1) + (num_pages, cfg.n_kv_heads, page_size, cfg.head_dim)


def pool_arrays(cfg: ModelConfig, stages: int = 1) -> int:
  """Arrays of keys (and of values) in the pool: one per layer, or per slot over stages."""
  return cfg.n_layers // stages


def pool_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> int:
  return num_pages * page_size * cfg.kv_bytes_per_token(jnp.dtype(dtype).itemsize)


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype, stages: int = 1) -> PagePool:
  """A zeroed pool on the host (the runner places it), so that creating one compiles nothing."""
  zeros = np.zeros(layer_shape(cfg, num_pages, page_size, stages), jnp.dtype(dtype))
  layers = lambda: tuple(zeros for _ in range(pool_arrays(cfg, stages)))
  return PagePool(keys=layers(), values=layers())


def write(layer, rows, pages, offsets):
  """Writes token rows into one layer of the pool (jit with the pool donated: in place).

  Args:
    layer: [Pn, K, G, H].
    rows: [X, K, H] keys or values of X tokens.
    pages, offsets: [X] page and token-in-page of each; page Pn drops the row.
  """
  return layer.at[pages, :, offsets].set(rows.astype(layer.dtype), mode="drop")


def page_owners(page_table, num_pages: int):
  """Which row owns each page, and where the page sits in that row's sequence.

  Args:
    page_table: [B, M] int32 page ids; ``num_pages`` (no page) is skipped.
    num_pages: Pn.

  Returns:
    owner [Pn] (B where no row owns the page) and logical [Pn] (page index in its sequence).
  """
  b, m = page_table.shape
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, m))
  logical = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[None, :], (b, m))
  owner = jnp.full((num_pages,), b, jnp.int32).at[page_table].set(rows, mode="drop")
  index = jnp.zeros((num_pages,), jnp.int32).at[page_table].set(logical, mode="drop")
  return owner, index


def paged_attention(q, keys, values, page_table, positions, owner, logical, num_chunks, chunk: int):
  """One query per row against that row's pages, scanning the pool's first pages chunk by chunk.

  Every scanned page is scored against its owner's query (a gather of B queries, never of the
  pages), then each row combines its pages' partial softmaxes in logical page order, so a row's
  result does not depend on where its pages sit in the pool or on the other rows. The number of
  chunks is an argument, not a shape: one executable scans exactly as far as the pages in use
  reach (measured on XLA:CPU: a static slice of the pool was copied before attending, and a menu
  of static extents multiplied the executables).

  Grouped-query attention reads each page once for the R query heads that share its kv head.

  Args:
    q: [B, N, H] scaled queries; query head ``k R + r`` reads kv head ``k``.
    keys, values: [Pn, K, G, H], one layer of the pool.
    page_table: [B, M]; ids >= Pn are skipped.
    positions: [B] the last visible position of each row.
    owner, logical: [Pn] from ``page_owners``.
    num_chunks: int32 scalar, chunks of ``chunk`` pages to scan from page 0 (every page a row
      uses is in them).
    chunk: pages per chunk (static).

  Returns:
    [B, N, H] attention outputs in fp32.
  """
  b, n, h = q.shape
  pn, kv, g, _ = keys.shape
  q = q.reshape(b, kv, n // kv, h)  # [B, K, R, H]
  chunk = min(chunk, pn)

  def scan(c, partials):
    start = jnp.minimum(c * chunk, pn - chunk)  # the last chunk may overlap the one before
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk, 0)
    own, index = take(owner), take(logical)
    mine = jnp.minimum(own, b - 1)
    scores = jnp.einsum("pkrh,pkgh->pkrg", q[mine], take(keys), preferred_element_type=jnp.float32)
    token = index[:, None] * g + jnp.arange(g, dtype=jnp.int32)[None, :]  # [C, G]
    visible = ((own < b)[:, None] & (token <= positions[mine][:, None]))[:, None, None, :]  # [C, 1, 1, G]
    scores = jnp.where(visible, scores, MASK_VALUE)
    page_max = scores.max(-1)  # [C, K, R]
    weights = jnp.where(visible, jnp.exp(scores - page_max[..., None]), 0.0)
    page_out = jnp.einsum(
      "pkrg,pkgh->pkrh", weights.astype(values.dtype), take(values), preferred_element_type=jnp.float32
    )  # [C, K, R, H]
    put = lambda all_pages, part: jax.lax.dynamic_update_slice_in_dim(all_pages, part, start, 0)
    return tuple(map(put, partials, (page_max, weights.sum(-1), page_out)))

  r = n // kv
  empty = (  # page Pn: no page
    jnp.full((pn + 1, kv, r), MASK_VALUE),
    jnp.zeros((pn + 1, kv, r)),
    jnp.zeros((pn + 1, kv, r, h)),
  )
  page_max, page_sum, page_out = jax.lax.fori_loop(0, num_chunks, scan, empty)
  table = jnp.minimum(page_table, pn)  # [B, M]
  row_max = page_max[table]  # [B, M, K, R]
  scale = jnp.exp(row_max - row_max.max(1, keepdims=True))  # [B, M, K, R]
  denom = (scale * page_sum[table]).sum(1)  # [B, K, R]
  out = (scale[..., None] * page_out[table]).sum(1)  # [B, K, R, H]
  return (out / jnp.maximum(denom, 1e-30)[..., None]).reshape(b, n, h)
