"""The engine: owns the device, executes the scheduler's plans, one iteration at a time.

Shape legend: B arena slots, S arena cache length, P prefill batch.

Every iteration (``step``):
  1. the scheduler (plain host code) returns a ``StepPlan``: an ordered list of
     ops (resize an arena, move an overflowing sequence to a longer arena,
     preempt one, admit new ones) and the occupied slots to decode;
  2. the engine applies the ops to its arenas (one ``KVCache`` per cache-length
     class), prefilling admitted prompts in batches;
  3. it runs one compiled decode step per arena, copies the next tokens to the
     host, applies EOS / max_tokens / stop checks, and reports a ``StepResult``
     back to the scheduler.

Threading: the engine is not thread-safe. Exactly one thread (the caller of
``step``, e.g. the serving loop in ``s3jax.serving.llm``) drives it; other
threads talk to that thread through queues.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from s3jax.engine.config import EngineConfig
from s3jax.engine.metrics import EngineMetrics
from s3jax.models.kv_cache import KVCache
from s3jax.models.runner import ModelRunner, xla_compilations
from s3jax.models.sampling import SlotSampling
from s3jax.scheduler import (Admit, Move, Policy, Preempt, Release, ReleaseReason, Resize, SchedRequest, Scheduler,
                             SchedulerConfig, StepResult)
from s3jax.supervisor import MispredictionLog

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclasses.dataclass(kw_only=True, eq=False)
class EngineRequest:
  """One request's host-side state.

  ``true_output_len`` is what the oracle policy reserves for (a trace's true
  length). ``eos_at`` replays a trace with random weights, which never emit
  EOS: the answer ends after that many tokens as if EOS had been sampled. The
  scheduler never sees ``eos_at``, so no policy learns the length from it.

  ``on_tokens(request, new_token_ids, finish_reason)`` is called from the
  engine thread after every iteration that gave the request new tokens, and
  once with a finish reason when it ends.
  """

  request_id: int
  prompt_ids: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  ignore_eos: bool = False
  predicted_bucket: int | None = None
  predicted_output_len: int | None = None
  true_output_len: int | None = None
  eos_at: int | None = None
  stop_fn: Callable[[list[int]], bool] | None = None
  on_tokens: Callable[["EngineRequest", list[int], str | None], None] | None = None
  context: object = None  # opaque to the engine: the caller's per-request state
  # Filled in by the engine.
  output_ids: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None
  submitted_at: float = 0.0
  first_token_at: float | None = None
  finished_at: float | None = None
  rebuckets: int = 0
  preemptions: int = 0
  reserved_tokens: int = 0


class Engine:
  """Runs S3 / max / oracle scheduling over a ``ModelRunner`` with bucketed KV arenas."""

  def __init__(self, runner: ModelRunner, config: EngineConfig):
    self.runner = runner
    self.config = config
    self.scheduler = Scheduler(SchedulerConfig(
        policy=config.policy, memory_budget_bytes=config.memory_budget_bytes,
        kv_bytes_per_token=runner.kv_bytes_per_token(), cache_lens=config.cache_lens(runner.cfg.max_seq_len),
        slot_options=config.slot_options, max_waiting=config.max_waiting,
        starvation_limit=config.starvation_limit, max_admissions_per_step=config.max_admissions_per_step))
    self.arenas: dict[int, KVCache] = {}
    self.requests: dict[int, EngineRequest] = {}
    self.misprediction_log = MispredictionLog(config.misprediction_log_size)
    self.metrics = EngineMetrics(budget_bytes=config.memory_budget_bytes)
    self._xla_compiles_at_start = xla_compilations()
    cfg = self.scheduler.config
    if config.policy is Policy.MAX and cfg.max_len not in cfg.usable_cache_lens:
      raise ValueError(
          f"policy 'max' reserves {cfg.max_len} tokens per request, and one such slot needs "
          f"{cfg.slot_bytes(cfg.max_len)} bytes: more than the memory budget of {cfg.memory_budget_bytes}; "
          f"raise the budget or use policy 's3'")
    if self.max_total_len == 0:
      raise ValueError(
          f"memory budget of {cfg.memory_budget_bytes} bytes holds no KV arena: one slot of the shortest "
          f"class ({cfg.cache_lens[0]} tokens) needs {cfg.slot_bytes(cfg.cache_lens[0])} bytes; raise it")

  # -- submission ------------------------------------------------------------

  @property
  def max_total_len(self) -> int:
    """Longest prompt + answer this engine can hold: the model's limit, or less
    when the memory budget cannot hold one slot of the longest arena."""
    usable = self.scheduler.config.usable_cache_lens
    return usable[-1] if usable else 0

  def submit(self, request: EngineRequest) -> None:
    """Queues a request; raises ValueError when it can never run, QueueFull when full."""
    if not request.prompt_ids:
      raise ValueError("prompt is empty: give at least one token of prompt")
    if request.max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
    limit = self.max_total_len
    if len(request.prompt_ids) + request.max_tokens > limit:
      # Checked here so that no accepted request can ever be cut short: a
      # sequence that outgrows its arena always finds a class the budget holds.
      raise ValueError(
          f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds {limit} "
          f"tokens, the longest sequence this engine holds (model maximum {self.runner.cfg.max_seq_len}, "
          f"memory budget {self.config.memory_budget_bytes} bytes); shorten the prompt, lower max_tokens "
          f"or raise the memory budget")
    self.scheduler.submit(SchedRequest(
        request_id=request.request_id, prompt_len=len(request.prompt_ids), max_tokens=request.max_tokens,
        predicted_output_len=request.predicted_output_len, true_output_len=request.true_output_len))
    request.submitted_at = time.perf_counter()
    self.requests[request.request_id] = request
    self.metrics.requests_submitted += 1

  def cancel(self, request_id: int) -> None:
    """Drops a request wherever it is and frees its slot (no-op if already done)."""
    request = self.requests.get(request_id)
    if request is None:
      return
    for op in self.scheduler.cancel(request_id):
      self._apply(op)
    self._finish(request, FINISH_CANCELLED)

  @property
  def has_work(self) -> bool:
    return bool(self.requests)

  # -- the iteration ---------------------------------------------------------

  def step(self) -> int:
    """Runs one iteration; returns the number of tokens it produced."""
    plan = self.scheduler.schedule()
    # Consecutive admissions are prefilled together; any other op ends the run.
    admits: list[Admit] = []
    first_tokens: dict[int, int] = {}
    for op in plan.ops:
      if isinstance(op, Admit):
        admits.append(op)
        continue
      first_tokens.update(self._flush_admits(admits))
      self._apply(op)
      self._check_budget()
    first_tokens.update(self._flush_admits(admits))
    self._check_budget()
    # Every request in the plan gains exactly one token: admitted ones from
    # their prefill, running ones from their arena's decode step.
    new_tokens = dict(first_tokens)
    for cache_len, entries in plan.decode.items():
      new_tokens.update(self._decode_arena(cache_len, entries))
    finished = frozenset(rid for rid, token in new_tokens.items() if self._append(self.requests[rid], token))
    self.scheduler.update(StepResult(tokens=new_tokens, finished=finished))
    for rid, token in new_tokens.items():
      request = self.requests[rid]
      if rid in finished:
        self._finish(request, request.finish_reason, [token])
      elif request.on_tokens is not None:
        request.on_tokens(request, [token], None)
    produced = len(new_tokens)
    self.metrics.steps += 1
    self.metrics.output_tokens += produced
    self.metrics.compilations = self.runner.compilations
    self.metrics.xla_compilations = xla_compilations() - self._xla_compiles_at_start
    self.metrics.reserved_bytes = self.scheduler.reserved_bytes
    self.metrics.waiting_per_class = self.scheduler.waiting_per_class()
    self.metrics.running_per_class = self.scheduler.running_per_class()
    self.metrics.used_bytes = self.runner.kv_bytes_per_token() * sum(
        len(r.prompt_ids) + len(r.output_ids) for entries in plan.decode.values() for _, rid in entries
        if (r := self.requests.get(rid)) is not None)
    return produced

  def run_until_done(self) -> None:
    while self.has_work:
      self.step()

  # -- ops -------------------------------------------------------------------

  def _apply(self, op) -> None:
    if isinstance(op, Resize):
      self.arenas[op.cache_len] = self.runner.resize_cache(
          self.arenas.pop(op.cache_len, None), op.new_slots, op.cache_len, tuple(op.row_map))
      if op.new_slots == 0:
        self.arenas.pop(op.cache_len, None)
      self.metrics.resizes += 1
    elif isinstance(op, Move):
      self.arenas[op.dst_cache_len] = self.runner.copy_slot(
          self.arenas[op.src_cache_len], self.arenas[op.dst_cache_len], op.src_slot, op.dst_slot)
      request = self.requests[op.request_id]
      request.rebuckets += 1
      request.reserved_tokens = op.dst_cache_len
      self.metrics.rebuckets += 1
      self.metrics.copied_bytes += op.num_tokens * self.runner.kv_bytes_per_token()
      self._log_overflow(request)
    elif isinstance(op, Preempt):
      request = self.requests[op.request_id]
      request.preemptions += 1
      self.metrics.preemptions += 1
      self._log_overflow(request)
    elif isinstance(op, Release):
      # The slot's rows are simply overwritten by its next occupant. LENGTH
      # cannot happen for requests that ``submit`` accepted (prompt +
      # max_tokens always fits a class the budget holds); it is honoured anyway.
      if op.reason is ReleaseReason.LENGTH:
        self._finish(self.requests[op.request_id], FINISH_LENGTH)
    else:
      raise TypeError(f"unknown op {op!r}")

  def _check_budget(self) -> None:
    """Guards the contract with the user: arenas on the device never exceed the budget."""
    device = sum(a.nbytes for a in self.arenas.values())
    self.metrics.observe_reserved(self.scheduler.reserved_bytes, device)
    if device > self.config.memory_budget_bytes:
      raise RuntimeError(f"KV arenas hold {device} bytes, over the budget of {self.config.memory_budget_bytes}")

  def _log_overflow(self, request: EngineRequest) -> None:
    if request.rebuckets + request.preemptions == 1:  # count each mispredicted request once
      self.metrics.mispredictions += 1

  def _flush_admits(self, admits: list[Admit]) -> dict[int, int]:
    """Prefills and inserts the pending admissions, grouped by arena; returns first tokens."""
    firsts: dict[int, int] = {}
    by_arena: dict[int, list[Admit]] = {}
    for op in admits:
      by_arena.setdefault(op.cache_len, []).append(op)
    admits.clear()
    max_batch = self.runner.prefill_batch_sizes[-1]
    for cache_len, ops in by_arena.items():
      for i in range(0, len(ops), max_batch):
        firsts.update(self._prefill_insert(cache_len, ops[i:i + max_batch]))
    return firsts

  def _prefill_insert(self, cache_len: int, ops: list[Admit]) -> dict[int, int]:
    arena = self.arenas[cache_len]
    prompts, rows = [], []
    for op in ops:
      request = self.requests[op.request_id]
      request.reserved_tokens = cache_len
      if op.resume:
        # Recompute the KV of prompt + every generated token; the prefill then
        # samples the next token with the same seed stream as a decode would.
        prompts.append(np.asarray(request.prompt_ids + request.output_ids, np.int32))
        self.metrics.recomputed_tokens += len(prompts[-1])
      else:
        prompts.append(np.asarray(request.prompt_ids, np.int32))
      rows.append(request)
    p, _ = self.runner.padded_prefill_shape(len(prompts), max(len(x) for x in prompts))
    sampling = self._sampling(rows, p)
    first, keys, values = self.runner.prefill(prompts, sampling, cache_len)
    slots = np.full((p,), arena.slots, np.int32)  # out of range: padding rows are dropped
    slots[:len(ops)] = [op.slot for op in ops]
    self.arenas[cache_len] = self.runner.insert(arena, keys, values, slots)
    first = np.asarray(first)
    self.metrics.prefills += 1
    self.metrics.prefill_tokens += sum(len(x) for x in prompts)
    return {op.request_id: int(first[i]) for i, op in enumerate(ops)}

  def _decode_arena(self, cache_len: int, live: list[tuple[int, int]]) -> dict[int, int]:
    arena = self.arenas[cache_len]
    b = arena.slots
    tokens = np.zeros((b,), np.int32)
    positions = np.full((b,), cache_len, np.int32)  # idle slots: out of range, write dropped
    per_slot: list[EngineRequest | None] = [None] * b
    for slot, rid in live:
      request = self.requests[rid]
      tokens[slot] = request.output_ids[-1]
      positions[slot] = len(request.prompt_ids) + len(request.output_ids) - 1
      per_slot[slot] = request
    next_tokens, self.arenas[cache_len] = self.runner.decode(arena, tokens, positions, self._sampling(per_slot, b))
    next_tokens = np.asarray(next_tokens)
    self.metrics.observe_batch(len(live), b)
    return {rid: int(next_tokens[slot]) for slot, rid in live}

  def _sampling(self, rows: list[EngineRequest | None], size: int) -> SlotSampling:
    temperature, top_k, top_p = np.zeros(size), np.zeros(size), np.ones(size)
    seed, step = np.zeros(size), np.zeros(size)
    for i, r in enumerate(rows):
      if r is not None:
        temperature[i], top_k[i], top_p[i] = r.temperature, r.top_k, r.top_p
        seed[i], step[i] = r.seed, len(r.output_ids)
    return SlotSampling.from_host(temperature, top_k, top_p, seed, step)

  # -- bookkeeping -----------------------------------------------------------

  def _append(self, request: EngineRequest, token: int) -> bool:
    """Adds a token to the request's answer; True when the answer is finished."""
    if request.first_token_at is None:
      request.first_token_at = time.perf_counter()
    request.output_ids.append(token)
    if not request.ignore_eos and token == self.runner.cfg.eos_token_id:
      request.finish_reason = FINISH_STOP
    elif request.stop_fn is not None and request.stop_fn(request.output_ids):
      request.finish_reason = FINISH_STOP
    elif len(request.output_ids) >= request.max_tokens:
      request.finish_reason = FINISH_LENGTH
    elif request.eos_at is not None and len(request.output_ids) >= request.eos_at:
      request.finish_reason = FINISH_STOP
    return request.finish_reason is not None

  def _finish(self, request: EngineRequest, reason: str, tokens: list[int] | None = None) -> None:
    request.finish_reason = reason
    request.finished_at = time.perf_counter()
    self.requests.pop(request.request_id, None)
    if reason != FINISH_CANCELLED:
      self.metrics.requests_finished += 1
      self.misprediction_log.observe(request)
    else:
      self.metrics.requests_cancelled += 1
    if request.on_tokens is not None:
      request.on_tokens(request, tokens or [], reason)

  def warmup(self, max_prompt_len: int = 128) -> int:
    """Compiles ahead of time every arena shape the budget allows.

    Decode and insert for each (slots, cache_len) arena that fits the memory
    budget, and prefill for every padded prompt length up to
    ``max_prompt_len`` (longer prompts compile on first use). Returns the
    number of executables compiled.
    """
    before = self.runner.compilations
    cfg = self.scheduler.config
    longest = max(max_prompt_len, self.runner.prefill_lengths[0])
    for cache_len in cfg.usable_cache_lens:
      # Prefill depends on (P, T, S) only, and its rows are padded to S, so
      # insert depends on (slots, S, P): each runs once per shape.
      rows = {}
      for p in self.runner.prefill_batch_sizes:
        for t in self.runner.prefill_lengths:
          if t > min(cache_len, longest):
            break
          _, *rows[p] = self.runner.prefill([np.ones((t,), np.int32)] * p, SlotSampling.greedy(p), cache_len)
      for slots in cfg.slot_options:
        if slots * cfg.slot_bytes(cache_len) > cfg.memory_budget_bytes:
          break
        arena = self.runner.init_cache(slots, cache_len)
        for p, (keys, values) in rows.items():
          arena = self.runner.insert(arena, keys, values, np.full((p,), slots, np.int32))
        zeros = np.zeros((slots,), np.int32)
        _, arena = self.runner.decode(arena, zeros, zeros, SlotSampling.greedy(slots))
        del arena
    self._xla_compiles_at_start = xla_compilations()
    return self.runner.compilations - before
