"""The scheduler's page allocator: lowest free pages first, exact counts, a clear error when the
pool is over-committed; checked against a plain set over random take/give sequences."""

from __future__ import annotations

import random

import pytest

from s3jax.scheduler.pages import PageAllocator, prefix_hashes


def test_lowest_pages_first_and_high_water():
  pool = PageAllocator(8)
  assert pool.take(3) == [0, 1, 2] and pool.high_water == 3
  pool.give([0, 2])
  assert pool.free == 7 and pool.in_use == 1 and pool.high_water == 2
  assert pool.take(3) == [0, 2, 3]  # freed pages before never-used ones
  pool.give([3, 2, 1, 0])
  assert pool.high_water == 0 and pool.free == 8


def test_over_commit_is_an_error_that_names_it():
  pool = PageAllocator(2)
  pool.take(2)
  with pytest.raises(RuntimeError, match="over-committed"):
    pool.take(1)


def test_random_takes_and_gives_match_a_set_of_free_pages():
  rng = random.Random(0)
  pool, free, held = PageAllocator(32), set(range(32)), []
  for _ in range(2000):
    if held and (rng.random() < 0.5 or not free):
      batch = held.pop(rng.randrange(len(held)))
      pool.give(batch)
      free.update(batch)
    else:
      n = rng.randint(1, min(4, len(free)))
      pages = pool.take(n)
      assert pages == sorted(free)[:n]
      free.difference_update(pages)
      held.append(pages)
    used = set(range(32)) - free
    assert pool.free == len(free) and pool.in_use == len(used)
    assert pool.high_water == (max(used) + 1 if used else 0)


def test_a_cached_prefix_is_shared_kept_when_freed_and_handed_out_last():
  pool = PageAllocator(4)
  keys = prefix_hashes(list(range(10)), 4)  # two full pages of 4; the last 2 tokens are no page
  assert len(keys) == 2 and keys != prefix_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4)  # chained: the 2nd differs
  assert keys[0] == prefix_hashes([0, 1, 2, 3, 7], 4)[0]
  first = pool.take(3)
  pool.cache(first[:2], keys, ready=1)
  assert pool.match(keys, step=0) == ([], True)  # written in step 0: readable from step 1
  assert pool.match(keys, step=1) == (first[:2], False)
  pool.share(first[:2])
  assert pool.readers(first[0]) == 2 and pool.in_use == 3 and pool.free == 1
  pool.give(first)  # the first sequence ends: the shared pages stay in use for the second
  assert pool.in_use == 2 and pool.free == 2
  pool.give(first[:2])  # nobody reads them: free, still cached
  assert pool.free == 4 and pool.cached == 2 and pool.match(keys, step=1) == (first[:2], False)
  assert pool.take(2) == [first[2], 3]  # pages without a key first
  assert pool.take(1) == [first[0]]  # then the least recently freed cached page; its key is forgotten
  assert pool.cached == 1 and pool.match(keys, step=1) == ([], False)
  pool.share([first[1]])  # taken back from the free list, KV and all
  assert pool.free == 0 and pool.readers(first[1]) == 1
