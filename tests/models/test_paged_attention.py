"""``paged_attention`` against dense softmax attention over each row's own tokens, with pages
scattered across the pool, grouped-query heads, rows of different lengths, an empty row, and
prefix pages that several rows share."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.models.kv_cache import page_readers, paged_attention


def _dense(q, k, v):
  """q [N, H] against k, v [T, K, H]: softmax(q k^T) v per query head, kv head = head // R."""
  n, kv = q.shape[0], k.shape[1]
  out = np.zeros_like(q)
  for head in range(n):
    kh = head // (n // kv)
    scores = k[:, kh] @ q[head]
    w = np.exp(scores - scores.max())
    out[head] = (w / w.sum()) @ v[:, kh]
  return out


PN = 12  # pool pages
PRIVATE = [[7, 2, 10, 0], [5, PN, PN, PN], [11, 3, PN, PN], [PN, PN, PN, PN]]  # scattered, not in order
# Rows 0, 1 and 2 share page 7 (row 2 reads only part of it), rows 0 and 2 page 2 as well.
SHARED = [[7, 2, 10, 0], [7, 5, PN, PN], [7, 2, 3, PN], [PN, PN, PN, PN]]


@pytest.mark.parametrize(
  "heads, kv_heads, chunk, tables",
  [(4, 4, 2, PRIVATE), (6, 2, 3, PRIVATE), (6, 2, 16, PRIVATE), (4, 4, 2, SHARED), (6, 2, 3, SHARED)],
)
def test_paged_attention_equals_dense_attention_over_each_rows_tokens(heads, kv_heads, chunk, tables):
  rng = np.random.default_rng(0)
  pn, g, h = PN, 4, 8  # pool pages, tokens per page, head dim (4 pages per row)
  keys = rng.normal(size=(pn, kv_heads, g, h)).astype(np.float32)
  values = rng.normal(size=(pn, kv_heads, g, h)).astype(np.float32)
  lengths = [13, 1, 8, 0] if tables is PRIVATE else [13, 6, 10, 0]  # tokens visible per row (0: no page)
  q = rng.normal(size=(len(lengths), heads, h)).astype(np.float32)
  table = jnp.asarray(tables, jnp.int32)
  positions = jnp.asarray([max(n - 1, 0) for n in lengths], jnp.int32)
  num_chunks = jnp.int32(-(-pn // min(chunk, pn)))
  readers = page_readers(table, pn)
  assert int(readers.num_shared) == (0 if tables is PRIVATE else 5)
  out = np.asarray(paged_attention(jnp.asarray(q), keys, values, table, positions, readers, num_chunks, chunk))
  for row, n in enumerate(lengths):
    if n == 0:
      assert np.all(np.isfinite(out[row]))  # nothing visible: finite, never NaN
      continue
    pages = tables[row][: -(-n // g)]
    k = np.concatenate([keys[p].transpose(1, 0, 2) for p in pages])[:n]  # [T, K, H]
    v = np.concatenate([values[p].transpose(1, 0, 2) for p in pages])[:n]
    np.testing.assert_allclose(out[row], _dense(q[row], k, v), rtol=1e-5, atol=1e-5)


def test_a_rows_result_does_not_depend_on_the_other_rows_or_where_its_pages_sit():
  rng = np.random.default_rng(1)
  pn, kv, g, h = 8, 2, 4, 8
  keys = rng.normal(size=(pn, kv, g, h)).astype(np.float32)
  values = rng.normal(size=(pn, kv, g, h)).astype(np.float32)
  q = rng.normal(size=(2, 4, h)).astype(np.float32)

  def run(table, keys, values):
    table = jnp.asarray(table, jnp.int32)
    positions = jnp.asarray([6, 3], jnp.int32)
    readers = page_readers(table, pn)
    return np.asarray(paged_attention(jnp.asarray(q), keys, values, table, positions, readers, jnp.int32(4), 2))

  first = run([[1, 4], [6, pn]], keys, values)
  # The same tokens moved to other pages (row 0's pages 1, 4 -> 5, 0), and row 1 gone.
  moved_k, moved_v = keys.copy(), values.copy()
  for src, dst in ((1, 5), (4, 0)):
    moved_k[dst], moved_v[dst] = keys[src], values[src]
  second = run([[5, 0], [pn, pn]], moved_k, moved_v)
  np.testing.assert_allclose(first[0], second[0], rtol=1e-6, atol=1e-6)
