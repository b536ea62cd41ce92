"""Which KV pages are free: the scheduler's allocator for the device's page pool.

The scheduler chooses every page id and ships it in its plans (an admission's pages, a page
granted to a growing row); the engine and the simulator only apply them. Pages are handed out
lowest id first, so the pages in use stay packed at the low end of the pool
and a decode scans as short a prefix of it as possible.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class PageAllocator:
  """A free list of page ids ``0 .. num_pages - 1``."""

  def __init__(self, num_pages: int):
    self.num_pages = num_pages
    self._returned: list[int] = []  # a heap of freed pages, all below ``_fresh``
    self._fresh = 0  # pages from here on were never handed out
    self._used: set[int] = set()

  @property
  def free(self) -> int:
    return self.num_pages - len(self._used)

  @property
  def in_use(self) -> int:
    return len(self._used)

  @property
  def high_water(self) -> int:
    """One past the highest page in use (0 when none): how far a decode must scan."""
    return max(self._used, default=-1) + 1

  def take(self, n: int) -> list[int]:
    """The ``n`` lowest free pages; the caller checks ``free`` first."""
    if n > self.free:
      raise RuntimeError(f"{n} pages asked, {self.free} free: the scheduler over-committed the pool")
    pages = [heapq.heappop(self._returned) for _ in range(min(n, len(self._returned)))]
    fresh = n - len(pages)
    pages += range(self._fresh, self._fresh + fresh)
    self._fresh += fresh
    self._used.update(pages)
    return pages

  def give(self, pages: Iterable[int]) -> None:
    for page in pages:
      self._used.remove(page)
      heapq.heappush(self._returned, page)
