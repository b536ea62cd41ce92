"""The engine's device-resident step state, the host's deltas to it, and their static shapes.

Shape legend: R rows of the state (the most sequences decoding at once), B rows one decode
computes, M pages per sequence, Pn pages in the pool, A admissions per iteration (also the
prompts of one prefill pack), T tokens of one prefill pack.

The state lives on the device from one iteration to the next: each row's last token, its
position, its sampling settings and page-table row, and the KV pool. A decode step advances it
in place; the host only sends what changed (``StepUpdates``: rows moved, freed or admitted,
pages granted to growing sequences) and the prompts to prefill (``PrefillPack``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from s3jax.executor.sampling import Sampled, SlotSampling
from s3jax.models import gpt, kv_cache
from s3jax.models.config import ModelConfig


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
  """``low, 2 low, 4 low, ...`` below ``high``, then ``high``."""
  out, n = [], low
  while n < high:
    out.append(n)
    n *= 2
  return tuple(out) + (high,)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StepShapes:
  """Static shapes of the state and the menus of shapes its executables are compiled for.

  Attributes:
    page_size: G, tokens per KV page.
    num_pages: Pn, pages in the pool (the memory budget).
    max_slots: R, rows of the state.
    pages_per_seq: M, pages of the longest sequence.
    batch_sizes: rows a decode may compute, ascending, the last one R: one executable each. The
      scheduler packs live rows below the smallest batch size that holds them.
    prefill_lens: T of a prefill pack, ascending, the last one the model maximum: one executable
      each.
    max_admissions: A, rows admitted (and prompts prefilled) per iteration at most.
    scan_chunk: pages attention scans per loop iteration; a decode scans as many chunks as the
      pages in use need (a run-time count, not a shape).
  """

  page_size: int
  num_pages: int
  max_slots: int
  pages_per_seq: int
  batch_sizes: tuple[int, ...]
  prefill_lens: tuple[int, ...]
  max_admissions: int
  scan_chunk: int = 8

  @classmethod
  def create(
    cls,
    *,
    max_seq_len: int,
    num_pages: int,
    page_size: int,
    batch_sizes: Sequence[int],
    max_admissions: int,
    min_prefill_len: int = 32,
    scan_chunk: int = 8,
  ) -> "StepShapes":
    return cls(
      page_size=page_size,
      num_pages=num_pages,
      max_slots=batch_sizes[-1],
      pages_per_seq=math.ceil(max_seq_len / page_size),
      batch_sizes=tuple(batch_sizes),
      prefill_lens=powers_of_two(min(min_prefill_len, max_seq_len), max_seq_len),
      max_admissions=max_admissions,
      scan_chunk=min(scan_chunk, num_pages),
    )

  @property
  def num_executables(self) -> int:
    """Every executable the engine's device path runs: ``len(batch_sizes) + len(prefill_lens)``."""
    return len(self.batch_sizes) + len(self.prefill_lens)

  @property
  def context_pages(self) -> int:
    """Length of a prefill's context page list: a sequence's pages, padded to whole scan chunks."""
    return -(-self.pages_per_seq // self.scan_chunk) * self.scan_chunk

  def batch_size_for(self, rows: int) -> int:
    """The smallest batch size covering rows ``0 .. rows - 1``."""
    return next(b for b in self.batch_sizes if b >= rows)

  def chunks_for(self, pages: int) -> int:
    """Attention chunks a decode scans so that pages ``0 .. pages - 1`` are covered."""
    return -(-pages // self.scan_chunk)

  def prefill_len_for(self, tokens: int) -> int:
    return next(t for t in self.prefill_lens if t >= tokens)

  def group_prefills(
    self, lengths: Sequence[int], pack_tokens: int, continues: Sequence[bool] | None = None
  ) -> list[list[int]]:
    """Indices of prompts (in order) grouped into prefill calls of at most ``pack_tokens``
    tokens and ``max_admissions`` prompts each, never more than the longest compiled pack holds
    (a longer prompt gets a call of its own), and at most one prompt that ``continues`` a
    sequence prefilled in earlier chunks per call. The engine and the simulator both pack this
    way."""
    limit = min(pack_tokens, self.prefill_lens[-1])
    continues = continues or [False] * len(lengths)
    packs: list[list[int]] = []
    size, continued = 0, False
    for i, (n, cont) in enumerate(zip(lengths, continues)):
      if not packs or size + n > limit or len(packs[-1]) == self.max_admissions or (cont and continued):
        packs.append([])
        size, continued = 0, False
      packs[-1].append(i)
      size += n
      continued |= cont
    return packs


@flax.struct.dataclass
class DecodeState:
  """Everything a decode step reads and advances, per row of the batch.

  A row's ``tokens`` is the token it feeds next, written at ``positions``; ``sampling.step``
  is the index in its answer of the token that decode samples. An admitted row is ``fresh``
  for one iteration: its first token, sampled by the prefill, waits in ``staged`` and is what
  the decode reports for it (the row is not decoded in the iteration that admits it).
  """

  pool: kv_cache.PagePool
  tokens: jax.Array  # [R] int32
  positions: jax.Array  # [R] int32
  live: jax.Array  # [R] bool
  fresh: jax.Array  # [R] bool
  staged: Sampled  # [R] each: a fresh row's first token (and its log-probabilities)
  sampling: SlotSampling  # [R] each
  page_table: jax.Array  # [R, M] int32, Pn = no page

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


def init_state(cfg: ModelConfig, shapes: StepShapes, dtype, stages: int = 1) -> DecodeState:
  """An empty state (no live row, every page free) on the host (the runner places it on its
  devices): creating one compiles nothing."""
  r = shapes.max_slots
  zeros = lambda dt: np.zeros((r,), dt)
  return DecodeState(
    pool=kv_cache.init_pool(cfg, shapes.num_pages, shapes.page_size, dtype, stages),
    tokens=zeros(np.int32),
    positions=zeros(np.int32),
    live=zeros(bool),
    fresh=zeros(bool),
    staged=Sampled.zeros(r),
    sampling=SlotSampling.greedy(r),
    page_table=np.full((r, shapes.pages_per_seq), shapes.num_pages, np.int32),
  )


def abstract_state(cfg: ModelConfig, shapes: StepShapes, dtype, stages: int = 1) -> DecodeState:
  """The state's shapes and dtypes, for compiling without allocating."""
  r, m = shapes.max_slots, shapes.pages_per_seq
  arr = jax.ShapeDtypeStruct
  layer = arr(kv_cache.layer_shape(cfg, shapes.num_pages, shapes.page_size, stages), jnp.dtype(dtype))
  n = kv_cache.pool_arrays(cfg, stages)
  rows = lambda dt: arr((r,), dt)
  return DecodeState(
    pool=kv_cache.PagePool(keys=(layer,) * n, values=(layer,) * n),
    tokens=rows(jnp.int32),
    positions=rows(jnp.int32),
    live=rows(jnp.bool_),
    fresh=rows(jnp.bool_),
    staged=Sampled.abstract(r),
    sampling=SlotSampling.abstract(r),
    page_table=arr((r, m), jnp.int32),
  )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
  """One sequence entering a row: the tokens to prefill, its pages, how it samples.

  A fresh request prefills its prompt (``step`` 0); a resumed one its prompt and every token
  generated before it was preempted (``step`` = that count). The prefill samples answer token
  ``step``; the row's first decode then writes it at position ``len(tokens)``. A long prompt may be
  prefilled in chunks over several iterations (``start``, ``end``): only the last chunk samples.
  """

  @property
  def prefill_len(self) -> int:
    """Tokens this prefill computes."""
    return (len(self.tokens) if self.end is None else self.end) - self.start

  tokens: Sequence[int]
  pages: Sequence[int]  # the pages holding positions 0 .. len(tokens) - 1, in order
  row: int
  start: int = 0  # tokens before this have their KV in ``pages`` already (earlier chunks): only attended to
  end: int | None = None  # prefill tokens[start:end] (None: to the end; a chunk that ends earlier samples nothing)
  step: int = 0
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  logprobs: int = -1  # alternatives to report log-probabilities of; -1 = none
  score_prompt: bool = False  # the prefill computes every prompt token's log-probability
  request_id: int = -1  # whose prompt it is (the engine's bookkeeping; not sent to the device)


# Columns of ``StepUpdates.admit``: destination row, position, top_k, seed, step, logprobs, then M pages.
_ROW, _POSITION, _TOP_K, _SEED, _STEP, _LOGPROBS, _PAGES = range(7)


@flax.struct.dataclass
class StepUpdates:
  """What the host changed since the last decode, applied at the start of the next one.

  Applied in this order: row moves and frees (``source``), then admissions, then page grants.

  Attributes:
    source: [R] int32; row r takes the state of row ``source[r]`` (itself when unchanged), or is
      freed when ``source[r] == -1``. One gather expresses every move and free of an iteration.
    admit: [A, 6 + M] int32, one admitted row per line (row R = unused line): row, position of
      its first token, top_k, seed (bits), step, logprobs, then its page-table row.
    admit_sampling: [A, 2] float32: temperature, top_p.
    grants: [R, 3] int32 (row, logical page, page): pages given to rows that grew into a new
      page; row R = unused line.
    hold: [R] bool, rows that skip this decode (no page was free for them): their state and KV
      stay as they are.
  """

  source: jax.Array
  admit: jax.Array
  admit_sampling: jax.Array
  grants: jax.Array
  hold: jax.Array

  @classmethod
  def from_host(
    cls,
    shapes: StepShapes,
    *,
    moves: Sequence[tuple[int, int]] = (),
    frees: Sequence[int] = (),
    admissions: Sequence[Admission] = (),
    grants: Sequence[tuple[int, int, int]] = (),
    holds: Sequence[int] = (),
  ) -> "StepUpdates":
    """Packs one iteration's changes (rows moved ``src -> dst``, freed, admitted, grown, held)."""
    r, m, pn = shapes.max_slots, shapes.pages_per_seq, shapes.num_pages
    source = np.arange(r, dtype=np.int32)
    source[list(frees)] = -1  # a freed row may then be a move's destination
    for src, dst in moves:
      source[dst] = src
    for src in {src for src, _ in moves} - {dst for _, dst in moves}:
      source[src] = -1
    if len(admissions) > shapes.max_admissions or len(grants) > r:
      raise ValueError(
        f"{len(admissions)} admissions and {len(grants)} grants exceed the update buffers "
        f"({shapes.max_admissions}, {r})"
      )
    admit = np.full((shapes.max_admissions, _PAGES + m), pn, np.int32)
    admit[:, _ROW] = r
    admit_sampling = np.ones((shapes.max_admissions, 2), np.float32)
    for i, a in enumerate(admissions):
      admit[i, :_PAGES] = (a.row, len(a.tokens), a.top_k, np.uint32(a.seed).view(np.int32), a.step + 1, a.logprobs)
      admit[i, _PAGES : _PAGES + len(a.pages)] = a.pages
      admit_sampling[i] = (a.temperature, a.top_p)
    grant = np.full((r, 3), 0, np.int32)
    grant[:, 0] = r
    if grants:
      grant[: len(grants)] = grants
    hold = np.zeros(r, bool)
    hold[list(holds)] = True
    return cls(source=source, admit=admit, admit_sampling=admit_sampling, grants=grant, hold=hold)


def apply_updates(state: DecodeState, updates: StepUpdates) -> DecodeState:
  """Applies one iteration's host deltas (jit with the state donated)."""
  pn = state.pool.num_pages
  src = updates.source
  keep = src >= 0
  take = lambda a: a[jnp.maximum(src, 0)]
  sampling = jax.tree.map(take, state.sampling)
  table = jnp.where(keep[:, None], take(state.page_table), pn)
  live, fresh = take(state.live) & keep, take(state.fresh) & keep
  tokens, positions = take(state.tokens), take(state.positions)  # ``staged`` is by destination row already

  a, f = updates.admit, updates.admit_sampling
  row = a[:, _ROW]  # R drops the line
  put = lambda arr, values: arr.at[row].set(values, mode="drop")
  live, fresh = put(live, True), put(fresh, True)
  positions = put(positions, a[:, _POSITION])
  table = table.at[row].set(a[:, _PAGES:], mode="drop")
  sampling = SlotSampling(
    temperature=put(sampling.temperature, f[:, 0]),
    top_k=put(sampling.top_k, a[:, _TOP_K]),
    top_p=put(sampling.top_p, f[:, 1]),
    seed=put(sampling.seed, jax.lax.bitcast_convert_type(a[:, _SEED], jnp.uint32)),
    step=put(sampling.step, a[:, _STEP]),
    logprobs=put(sampling.logprobs, a[:, _LOGPROBS]),
  )
  g = updates.grants
  table = table.at[g[:, 0], g[:, 1]].set(g[:, 2], mode="drop")
  return state.replace(tokens=tokens, positions=positions, live=live, fresh=fresh, sampling=sampling, page_table=table)


@flax.struct.dataclass
class PrefillPack:
  """Prompts packed into one row for one prefill call.

  Attributes:
    tokens: [T] int32, the prompts one after another, padding at the end.
    segments: [T] int32, the prompt of each token (A for padding).
    positions: [T] int32, each token's position in its prompt.
    pages: [T] int32, the page each token's KV goes to (Pn for padding).
    following: [T] int32, the token after each one in its sequence (0 where none): what the
      prompt's log-probabilities score.
    last: [A] int32, flat index of each prompt's last token (0 for unused lines).
    rows: [A] int32, the row whose ``staged`` token each prompt's first token becomes (R: unused).
    sampling: [A] each, how each prompt samples its first token.
    score: bool scalar, some prompt asked for its tokens' log-probabilities (``PromptScores``).
    context: the earlier tokens of the one sequence whose later chunk the pack prefills
      (``gpt.PrefillContext``; no chunks when none).
  """

  tokens: jax.Array
  segments: jax.Array
  positions: jax.Array
  pages: jax.Array
  following: jax.Array
  last: jax.Array
  rows: jax.Array
  sampling: SlotSampling
  score: jax.Array
  context: gpt.PrefillContext

  @property
  def length(self) -> int:
    return self.tokens.shape[0]

  @classmethod
  def from_host(cls, shapes: StepShapes, prompts: Sequence[Admission]) -> "PrefillPack":
    total = sum(p.prefill_len for p in prompts)
    continued = [p for p in prompts if p.start > 0]
    if len(continued) > 1:
      raise ValueError(f"a prefill pack continues at most one sequence, got {len(continued)}")
    if not prompts or len(prompts) > shapes.max_admissions or total > shapes.prefill_lens[-1]:
      raise ValueError(
        f"a prefill pack holds 1..{shapes.max_admissions} prompts of at most "
        f"{shapes.prefill_lens[-1]} tokens together, got {len(prompts)} of {total}"
      )
    t, a, g = shapes.prefill_len_for(total), shapes.max_admissions, shapes.page_size
    tokens, segments = np.zeros(t, np.int32), np.full(t, a, np.int32)
    positions, pages = np.zeros(t, np.int32), np.full(t, shapes.num_pages, np.int32)
    following = np.zeros(t, np.int32)
    last, rows = np.zeros(a, np.int32), np.full(a, shapes.max_slots, np.int32)
    temperature, top_k, top_p = np.zeros(a), np.zeros(a), np.ones(a)
    seed, step, logprobs = np.zeros(a), np.zeros(a), np.full(a, -1)
    context_pages = np.full(shapes.context_pages, shapes.num_pages, np.int32)
    context_lens, context_chunks = np.zeros(t, np.int32), 0
    start = 0
    for i, p in enumerate(prompts):
      n, first = p.prefill_len, p.start
      span = slice(start, start + n)
      where = np.arange(first, first + n)
      tokens[span], segments[span], positions[span] = p.tokens[first : first + n], i, where
      after = np.asarray(p.tokens[first + 1 : first + n + 1], np.int32)
      following[start : start + len(after)] = after
      pages[span] = np.asarray(p.pages, np.int32)[where // g]
      if first:
        context_pages[: len(p.pages)] = p.pages
        context_lens[span] = first
        context_chunks = math.ceil(math.ceil(first / g) / shapes.scan_chunk)  # chunks of pages holding them
      last[i], rows[i] = start + n - 1, p.row
      temperature[i], top_k[i], top_p[i], seed[i], step[i] = p.temperature, p.top_k, p.top_p, p.seed, p.step
      logprobs[i] = p.logprobs
      start += n
    return cls(
      tokens=tokens,
      segments=segments,
      positions=positions,
      pages=pages,
      following=following,
      last=last,
      rows=rows,
      sampling=SlotSampling.from_host(temperature, top_k, top_p, seed, step, logprobs),
      score=np.bool_(any(p.score_prompt for p in prompts)),
      context=gpt.PrefillContext(
        pages=context_pages, lens=context_lens, num_chunks=np.int32(context_chunks), chunk=shapes.scan_chunk
      ),
    )


def abstract_updates(shapes: StepShapes):
  r, a, m = shapes.max_slots, shapes.max_admissions, shapes.pages_per_seq
  arr = jax.ShapeDtypeStruct
  return StepUpdates(
    source=arr((r,), jnp.int32),
    admit=arr((a, _PAGES + m), jnp.int32),
    admit_sampling=arr((a, 2), jnp.float32),
    grants=arr((r, 3), jnp.int32),
    hold=arr((r,), jnp.bool_),
  )


def abstract_pack(shapes: StepShapes, length: int):
  a, arr = shapes.max_admissions, jax.ShapeDtypeStruct
  tok = arr((length,), jnp.int32)
  rows = lambda dt: arr((a,), dt)
  return PrefillPack(
    tokens=tok,
    segments=tok,
    positions=tok,
    pages=tok,
    following=tok,
    last=rows(jnp.int32),
    rows=rows(jnp.int32),
    sampling=SlotSampling.abstract(a),
    score=arr((), jnp.bool_),
    context=gpt.PrefillContext(
      pages=arr((shapes.context_pages,), jnp.int32), lens=tok, num_chunks=arr((), jnp.int32), chunk=shapes.scan_chunk
    ),
  )
