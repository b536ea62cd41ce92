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


@flax.struct.dataclass
class PageReaders:
  """Which rows read each page of the pool, for ``paged_attention``.

  A page read by one row (its own KV) is scored in the pool scan against that row's query; a page
  several rows read (a cached prompt prefix they share) is scored once per reading row, in a
  second pass over those (row, page-table column) entries.

  Attributes:
    owner: [Pn] the row that alone reads each page; B where none does or several do.
    logical: [Pn] the page's index in that row's sequence.
    shared: [B M] page-table entries ``row M + column``, those naming a shared page first.
    num_shared: int32 scalar, how many entries name a shared page.
  """

  owner: jax.Array
  logical: jax.Array
  shared: jax.Array
  num_shared: jax.Array


def page_readers(page_table, num_pages: int) -> PageReaders:
  """The readers of every page named in ``page_table`` [B, M] (ids >= ``num_pages``: no page)."""
  b, m = page_table.shape
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, m))
  logical = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[None, :], (b, m))
  readers = jnp.zeros((num_pages,), jnp.int32).at[page_table].add(1, mode="drop")
  owner = jnp.full((num_pages,), b, jnp.int32).at[page_table].set(rows, mode="drop")
  index = jnp.zeros((num_pages,), jnp.int32).at[page_table].set(logical, mode="drop")
  is_shared = readers[jnp.minimum(page_table, num_pages - 1)].reshape(-1) > 1  # [B M]
  is_shared &= page_table.reshape(-1) < num_pages
  return PageReaders(
    owner=jnp.where(readers == 1, owner, b),
    logical=index,
    shared=jnp.argsort(~is_shared, stable=True).astype(jnp.int32),
    num_shared=is_shared.sum(dtype=jnp.int32),
  )


def paged_attention(q, keys, values, page_table, positions, readers: PageReaders, num_chunks, chunk: int):
  """One query per row against that row's pages, scanning the pool's first pages chunk by chunk.

  Every scanned page is scored against its owner's query (a gather of B queries, never of the
  pages), then each row combines its pages' partial softmaxes in logical page order, so a row's
  result does not depend on where its pages sit in the pool or on the other rows. The number of
  chunks is an argument, not a shape: one executable scans exactly as far as the pages in use
  reach (measured on XLA:CPU: a static slice of the pool was copied before attending, and a menu
  of static extents multiplied the executables). Pages several rows share (a cached prefix) are
  gathered per reading row instead, ``chunk`` entries at a time, as many chunks as they need (none
  without prefix caching).

  Grouped-query attention reads each page once for the R query heads that share its kv head.

  Args:
    q: [B, N, H] scaled queries; query head ``k R + r`` reads kv head ``k``.
    keys, values: [Pn, K, G, H], one layer of the pool.
    page_table: [B, M]; ids >= Pn are skipped.
    positions: [B] the last visible position of each row.
    readers: from ``page_readers``.
    num_chunks: int32 scalar, chunks of ``chunk`` pages to scan from page 0 (every page a row
      uses is in them).
    chunk: pages per chunk (static).

  Returns:
    [B, N, H] attention outputs in fp32.
  """
  b, n, h = q.shape
  pn, kv, g, _ = keys.shape
  m = page_table.shape[1]
  q = q.reshape(b, kv, n // kv, h)  # [B, K, R, H]
  chunk = min(chunk, pn)

  def partial_softmax(queries, page_keys, page_values, visible):  # [C, K, R, H], [C, K, G, H], [C, G]
    scores = jnp.einsum("pkrh,pkgh->pkrg", queries, page_keys, preferred_element_type=jnp.float32)
    visible = visible[:, None, None, :]  # [C, 1, 1, G]
    scores = jnp.where(visible, scores, MASK_VALUE)
    page_max = scores.max(-1)  # [C, K, R]
    weights = jnp.where(visible, jnp.exp(scores - page_max[..., None]), 0.0)
    page_out = jnp.einsum(
      "pkrg,pkgh->pkrh", weights.astype(page_values.dtype), page_values, preferred_element_type=jnp.float32
    )  # [C, K, R, H]
    return page_max, weights.sum(-1), page_out

  def scan(c, partials):
    start = jnp.minimum(c * chunk, pn - chunk)  # the last chunk may overlap the one before
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk, 0)
    own, index = take(readers.owner), take(readers.logical)
    mine = jnp.minimum(own, b - 1)
    token = index[:, None] * g + jnp.arange(g, dtype=jnp.int32)[None, :]  # [C, G]
    visible = (own < b)[:, None] & (token <= positions[mine][:, None])
    part = partial_softmax(q[mine], take(keys), take(values), visible)
    put = lambda all_pages, part: jax.lax.dynamic_update_slice_in_dim(all_pages, part, start, 0)
    return tuple(map(put, partials, part))

  entries = min(chunk, b * m)

  def scan_shared(c, partials):
    start = jnp.minimum(c * entries, b * m - entries)
    index = jnp.arange(entries, dtype=jnp.int32) + start
    entry = jax.lax.dynamic_slice_in_dim(readers.shared, start, entries, 0)  # [C]
    row, column = entry // m, entry % m
    page = jnp.minimum(page_table[row, column], pn - 1)
    token = column[:, None] * g + jnp.arange(g, dtype=jnp.int32)[None, :]  # [C, G]
    visible = (index < readers.num_shared)[:, None] & (token <= positions[row][:, None])
    part = partial_softmax(q[row], jnp.take(keys, page, axis=0), jnp.take(values, page, axis=0), visible)
    target = jnp.where(index < readers.num_shared, entry, b * m)  # the rest: dropped
    return tuple(all_entries.at[target].set(p, mode="drop") for all_entries, p in zip(partials, part))

  r = n // kv
  empty = lambda count: (  # the last one: no page
    jnp.full((count + 1, kv, r), MASK_VALUE),
    jnp.zeros((count + 1, kv, r)),
    jnp.zeros((count + 1, kv, r, h)),
  )
  by_page = jax.lax.fori_loop(0, num_chunks, scan, empty(pn))
  by_entry = jax.lax.fori_loop(0, -(-readers.num_shared // entries), scan_shared, empty(b * m))
  table = jnp.minimum(page_table, pn)  # [B, M]
  is_shared = readers.owner[jnp.minimum(table, pn - 1)] == b  # [B, M]; no page reads MASK either way
  pick = lambda page_part, entry_part: jnp.where(
    is_shared.reshape(b, m, *(1,) * (page_part.ndim - 1)),
    entry_part[: b * m].reshape(b, m, *entry_part.shape[1:]),
    page_part[table],
  )
  row_max, row_sum, row_out = map(pick, by_page, by_entry)  # [B, M, K, R (, H)]
  scale = jnp.exp(row_max - row_max.max(1, keepdims=True))  # [B, M, K, R]
  denom = (scale * row_sum).sum(1)  # [B, K, R]
  out = (scale[..., None] * row_out).sum(1)  # [B, K, R, H]
  return (out / jnp.maximum(denom, 1e-30)[..., None]).reshape(b, n, h)
