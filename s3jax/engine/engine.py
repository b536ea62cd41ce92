"""The engine: owns the device, executes the scheduler's plans, one iteration at a time.

Every iteration (``step``):
  1. requests submitted since the last step get their length predicted, in one batched call of
     the predictor, and go to the scheduler;
  2. the scheduler (plain host code) returns a ``StepPlan``: releases, preemptions, growths, row
     moves, admissions with their pages, the rows to decode and the pages granted to them;
  3. the engine turns it into device work: prefill calls for the admitted prompts and the chunks
     of long ones (packed, each writing its KV into the pages the plan gives it, a chunk attending
     to its earlier chunks' KV there), then ONE decode call for every live row,
     whatever their classes, which first applies the iteration's ``StepUpdates`` (rows freed,
     moved and admitted, pages granted to growing rows) to the device-resident ``DecodeState``;
     the engine chooses no page itself;
  4. the iteration's tokens come back as one packed array, copied to the host while the next
     iteration runs, and are read one iteration late (``pipeline_depth=1``); then EOS and
     ``max_tokens`` are checked on token ids, the scheduler is updated, and ``step`` returns one
     ``EngineOutput`` per request that got tokens or finished.

Prompt log-probabilities (``prompt_logprobs``) come out of the prefill that writes the prompt's
KV; a request with ``max_tokens=0`` never reaches the scheduler: its prompt is prefilled only to be
scored, into no row and no page.

The engine never calls the layer above: text, stop strings and streaming live in serving, which
reads the outputs and ends a request with ``cancel(request_id, FinishReason.STOP)`` (vLLM's
``finish_requests``). A cancel takes effect, and yields its output, in the next ``step``.

Reading one step behind keeps every answer identical: the device feeds each row its own last
token, so the host's late read changes no token; what it costs is that a request that ended on
EOS may decode once more before the host knows, and that token is dropped.

Threading: the engine is not thread-safe. Exactly one thread (the caller of ``step``, e.g. the
serving loop in ``s3jax.serving.llm``) drives it and runs the predictor; other threads talk to
that thread through queues. An online retrainer (``s3jax.supervisor.retrainer``) trains the
predictor's head on its own thread, on the device too, and swaps new parameters in between steps.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from s3jax.engine.config import EngineConfig
from s3jax.engine.metrics import EngineMetrics
from s3jax.engine.request import EngineOutput, EngineRequest, FinishReason, TokenLogprobs
from s3jax.errors import QueueFullError, RequestError
from s3jax.executor.runner import ModelRunner, xla_compilations
from s3jax.executor.sampling import PromptScores, Sampled
from s3jax.executor.step_state import Admission, PrefillPack, StepShapes, StepUpdates
from s3jax.scheduler import (
  Admit,
  Grow,
  LengthDist,
  MoveRow,
  Preempt,
  PrefillChunk,
  Release,
  SchedRequest,
  Scheduler,
  StepPlan,
  StepResult,
  prefix_hashes,
)
from s3jax.supervisor import MispredictionLog

# Finished requests the live overflow rate is measured over (EngineMetrics.live_overflow_rate).
OVERFLOW_WINDOW = 200


class Predictor(Protocol):
  """What the engine needs from a length predictor (``s3jax.predictor.LengthPredictor``, the
  served model's own ``s3jax.predictor.self_head.SelfLengthPredictor``, or the fixed-bucket
  baseline ``s3jax.predictor.fixed.FixedBucketPredictor``): one batched ``predict_lengths`` over
  the prompts (their text, or their token ids when ``reads_token_ids``), the bucket scheme that
  labels a reservation, and the shapes to compile ahead of time."""

  buckets: Any  # a ``BucketScheme``: labels each reservation with its bucket (metrics, logs)
  shapes: Sequence[tuple[int, int]]  # the (batch, tokens) shapes ``warmup`` compiles
  num_compilations: int

  # [B] prompts (text, or token ids) -> ([B] output tokens to reserve, [B, 2] mean and scale of
  # log(tokens + 1))
  def predict_lengths(self, prompts: Sequence) -> tuple[np.ndarray, np.ndarray]: ...

  def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Scored:
  """A prefill pack whose prompts asked for their tokens' log-probabilities."""

  scores: PromptScores  # [T] on the device, copying to the host
  # (request_id, flat index of its first packed token, its position, tokens packed) of each asking prompt
  spans: tuple[tuple[int, int, int, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _InFlight:
  rows: tuple[tuple[int, int], ...]  # (row, request_id) of every token of the iteration
  out: Sampled  # [B] on the device, copying to the host
  scored: tuple[_Scored, ...] = ()  # the iteration's prefills that scored their prompts


class Engine:
  """Runs any scheduling policy over a ``ModelRunner`` with a paged KV pool.

  Args:
    runner: the model and its compiled executables (shared by engines of the same shapes).
    config: the engine's settings.
    predictor: the length predictor (``Predictor``); the s3 and s3-reserve policies read it.

  With ``config.record_plans``, ``plans`` keeps every ``StepPlan`` the scheduler returned (tests
  and the simulator compare decisions); ``misprediction_log`` records every finished request's
  predicted and true length, and the prompt text the predictor read.
  """

  def __init__(self, runner: ModelRunner, config: EngineConfig, predictor: Predictor | None = None):
    self.runner = runner
    self.config = config
    self.predictor = predictor
    self.scheduler = Scheduler(
      config.scheduler, kv_bytes_per_token=runner.kv_bytes_per_token(), max_len=runner.cfg.max_seq_len
    )
    layout = self.scheduler.layout
    self.shapes = StepShapes.create(
      max_seq_len=runner.cfg.max_seq_len,
      num_pages=layout.num_pages,
      page_size=layout.page_size,
      batch_sizes=layout.batch_sizes,
      max_admissions=config.scheduler.max_admissions_per_step,
      min_prefill_len=config.min_prefill_len,
      scan_chunk=config.scan_chunk_pages,
    )
    self.requests: dict[int, EngineRequest] = {}
    self.misprediction_log = MispredictionLog(config.misprediction_log_size)
    self.device_memory = runner.device_memory(self.shapes)  # predicted, on the fullest device
    self._state = runner.init_state(self.shapes)
    self._arrivals: list[EngineRequest] = []  # submitted, not yet predicted and scheduled
    self._scoring: list[EngineRequest] = []  # max_tokens=0: prefilled for their prompt's scores only
    self._finishing: dict[int, FinishReason] = {}  # cancelled or stopped, ended in the next step
    self.plans: list[StepPlan] = []  # with config.record_plans
    self._freed_rows: set[int] = set()  # rows to clear in the next decode call
    self._inflight: collections.deque[_InFlight] = collections.deque()
    self._no_updates = runner.put(StepUpdates.from_host(self.shapes))
    self.metrics = EngineMetrics(budget_bytes=config.memory_budget_bytes, device_bytes=self._state.pool.nbytes)
    self._xla_compiles_at_start = xla_compilations()

  # -- submission ----------------------------------------------------------------

  @property
  def _predictor_reads_text(self) -> bool:
    return self.predictor is not None and not getattr(self.predictor, "reads_token_ids", False)

  @property
  def max_total_len(self) -> int:
    """Longest prompt + answer this engine can hold: the model's limit, or less when the memory
    budget holds no reservation that long."""
    return self.scheduler.max_total_len

  def check_lengths(self, prompt_len: int, max_tokens: int) -> None:
    """Raises ``RequestError`` unless a prompt of ``prompt_len`` tokens can run to ``max_tokens``
    answer tokens in this engine (the scheduler's check, the only one; ``max_tokens=0``, which
    takes no memory, needs a prompt the longest reservation could hold)."""
    self.scheduler.check_lengths(prompt_len, max(max_tokens, 1))

  def submit(self, request: EngineRequest) -> None:
    """Queues a request; raises ``RequestError`` when it can never run, ``QueueFullError`` when
    ``max_waiting`` requests are waiting."""
    self.check_lengths(len(request.prompt_ids), request.max_tokens)  # now, in the caller
    if request.request_id in self.requests:
      raise ValueError(f"request {request.request_id} is already submitted")
    max_waiting = self.config.scheduler.max_waiting
    if max_waiting is not None and self.num_waiting >= max_waiting:
      raise QueueFullError(f"{max_waiting} requests are waiting (max_waiting); retry later")
    scoring = request.max_tokens == 0
    if (
      not scoring
      and self._predictor_reads_text
      and request.predicted_output_len is None
      and request.prompt_text is None
    ):
      raise RequestError("prompt", "the length predictor reads prompt_text: give the request's prompt as text")
    request.submitted_at = time.perf_counter()
    self.requests[request.request_id] = request
    (self._scoring if scoring else self._arrivals).append(request)
    self.metrics.requests_submitted += 1

  def cancel(self, request_id: int, reason: FinishReason = FinishReason.CANCELLED) -> None:
    """Ends a request wherever it is, at the start of the next ``step``, which returns its final
    output (nothing if it finished before). ``reason=STOP`` ends it as a normal answer (a stop
    string was found); its row and pages are freed in that step."""
    if request_id in self.requests:
      self._finishing.setdefault(request_id, reason)

  @property
  def num_waiting(self) -> int:
    """Requests submitted and not running yet (preempted ones included)."""
    return len(self._arrivals) + len(self._scoring) + self.scheduler.num_waiting

  @property
  def has_work(self) -> bool:
    return bool(self.requests) or bool(self._inflight) or self.scheduler.has_work

  # -- the iteration -----------------------------------------------------------

  def step(self) -> list[EngineOutput]:
    """Runs one iteration; returns an output for every request that got tokens or finished."""
    outputs = self._apply_finishes()
    outputs += self._score_prompts_only()
    outputs += self._schedule_arrivals()
    plan = self.scheduler.schedule()
    if self.config.record_plans:
      self.plans.append(plan)
    dispatched = self._dispatch(plan)
    keep = self.config.pipeline_depth if dispatched else 0
    while len(self._inflight) > keep:
      outputs += self._collect(self._inflight.popleft())
    self._refresh_metrics()
    return outputs

  def run_until_done(self) -> list[EngineOutput]:
    """Steps until every request has finished; returns every step's outputs, in order."""
    outputs = []
    while self.has_work:
      outputs += self.step()
    return outputs

  def _apply_finishes(self) -> list[EngineOutput]:
    """Ends the requests cancelled (or stopped) since the last step."""
    finishing, self._finishing = self._finishing, {}
    outputs = []
    for request_id, reason in finishing.items():
      request = self.requests.get(request_id)
      if request is None:  # it finished by itself meanwhile
        continue
      if request in self._arrivals:
        self._arrivals.remove(request)
      elif request in self._scoring:
        self._scoring.remove(request)
      else:
        self.scheduler.cancel(request_id)
      outputs.append(self._finish(request, reason))
    return outputs

  def _schedule_arrivals(self) -> list[EngineOutput]:
    """Predicts the new requests' lengths in one batched call and submits them to the scheduler;
    returns the outputs of those the scheduler refused."""
    arrivals, self._arrivals = self._arrivals, []
    refused = []
    unpredicted = [r for r in arrivals if r.predicted_output_len is None or r.predicted_length is None]
    if self.predictor is not None and unpredicted:
      prompts = [r.prompt_text if self._predictor_reads_text else r.prompt_ids for r in unpredicted]
      reserve, dists = self.predictor.predict_lengths(prompts)
      for r, tokens, (mu, sigma) in zip(unpredicted, np.asarray(reserve), np.asarray(dists)):
        if r.predicted_output_len is None:
          r.predicted_output_len = int(tokens)
        if r.predicted_length is None:
          r.predicted_length = LengthDist(float(mu), float(sigma))
        r.predicted_bucket = int(self.predictor.buckets.bucket_of(r.predicted_output_len))
    for r in arrivals:
      try:
        self.scheduler.submit(
          SchedRequest(
            request_id=r.request_id,
            prompt_len=len(r.prompt_ids),
            max_tokens=r.max_tokens,
            predicted_output_len=r.predicted_output_len,
            predicted_length=r.predicted_length,
            true_output_len=r.true_output_len,
            page_hashes=self._page_hashes(r),
          )
        )
      except (ValueError, QueueFullError) as e:  # checked in submit(); e.g. s3 without a prediction
        r.error = e
        refused.append(self._finish(r, FinishReason.ERROR))
    return refused

  def _page_hashes(self, request: EngineRequest) -> tuple[int, ...]:
    """The keys of the prompt's full pages, for prefix caching; none for a prompt whose every
    token is to be scored (a cached page is never prefilled, so it is never scored)."""
    if not self.scheduler.config.prefix_caching or request.prompt_logprobs is not None:
      return ()
    return prefix_hashes(request.prompt_ids, self.scheduler.layout.page_size)

  def _dispatch(self, plan: StepPlan) -> bool:
    """Applies the plan's ops and dispatches its device work; False when nothing decodes."""
    moves, admissions, prefills = [], [], []
    for op in plan.ops:
      if isinstance(op, (Release, Preempt)):
        self._freed_rows.add(op.slot)
        if isinstance(op, Preempt):
          request = self.requests[op.request_id]
          request.preemptions += 1
          request.reserved_tokens = 0
      elif isinstance(op, Grow):
        request = self.requests[op.request_id]
        request.grows += 1
        request.reserved_tokens = op.new_cache_len
      elif isinstance(op, MoveRow):
        moves.append((op.src_slot, op.dst_slot))
      elif isinstance(op, Admit):
        admissions.append(self._admission(op))
        prefills.append(admissions[-1])
      elif isinstance(op, PrefillChunk):
        prefills.append(self._chunk(op))
      else:
        raise TypeError(f"unknown op {op!r}")
    state, scored = self._state, []
    for pack in self._packs(prefills):
      state, scores = self._prefill(state, pack)
      if scores is not None:
        scored.append(scores)
    if not plan.rows:  # only chunks of a long prompt ran
      self._state = state
      self._read_scores(scored)
      return False
    updates = self._no_updates
    grants = [(g.slot, g.index, g.page) for g in plan.grants]
    holds = [slot for slot, _ in plan.held]
    if moves or admissions or grants or holds or self._freed_rows:
      updates = StepUpdates.from_host(
        self.shapes, moves=moves, frees=sorted(self._freed_rows), admissions=admissions, grants=grants, holds=holds
      )
      self._freed_rows.clear()
    batch = self.shapes.batch_size_for(max(slot for slot, _ in plan.rows) + 1)
    self._state, out = self.runner.generate(self.shapes, state, updates, batch, plan.scan_pages)
    out.tokens.copy_to_host_async()
    if any(self.requests[rid].logprobs is not None for _, rid in plan.rows if rid in self.requests):
      for array in (out.logprobs, out.top_ids, out.top_logprobs):
        array.copy_to_host_async()
    self._inflight.append(_InFlight(rows=plan.rows, out=out, scored=tuple(scored)))
    scanned = min(self.shapes.chunks_for(plan.scan_pages) * self.shapes.scan_chunk, self.shapes.num_pages)
    # Each decoded row attends to every position up to the one it writes: its tokens before this
    # plan added one.
    attended = sum(self.scheduler.total_len(rid) - 1 for _, rid in plan.decode)
    self.metrics.observe_decode(len(plan.decode), batch, scanned, attended)
    return True

  def _tokens(self, request_id: int, planned: int) -> list[int]:
    """What an admission prefills: the prompt, and for a resumed request its answer so far."""
    request = self.requests[request_id]
    tokens = request.prompt_ids + request.output_ids
    if self.scheduler.total_len(request_id) != len(tokens) + planned:
      raise AssertionError(f"request {request_id} resumes before all its tokens were read back")
    return tokens

  def _wants_prompt_scores(self, request: EngineRequest) -> bool:
    return request.prompt_logprobs is not None and not request.output_ids  # the first prefill only

  def _chunk(self, op: PrefillChunk) -> Admission:
    """The prefill of one chunk of a long prompt into its pages; no row, no token."""
    request = self.requests[op.request_id]
    return Admission(
      tokens=self._tokens(op.request_id, 0),
      pages=op.pages,
      row=self.shapes.max_slots,
      start=op.start,
      end=op.end,
      score_prompt=self._wants_prompt_scores(request),
      request_id=op.request_id,
    )

  def _admission(self, op: Admit) -> Admission:
    """The prefill of an admitted prompt (resumed: prompt + answer so far; after chunks: the last
    one) into its pages."""
    request = self.requests[op.request_id]
    done = len(request.output_ids)
    tokens = self._tokens(op.request_id, 1)  # the plan counted the token this prefill samples
    request.reserved_tokens = op.cache_len
    return Admission(
      tokens=tokens,
      pages=op.pages,
      row=op.slot,
      start=op.start,
      step=done,
      temperature=request.temperature,
      top_k=request.top_k,
      top_p=request.top_p,
      seed=request.seed,
      logprobs=-1 if request.logprobs is None else request.logprobs,
      score_prompt=self._wants_prompt_scores(request),
      request_id=request.request_id,
    )

  def _prefill(self, state, pack: Sequence[Admission]) -> tuple[Any, _Scored | None]:
    """One prefill call; its prompt scores (copying to the host) when some prompt asked."""
    packed = PrefillPack.from_host(self.shapes, pack)
    state, scores = self.runner.prefill_scored(self.shapes, state, packed)
    self.metrics.prefill_calls += 1
    self.metrics.prefill_tokens += sum(a.prefill_len for a in pack)
    self.metrics.prefill_padded_tokens += packed.length
    if not packed.score:
      return state, None
    for array in (scores.logprobs, scores.top_ids, scores.top_logprobs):
      array.copy_to_host_async()
    spans, flat = [], 0
    for a in pack:
      if a.score_prompt:
        spans.append((a.request_id, flat, a.start, a.prefill_len))
      flat += a.prefill_len
    return state, _Scored(scores=scores, spans=tuple(spans))

  def _read_scores(self, scored: Sequence[_Scored]) -> set[int]:
    """Files each scored token's log-probability under the prompt token it scores (the next one) in
    its request's ``prompt_token_logprobs``; returns the requests whose prompt is now scored whole."""
    done = set()
    for pack in scored:
      scores = pack.scores
      logprobs, top_ids, top_logprobs = (np.asarray(a) for a in (scores.logprobs, scores.top_ids, scores.top_logprobs))
      for request_id, flat, start, n in pack.spans:
        request = self.requests.get(request_id)
        if request is None:  # cancelled meanwhile
          continue
        prompt, k = request.prompt_ids, request.prompt_logprobs
        if request.prompt_token_logprobs is None:
          request.prompt_token_logprobs = [None] * len(prompt)  # the first token stays None: nothing precedes it
        for i in range(min(n, len(prompt) - 1 - start)):
          f, j = flat + i, start + i + 1
          top = tuple((int(t), float(lp)) for t, lp in zip(top_ids[f, :k], top_logprobs[f, :k]))
          request.prompt_token_logprobs[j] = TokenLogprobs(token=prompt[j], logprob=float(logprobs[f]), top=top)
        if start + n >= len(prompt):
          done.add(request_id)
    return done

  def _score_prompts_only(self) -> list[EngineOutput]:
    """Answers requests that want no answer (``max_tokens=0``): those asking for their prompt's
    log-probabilities get one prefill pack per step, which writes no KV (every page is "no page")
    and feeds no row; the rest need no device work."""
    outputs = [self._finish(r, FinishReason.LENGTH) for r in self._scoring if r.prompt_logprobs is None]
    waiting = [r for r in self._scoring if r.prompt_logprobs is not None]
    if waiting:
      group = self.shapes.group_prefills([len(r.prompt_ids) for r in waiting], self.config.prefill_pack_tokens)[0]
      pack = [waiting[i] for i in group]
      g, no_page = self.shapes.page_size, self.shapes.num_pages
      admissions = [
        Admission(
          tokens=r.prompt_ids,
          pages=[no_page] * -(-len(r.prompt_ids) // g),
          row=self.shapes.max_slots,
          score_prompt=True,
          request_id=r.request_id,
        )
        for r in pack
      ]
      self._state, scored = self._prefill(self._state, admissions)
      self._read_scores([scored])
      now = time.perf_counter()
      for r in pack:
        r.first_token_at = now
        outputs.append(self._finish(r, FinishReason.LENGTH, prompt_logprobs=tuple(r.prompt_token_logprobs)))
    self._scoring = [r for r in waiting if r.finish_reason is None]
    return outputs

  def _packs(self, prefills: Sequence[Admission]) -> list[list[Admission]]:
    """Groups prefills into calls of at most ``prefill_pack_tokens`` tokens each."""
    groups = self.shapes.group_prefills(
      [a.prefill_len for a in prefills], self.config.prefill_pack_tokens, [a.start > 0 for a in prefills]
    )
    return [[prefills[i] for i in group] for group in groups]

  def _collect(self, flight: _InFlight) -> list[EngineOutput]:
    """Reads one iteration's tokens, ends finished requests, updates the scheduler."""
    t0 = time.perf_counter()
    tokens = np.asarray(flight.out.tokens)
    now = time.perf_counter()
    scores = None  # read only for an iteration some request asked log-probabilities of
    prompt_scored = self._read_scores(flight.scored)
    self.metrics.host_wait_s += now - t0
    delivered: list[tuple[EngineRequest, int, tuple[TokenLogprobs, ...]]] = []
    finished: set[int] = set()
    for slot, rid in flight.rows:
      request = self.requests.get(rid)
      if request is None:  # cancelled, or ended on an earlier token: this one is dropped
        continue
      token = int(tokens[slot])
      if request.first_token_at is None:
        request.first_token_at = now
      request.output_ids.append(token)
      entry = ()
      if request.logprobs is not None:
        scores = scores or tuple(
          np.asarray(a) for a in (flight.out.logprobs, flight.out.top_ids, flight.out.top_logprobs)
        )
        chosen, top_ids, top_logprobs = (a[slot] for a in scores)
        top = tuple((int(t), float(lp)) for t, lp in zip(top_ids[: request.logprobs], top_logprobs[: request.logprobs]))
        entry = (TokenLogprobs(token=token, logprob=float(chosen), top=top),)
        request.output_logprobs.extend(entry)
      delivered.append((request, token, entry))
      reason = self._finish_reason(request, token)
      if reason is not None:
        request.finish_reason = reason
        finished.add(rid)
    self.scheduler.update(StepResult(tokens={r.request_id: t for r, t, _ in delivered}, finished=frozenset(finished)))
    self.metrics.output_tokens += len(delivered)
    outputs = []
    for request, token, entry in delivered:
      prompt = tuple(request.prompt_token_logprobs) if request.request_id in prompt_scored else None
      if request.request_id in finished:
        outputs.append(self._finish(request, request.finish_reason, (token,), entry, prompt))
      else:
        outputs.append(EngineOutput(request, (token,), entry, prompt_logprobs=prompt))
    return outputs

  def _finish_reason(self, request: EngineRequest, token: int) -> FinishReason | None:
    if (not request.ignore_eos and token == self.runner.cfg.eos_token_id) or token in request.stop_token_ids:
      return FinishReason.STOP
    if len(request.output_ids) >= request.max_tokens:
      return FinishReason.LENGTH
    if request.eos_at is not None and len(request.output_ids) >= request.eos_at:
      return FinishReason.STOP
    return None

  def _finish(
    self, request: EngineRequest, reason: FinishReason, tokens: tuple[int, ...] = (), logprobs=(), prompt_logprobs=None
  ) -> EngineOutput:
    request.finish_reason = reason
    request.finished_at = time.perf_counter()
    self.requests.pop(request.request_id, None)
    if reason is FinishReason.ERROR:
      self.metrics.requests_failed += 1
    elif reason is FinishReason.CANCELLED:
      self.metrics.requests_cancelled += 1
    else:
      self.metrics.requests_finished += 1
      if request.max_tokens > 0:  # a scored prompt without an answer says nothing of answer lengths
        self.misprediction_log.observe(request)
    return EngineOutput(request, tokens, logprobs, reason, prompt_logprobs)

  def _refresh_metrics(self) -> None:
    m = self.metrics
    m.observe_memory(self.scheduler.reserved_bytes, self.scheduler.used_bytes, self.scheduler.cached_pages)
    m.compilations = self.runner.compilations
    m.xla_compilations = xla_compilations() - self._xla_compiles_at_start

  # -- introspection and warm-up -----------------------------------------------------

  def snapshot(self) -> EngineMetrics:
    """A copy of the counters with the scheduler's and the per-class queue lengths (call it on
    the engine thread, e.g. between steps)."""
    snap = self.metrics.snapshot()
    snap.scheduler = self.scheduler.stats
    snap.waiting_per_class = self.scheduler.waiting_per_class()
    snap.running_per_class = self.scheduler.running_per_class()
    snap.live_overflow_rate, snap.live_overflow_requests = self.misprediction_log.overflow_rate(OVERFLOW_WINDOW)
    return snap

  @property
  def num_executables(self) -> int:
    """Executables the device path can reach: ``shapes.num_executables``."""
    return self.shapes.num_executables

  def warmup(self, progress: bool = False) -> int:
    """Compiles ahead of time every executable this engine can reach, and the predictor's.

    Compiling needs no memory beyond the pool and the weights: nothing runs. Returns the number
    of executables built now (loaded from the persistent compilation cache or compiled).
    """
    predictor_shapes = list(self.predictor.shapes) if self.predictor is not None else []
    bar = None
    if progress:
      from tqdm.auto import tqdm

      bar = tqdm(total=self.shapes.num_executables + len(predictor_shapes), desc="compiling executables", unit="exe")
    tick = (lambda _: bar.update(1)) if bar is not None else None
    built = self.runner.compile(self.shapes, on_compiled=tick)
    workspace = self.runner.workspace_bytes(self.shapes)
    if workspace > self.device_memory.workspace:  # the memory model's budget left too little for XLA's temporaries
      logging.getLogger(__name__).warning(
        "the compiled steps need %.1f MiB of workspace per device, the memory model kept %.1f MiB: a memory "
        "budget per device may be exceeded by the difference",
        workspace / 2**20,
        self.device_memory.workspace / 2**20,
      )
    for shape in predictor_shapes:
      before = self.predictor.num_compilations
      self.predictor.warmup([shape])
      built += self.predictor.num_compilations - before
      tick and tick(shape)
    if bar is not None:
      bar.close()
    self._xla_compiles_at_start = xla_compilations()
    return built
