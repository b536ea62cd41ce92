"""A fake ``Backend`` for in-process tests of the HTTP layer (no model).

The fake honours the ``LLM`` contract the server relies on (``submit`` raises
synchronously, events arrive from another thread, ``cancel`` ends a request
with "cancelled"), with hand-checkable output: the answer of a prompt is
``" t0 t1 ... t{n-1}"`` for ``max_tokens`` n.
"""

from __future__ import annotations

import threading

from s3jax.engine import EngineMetrics, FinishReason, TokenLogprobs
from s3jax.errors import QueueFullError, RequestError
from s3jax.parallel.mesh import MeshShape
from s3jax.scheduler import Policy
from s3jax.serving.chat import render_chat
from s3jax.serving.outputs import RequestOutput, RequestStats, StreamEvent


class FakeLLM:
  """A ``Backend``: emits one token every ``step_s`` from a thread per request; ``max_queue`` bounds
  live requests."""

  model_name = "fake"
  max_model_len = 64
  policy = Policy.S3
  memory_budget_bytes = 2**20
  mesh_shape = MeshShape()
  predictor = None
  retrainer = None
  adapter = None

  def __init__(
    self, step_s: float = 0.002, max_queue: int | None = None, fail: bool = False, engine_full: bool = False
  ):
    """``engine_full``: every request is accepted, then refused by the engine's full queue (the
    race ``LLM``'s early check cannot exclude): it ends with "error" and ``retry_later``."""
    self._step_s, self._max_queue, self._fail, self._engine_full = step_s, max_queue, fail, engine_full
    self._lock = threading.Lock()
    self._live: dict[int, threading.Event] = {}
    self._next_id = 0
    self.cancelled: list[int] = []
    self.submitted: list[tuple] = []  # (prompt, params) of every accepted submit

  def start(self) -> None:
    pass

  def shutdown(self, drain_timeout_s: float = 30.0) -> None:
    pass

  def is_alive(self) -> bool:
    return True

  def metrics(self) -> EngineMetrics:
    with self._lock:
      running = len(self._live)
    return EngineMetrics(
      budget_bytes=2**20,
      reserved_bytes=running * 1024,
      max_batch_size=running,
      waiting_per_class={128: 0},
      running_per_class={128: running},
    )

  def submit(self, prompt, params, on_event) -> int:
    if isinstance(prompt, str) and not prompt:
      raise RequestError("prompt", "prompt is empty: give at least one token of prompt")
    if prompt == "refused by the engine":  # a RequestError whose message names no field: the param comes by type
      raise RequestError("stop_token_ids", "this model has no such token")
    with self._lock:
      if self._max_queue is not None and len(self._live) >= self._max_queue:
        raise QueueFullError("queue full")
      rid, self._next_id = self._next_id, self._next_id + 1
      self.submitted.append((prompt, params))
      stop = self._live[rid] = threading.Event()
    threading.Thread(
      target=self._run, args=(rid, params.max_tokens or 4, params.logprobs, on_event, stop), daemon=True
    ).start()
    return rid

  def cancel(self, request_id: int) -> None:
    with self._lock:
      event = self._live.get(request_id)
    if event is not None:
      self.cancelled.append(request_id)
      event.set()

  def _run(self, rid: int, n: int, logprobs: int | None, on_event, stop: threading.Event) -> None:
    """Token i has log-probability -i, and its alternatives 100 + j have -(i + j + 1)."""
    text, reason = "", FinishReason.LENGTH
    every = None if logprobs is None else []
    for i in range(n):
      if stop.wait(self._step_s):
        reason = FinishReason.CANCELLED
        break
      if (self._fail and i == 1) or self._engine_full:
        reason = FinishReason.ERROR
        break
      text += f" t{i}"
      entries = (
        None
        if logprobs is None
        else [
          TokenLogprobs(token=i, logprob=-float(i), top=tuple((100 + j, -float(i + j + 1)) for j in range(logprobs)))
        ]
      )
      every = None if entries is None else every + entries
      on_event(StreamEvent(request_id=rid, text=f" t{i}", token_ids=[i], logprobs=entries, prompt_tokens=3))
    with self._lock:
      del self._live[rid]
    stats = RequestStats(
      prompt_tokens=3,
      output_tokens=len(text.split()),
      predicted_bucket=0,
      predicted_output_len=4,
      reserved_tokens=8,
      grows=0,
      preemptions=0,
      ttft_s=0.01,
      tpot_s=0.002,
      e2e_s=0.02,
    )
    out = RequestOutput(
      request_id=rid,
      text=text,
      token_ids=[],
      finish_reason=reason,
      stats=stats,
      logprobs=every,
      retry_later=self._engine_full,
    )
    on_event(
      StreamEvent(
        request_id=rid,
        text="",
        token_ids=[],
        finish_reason=reason,
        output=out,
        logprobs=None if logprobs is None else [],
        prompt_tokens=3,
      )
    )

  def decode(self, token_ids) -> str:
    return "".join(f"<{t}>" for t in token_ids)

  def chat_prompt_ids(self, messages, chat_template=None) -> list[int]:
    """Renders with the real template code (the fake has no tokenizer: one id per character)."""
    self.last_chat_prompt = render_chat(object(), messages, chat_template)
    return [ord(ch) % 50000 for ch in self.last_chat_prompt]
