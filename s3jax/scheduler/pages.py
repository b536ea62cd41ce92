"""Which KV pages are free, and which hold a cached prompt prefix: the scheduler's allocator.

The scheduler chooses every page id and ships it in its plans (an admission's pages, a page
granted to a growing row); the engine and the simulator only apply them. Pages are handed out
lowest id first, so the pages in use stay packed at the low end of the pool and a decode scans
as short a prefix of it as possible.

Prefix caching (vLLM's automatic prefix caching, ``docs/design/prefix_caching.md``): a full page
of a prompt is keyed by ``prefix_hashes``, a hash of its tokens and of every token before it, so
equal keys mean equal KV. Pages are reference-counted: a page several sequences read is in use
once. A page whose last reader leaves keeps its KV and its key on a free list in least recently
used order; it counts as free, is handed out only when no page without a key is left (its key is
then forgotten), and is taken back in use, KV and all, by a prompt that starts with its key.
"""

from __future__ import annotations

import array
import collections
import hashlib
import heapq
from collections.abc import Iterable, Sequence


def prefix_hashes(tokens: Sequence[int], page_size: int) -> tuple[int, ...]:
  """The key of each full page of ``tokens``: a hash of its tokens chained to the previous
  page's key (blake2b, so that two different prefixes never share KV by a collision)."""
  keys, parent = [], b""
  for end in range(page_size, len(tokens) + 1, page_size):
    parent = hashlib.blake2b(
      parent + array.array("q", tokens[end - page_size : end]).tobytes(), digest_size=16
    ).digest()
    keys.append(int.from_bytes(parent, "little"))
  return tuple(keys)


class PageAllocator:
  """Page ids ``0 .. num_pages - 1``: readers of each page in use, and the cached prefixes."""

  def __init__(self, num_pages: int):
    self.num_pages = num_pages
    self._returned: list[int] = []  # a heap of free pages without a key, all below ``_fresh``
    self._fresh = 0  # pages from here on were never handed out
    self._readers: dict[int, int] = {}  # page in use -> sequences that hold it
    self._page_of: dict[int, int] = {}  # key -> the page holding that prefix's KV
    self._key_of: dict[int, int] = {}  # page -> its key
    self._ready: dict[int, int] = {}  # key -> the step from which its KV is written
    self._unread: collections.OrderedDict[int, None] = collections.OrderedDict()  # free pages with a key, LRU first

  @property
  def free(self) -> int:
    """Pages no sequence holds, cached ones included."""
    return self.num_pages - len(self._readers)

  @property
  def in_use(self) -> int:
    return len(self._readers)

  @property
  def cached(self) -> int:
    """Pages that hold a keyed prefix, in use or free."""
    return len(self._key_of)

  @property
  def high_water(self) -> int:
    """One past the highest page in use (0 when none): how far a decode must scan."""
    return max(self._readers, default=-1) + 1

  def readers(self, page: int) -> int:
    return self._readers.get(page, 0)

  def is_cached(self, page: int) -> bool:
    return page in self._key_of

  def take(self, n: int) -> list[int]:
    """The ``n`` lowest free pages without a key, then the least recently used cached ones; the
    caller checks ``free`` first."""
    if n > self.free:
      raise RuntimeError(f"{n} pages asked, {self.free} free: the scheduler over-committed the pool")
    pages = [heapq.heappop(self._returned) for _ in range(min(n, len(self._returned)))]
    fresh = min(n - len(pages), self.num_pages - self._fresh)
    pages += range(self._fresh, self._fresh + fresh)
    self._fresh += fresh
    while len(pages) < n:
      page, _ = self._unread.popitem(last=False)
      key = self._key_of.pop(page)
      del self._page_of[key], self._ready[key]
      pages.append(page)
    for page in pages:
      self._readers[page] = 1
    return pages

  def share(self, pages: Iterable[int]) -> None:
    """One more sequence reads each of these cached pages (taken back from the free list if none did)."""
    for page in pages:
      self._unread.pop(page, None)
      self._readers[page] = self._readers.get(page, 0) + 1

  def give(self, pages: Iterable[int]) -> None:
    """A sequence stops reading each page; a page nobody reads is free (cached if it has a key)."""
    for page in pages:
      self._readers[page] -= 1
      if self._readers[page]:
        continue
      del self._readers[page]
      if page in self._key_of:
        self._unread[page] = None
      else:
        heapq.heappush(self._returned, page)

  def cache(self, pages: Sequence[int], keys: Sequence[int], ready: int) -> None:
    """Keys each page (in use) by its prefix, readable by admissions from step ``ready`` on;
    a page already keyed, or a key another page holds, is left as it is."""
    for page, key in zip(pages, keys):
      if page not in self._key_of and key not in self._page_of:
        self._page_of[key], self._key_of[page], self._ready[key] = page, key, ready

  def match(self, keys: Sequence[int], step: int) -> tuple[list[int], bool]:
    """The cached pages of the longest prefix of ``keys`` readable at ``step``, and whether the
    next key's page is being written in this step (then waiting a step shares it)."""
    pages = []
    for key in keys:
      page = self._page_of.get(key)
      if page is None:
        return pages, False
      if self._ready[key] > step:
        return pages, True
      pages.append(page)
    return pages, False
