"""Host-side mirror of the engine's KV arenas, and the slot ledger that plans their sizes.

``Arenas`` holds what the engine holds: per class S, the arena's slot count (0 or one of
``slot_options``) and which request sits in each row. Its methods change that mirror and return
the op that makes the engine do the same, so that mirror and device never disagree.

``Ledger`` answers "does this plan still fit the budget?" while a plan is being decided, before
any op is emitted. It counts, per class, the sequences that stay, leave by a Move, arrive by a
Move and are admitted. Moves run before admissions and a moving sequence holds its source row
until its Move, so class S needs ``max(stay + out + incoming, stay + incoming + admitted)`` rows,
rounded up to a slot option. The plan fits when those rounded arenas fit the budget: the
emitter can then always order shrinks before grows to stay within the budget after every op.
"""

from __future__ import annotations

from collections.abc import Iterator

from s3jax.scheduler.config import SchedulerConfig
from s3jax.scheduler.plan import Resize
from s3jax.scheduler.reservation import slots_for


class Arenas:
  """Slot counts and row occupants of every class's arena."""

  def __init__(self, config: SchedulerConfig):
    self._config = config
    self.rows: dict[int, list[int | None]] = {c: [] for c in config.cache_lens}

  def slots(self, cache_len: int) -> int:
    return len(self.rows[cache_len])

  def slot_counts(self) -> dict[int, int]:
    return {c: len(r) for c, r in self.rows.items()}

  def occupied(self, cache_len: int) -> int:
    return sum(rid is not None for rid in self.rows[cache_len])

  def occupants(self, cache_len: int) -> Iterator[tuple[int, int]]:
    """``(slot, request_id)`` of the occupied rows, by slot."""
    return ((s, rid) for s, rid in enumerate(self.rows[cache_len]) if rid is not None)

  def reserved_bytes(self) -> int:
    return sum(len(r) * self._config.slot_bytes(c) for c, r in self.rows.items())

  def place(self, cache_len: int, request_id: int) -> int:
    """Puts ``request_id`` into the lowest free row of the class and returns that slot."""
    rows = self.rows[cache_len]
    slot = rows.index(None)  # the ledger guarantees a free row; ValueError here is a bug
    rows[slot] = request_id
    return slot

  def vacate(self, cache_len: int, slot: int, request_id: int) -> None:
    rows = self.rows[cache_len]
    if rows[slot] != request_id:
      raise AssertionError(f"slot {slot} of class {cache_len} holds {rows[slot]}, not {request_id}")
    rows[slot] = None

  def resize(self, cache_len: int, new_slots: int) -> tuple[Resize, dict[int, int]]:
    """Resizes the class's arena, keeping every occupied row.

    Rows already below ``new_slots`` keep their slot; when shrinking, the rows above move down
    into the lowest free slots, so as few rows as possible change place.

    Returns:
      The op, and ``{request_id: new_slot}`` for the rows that changed slot.
    """
    rows = self.rows[cache_len]
    old_slots = len(rows)
    occupied = [(s, rid) for s, rid in enumerate(rows) if rid is not None]
    if len(occupied) > new_slots:
      raise AssertionError(f"cannot shrink class {cache_len} to {new_slots} rows: {len(occupied)} used")
    new_rows: list[int | None] = [None] * new_slots
    movers = []
    for s, rid in occupied:
      if s < new_slots:
        new_rows[s] = rid
      else:
        movers.append((s, rid))
    row_map = [(s, s) for s, _ in occupied if s < new_slots]
    changed = {}
    for s, rid in movers:
      dst = new_rows.index(None)
      new_rows[dst] = rid
      row_map.append((s, dst))
      changed[rid] = dst
    self.rows[cache_len] = new_rows
    return Resize(cache_len, old_slots, new_slots, tuple(sorted(row_map))), changed


class Ledger:
  """Rows each class needs within the plan being decided, and whether they fit the budget."""

  def __init__(self, config: SchedulerConfig, stay: dict[int, int]):
    self._config = config
    self.stay = {c: stay.get(c, 0) for c in config.cache_lens}
    self.out = dict.fromkeys(config.cache_lens, 0)
    self.incoming = dict.fromkeys(config.cache_lens, 0)
    self.admitted = dict.fromkeys(config.cache_lens, 0)

  def need(self, cache_len: int) -> int:
    """Rows class ``cache_len`` must have while the plan's ops run."""
    base = self.stay[cache_len] + self.incoming[cache_len]
    return base + max(self.out[cache_len], self.admitted[cache_len])

  def final(self, cache_len: int) -> int:
    """Rows occupied once every op of the plan has run."""
    return self.stay[cache_len] + self.incoming[cache_len] + self.admitted[cache_len]

  def bytes_needed(self) -> int | None:
    """Bytes of the smallest arenas holding ``need``; None when a class exceeds every option."""
    total = 0
    for c in self._config.cache_lens:
      slots = slots_for(self._config.slot_options, self.need(c))
      if slots is None:
        return None
      total += slots * self._config.slot_bytes(c)
    return total

  def fits(self) -> bool:
    total = self.bytes_needed()
    return total is not None and total <= self._config.memory_budget_bytes

  def try_move(self, dst: int) -> bool:
    """Books a Move into ``dst`` if the plan still fits (the mover is booked ``out`` already)."""
    self.incoming[dst] += 1
    if self.fits():
      return True
    self.incoming[dst] -= 1
    return False

  def try_admit(self, cache_len: int) -> bool:
    """Books an admission into ``cache_len`` if the plan still fits."""
    self.admitted[cache_len] += 1
    if self.fits():
      return True
    self.admitted[cache_len] -= 1
    return False

  def book_out(self, cache_len: int, delta: int) -> None:
    """Adds (+1) or removes (-1) a sequence leaving ``cache_len``; removal never costs memory."""
    self.out[cache_len] += delta
