"""A ``ModelRunner`` with no model, for the engine's own tests (JetStream's mock-engine idea).

The token at position p is p: a prompt of L tokens is answered L, L + 1, L + 2, ... whatever the
batch, the policy, the row moves or the preemptions (a resumed request re-prefills prompt +
answer so far, L + k tokens, and goes on with L + k). Expected answers are then exact arithmetic.

The fake applies the engine's ``StepUpdates`` to a host copy of the rows (moves, frees,
admissions, page grants, holds: the semantics of ``step_state.apply_updates``) and checks, every
decode, what the device would need: every decoding row has a page for the position it writes, no
other live row reads that page, and a page several live rows read (a cached prefix) sits at the same
place in each of their sequences.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from s3jax.executor.sampling import MAX_TOP_LOGPROBS
from s3jax.executor.step_state import PrefillPack, StepShapes, StepUpdates

_ROW, _POSITION, _PAGES = 0, 1, 6  # columns of StepUpdates.admit


class _Host(np.ndarray):
  """A host array that answers the device array's ``copy_to_host_async``."""

  def copy_to_host_async(self) -> None:
    pass


def _host(array) -> _Host:
  return np.asarray(array).view(_Host)


@dataclasses.dataclass(frozen=True)
class FakeConfig:
  max_seq_len: int = 128
  eos_token_id: int = 100_000  # past every position: no answer ends on EOS unless a test sets it
  name: str = "fake"


@dataclasses.dataclass(frozen=True)
class FakeSampled:
  tokens: _Host  # [B]
  logprobs: _Host  # [B]: -position / 1000, exact in float32 for these positions
  top_ids: _Host  # [B, K]: the token itself, then the next ids
  top_logprobs: _Host  # [B, K]


@dataclasses.dataclass
class _Pool:
  nbytes: int


@dataclasses.dataclass
class FakeState:
  pool: _Pool
  positions: np.ndarray  # [R] the position of each row's newest token
  live: np.ndarray  # [R] bool
  fresh: np.ndarray  # [R] bool: admitted, its first token staged by the prefill
  staged: np.ndarray  # [R] a fresh row's first token
  page_table: np.ndarray  # [R, M], num_pages = no page


class FakeRunner:
  """What ``Engine`` calls on a runner, with token = position; one byte of KV per token."""

  def __init__(self, cfg: FakeConfig = FakeConfig()):
    self.cfg = cfg
    self.compilations = 0
    self.generate_calls = 0
    self.prefill_calls = 0

  def kv_bytes_per_token(self) -> int:
    return 1

  def device_memory(self, shapes: StepShapes):
    return None

  def workspace_bytes(self, shapes: StepShapes) -> int:
    return 0

  def compile(self, shapes: StepShapes, on_compiled=None) -> int:
    return 0

  def put(self, tree):
    return tree

  def init_state(self, shapes: StepShapes) -> FakeState:
    r = shapes.max_slots
    return FakeState(
      pool=_Pool(nbytes=shapes.num_pages * shapes.page_size * self.kv_bytes_per_token()),
      positions=np.zeros(r, np.int64),
      live=np.zeros(r, bool),
      fresh=np.zeros(r, bool),
      staged=np.zeros(r, np.int64),
      page_table=np.full((r, shapes.pages_per_seq), shapes.num_pages, np.int64),
    )

  def prefill(self, shapes: StepShapes, state: FakeState, pack: PrefillPack) -> FakeState:
    """Stages each prompt's first answer token: the position after its last token."""
    self.prefill_calls += 1
    rows, last = np.asarray(pack.rows), np.asarray(pack.last)
    used = rows < shapes.max_slots
    state.staged[rows[used]] = np.asarray(pack.positions)[last[used]] + 1
    return state

  def prefill_scored(self, shapes: StepShapes, state: FakeState, pack: PrefillPack):
    """``prefill``; no prompt scores (the fake's requests never ask)."""
    return self.prefill(shapes, state, pack), None

  def generate(self, shapes: StepShapes, state: FakeState, updates: StepUpdates, batch: int, pages: int):
    self.generate_calls += 1
    _apply(shapes, state, updates)
    hold = np.asarray(updates.hold)[:batch]
    live, fresh = state.live[:batch], state.fresh[:batch]
    decode = live & ~fresh & ~hold
    positions = state.positions[:batch]
    _check_pages(shapes, state, np.flatnonzero(decode))
    tokens = np.where(fresh, state.staged[:batch], positions + 1)
    state.positions[:batch] = positions + decode
    state.fresh[:batch] = False
    k = MAX_TOP_LOGPROBS
    top_ids = tokens[:, None] + np.arange(k)[None, :]
    out = FakeSampled(
      tokens=_host(tokens.astype(np.int32)),
      logprobs=_host((-tokens / 1000).astype(np.float32)),
      top_ids=_host(top_ids.astype(np.int32)),
      top_logprobs=_host((-top_ids / 1000).astype(np.float32)),
    )
    return state, out


def _apply(shapes: StepShapes, state: FakeState, updates: StepUpdates) -> None:
  """``apply_updates`` on the host: moves and frees, then admissions, then grants."""
  r, pn = shapes.max_slots, shapes.num_pages
  src = np.asarray(updates.source)
  keep, take = src >= 0, np.maximum(src, 0)
  state.page_table = np.where(keep[:, None], state.page_table[take], pn)
  state.live, state.fresh = state.live[take] & keep, state.fresh[take] & keep
  state.positions = state.positions[take]  # staged is by destination row already
  admit = np.asarray(updates.admit)
  for line in admit[admit[:, _ROW] < r]:
    row = line[_ROW]
    state.live[row], state.fresh[row] = True, True
    state.positions[row] = line[_POSITION]
    state.page_table[row] = line[_PAGES:]
  for row, index, page in np.asarray(updates.grants):
    if row < r:
      state.page_table[row, index] = page


def _check_pages(shapes: StepShapes, state: FakeState, decoding: np.ndarray) -> None:
  pn = shapes.num_pages
  for row in decoding:
    page = state.page_table[row, state.positions[row] // shapes.page_size]
    assert page != pn, f"row {row} decodes position {state.positions[row]} without a page"
  where: dict[int, set[int]] = {}  # page -> its indices in the live rows' sequences
  readers: dict[int, int] = {}
  for row in np.flatnonzero(state.live):
    for index, page in enumerate(state.page_table[row]):
      if page != pn:
        where.setdefault(int(page), set()).add(index)
        readers[int(page)] = readers.get(int(page), 0) + 1
  assert all(len(indices) == 1 for indices in where.values()), "a shared page sits at different places"
  for row in decoding:
    page = int(state.page_table[row, state.positions[row] // shapes.page_size])
    assert readers[page] == 1, f"row {row} writes page {page}, which other live rows read"
