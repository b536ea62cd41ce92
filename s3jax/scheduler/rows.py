"""Which request sits in each row of the decode batch: the host's mirror of the device rows.

A decode step computes the first B rows, B the smallest batch size holding every live row, so
live rows are kept packed low: a new request takes the lowest free row, and ``pack`` moves the
highest live rows down when that lets a smaller batch size hold them.
"""

from __future__ import annotations

from collections.abc import Iterator


class Rows:
  """Row occupants; ``None`` is a free row."""

  def __init__(self, num_rows: int):
    self._rows: list[int | None] = [None] * num_rows
    self._occupied = 0

  def __len__(self) -> int:
    return len(self._rows)

  @property
  def occupied(self) -> int:
    return self._occupied

  @property
  def free(self) -> int:
    return len(self._rows) - self.occupied

  def occupants(self) -> Iterator[tuple[int, int]]:
    """``(slot, request_id)`` of the occupied rows, by slot."""
    return ((s, rid) for s, rid in enumerate(self._rows) if rid is not None)

  def place(self, request_id: int) -> int:
    """Puts ``request_id`` into the lowest free row and returns it."""
    slot = self._rows.index(None)  # callers check ``free`` first; ValueError here is a bug
    self._rows[slot] = request_id
    self._occupied += 1
    return slot

  def vacate(self, slot: int, request_id: int) -> None:
    if self._rows[slot] != request_id:
      raise AssertionError(f"row {slot} holds {self._rows[slot]}, not {request_id}")
    self._rows[slot] = None
    self._occupied -= 1

  def pack(self, below: int) -> list[tuple[int, int, int]]:
    """Moves every occupant of a row >= ``below`` into the lowest free rows.

    Returns:
      ``(request_id, src, dst)`` of each move, highest source first.
    """
    moves = []
    for src in range(len(self._rows) - 1, below - 1, -1):
      rid = self._rows[src]
      if rid is not None:
        dst = self._rows.index(None)
        if dst >= below:
          raise AssertionError(f"rows below {below} are full")
        self._rows[src], self._rows[dst] = None, rid
        moves.append((rid, src, dst))
    return moves
