"""Which KV pages are free: the host's allocator for the device's page pool.

Pages are handed out lowest id first, so the pages in use stay packed at the low end of the pool
and a decode scans as short a prefix of it as possible.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class PageAllocator:
  """A free list of page ids ``0 .. num_pages - 1``."""

  def __init__(self, num_pages: int):
    self.num_pages = num_pages
    self._free = list(range(num_pages))  # a heap
    self._used: set[int] = set()

  @property
  def in_use(self) -> int:
    return len(self._used)

  @property
  def high_water(self) -> int:
    """One past the highest page in use (0 when none): how far a decode must scan."""
    return max(self._used, default=-1) + 1

  def take(self, n: int) -> list[int]:
    """The ``n`` lowest free pages. The scheduler's reservations guarantee they exist."""
    if n > len(self._free):
      raise RuntimeError(f"{n} pages asked, {len(self._free)} free: a reservation was exceeded")
    pages = [heapq.heappop(self._free) for _ in range(n)]
    self._used.update(pages)
    return pages

  def give(self, pages: Iterable[int]) -> None:
    for page in pages:
      self._used.remove(page)
      heapq.heappush(self._free, page)
