"""The scheduler's page allocator: lowest free pages first, exact counts, a clear error when the
pool is over-committed; checked against a plain set over random take/give sequences."""

from __future__ import annotations

import random

import pytest

from s3jax.scheduler.pages import PageAllocator


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
