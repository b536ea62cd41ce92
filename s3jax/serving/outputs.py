"""From the engine's token ids to what callers read: text deltas, stop strings, final outputs.

The engine returns ``EngineOutput``s (token ids, log-probabilities, a finish reason); the
``OutputProcessor`` turns them into ``StreamEvent``s off the engine thread. Each request's tokens
are detokenized incrementally (``TextStream``); when a stop string appears, the request is
finished here at once (its final event carries the text up to the stop) and its id is returned,
so that the caller asks the engine to finish it too (vLLM's ``finish_requests``). Whatever the
engine still delivers for that request is dropped.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from s3jax.engine import EngineOutput, EngineRequest, FinishReason, TokenLogprobs
from s3jax.errors import QueueFullError
from s3jax.serving.detokenize import TextStream


@dataclasses.dataclass(kw_only=True)
class RequestStats:
  prompt_tokens: int
  output_tokens: int
  predicted_bucket: int | None
  predicted_output_len: int | None  # answer tokens the predictor reserved (s3), before any growth
  reserved_tokens: int  # the cache length held at the end, prompt included
  grows: int
  preemptions: int
  ttft_s: float
  tpot_s: float
  e2e_s: float


@dataclasses.dataclass(kw_only=True)
class RequestOutput:
  request_id: int
  text: str
  token_ids: list[int]
  finish_reason: FinishReason
  stats: RequestStats
  prompt_token_ids: list[int] = dataclasses.field(default_factory=list)  # the prompt, as the engine read it
  error: str | None = None
  logprobs: list[TokenLogprobs] | None = None  # one per token id, when SamplingParams.logprobs was set
  # One per prompt token (None for the first), when SamplingParams.prompt_logprobs was set.
  prompt_logprobs: list[TokenLogprobs | None] | None = None
  retry_later: bool = False  # it ended because the engine's queue was full: the same request may succeed later

  @property
  def token_id_array(self) -> np.ndarray:
    """``token_ids`` as a 1-D int32 NumPy array (``token_ids`` itself stays a list: the server
    writes it to JSON)."""
    return np.asarray(self.token_ids, dtype=np.int32)


@dataclasses.dataclass(kw_only=True)
class StreamEvent:
  request_id: int
  text: str
  token_ids: list[int]
  finish_reason: FinishReason | None = None
  output: RequestOutput | None = None
  logprobs: list[TokenLogprobs] | None = None  # one per token id, when SamplingParams.logprobs was set
  prompt_logprobs: list[TokenLogprobs | None] | None = None  # in the request's first event, when asked
  prompt_token_ids: list[int] | None = None  # with prompt_logprobs: the tokens they score
  prompt_tokens: int = 0  # the request's prompt, as the engine counted it (usage while streaming)


@dataclasses.dataclass(kw_only=True, eq=False)
class _Tracked:
  """What the output side keeps per request, beside the engine's record."""

  request: EngineRequest
  on_event: Callable[[StreamEvent], None] | None
  stream: TextStream
  token_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
  prompt_logprobs: list[TokenLogprobs | None] | None = None


class OutputProcessor:
  """Turns engine outputs into stream events; ``add`` and ``process`` may run on different threads.

  Args:
    tokenizer: decodes the answers.
    eos_token_id: the model's end of text (in ``token_ids``, never in the text).
  """

  def __init__(self, tokenizer, eos_token_id: int):
    self.tokenizer = tokenizer
    self.eos_token_id = eos_token_id
    self._tracked: dict[int, _Tracked] = {}
    self._lock = threading.Lock()

  def add(self, request: EngineRequest, stops: Sequence[str], on_event: Callable[[StreamEvent], None] | None) -> None:
    """Tracks a request before the engine sees it, so that none of its outputs is missed."""
    with self._lock:
      self._tracked[request.request_id] = _Tracked(
        request=request, on_event=on_event, stream=TextStream(self.tokenizer, stops)
      )

  def __len__(self) -> int:
    with self._lock:
      return len(self._tracked)

  def process(self, outputs: Sequence[EngineOutput]) -> list[int]:
    """Emits the events of ``outputs``; returns the ids of the requests a stop string ended (the
    engine must finish them: ``Engine.cancel(request_id, FinishReason.STOP)``)."""
    stopped = []
    for out in outputs:
      with self._lock:
        tracked = self._tracked.get(out.request_id)
      if tracked is None:  # ended already, at a stop string: the engine's late tokens are dropped
        continue
      event = self._event(tracked, out)
      if event.finish_reason is not None:
        with self._lock:
          del self._tracked[out.request_id]
        if out.finish_reason is None:
          stopped.append(out.request_id)
      if tracked.on_event is not None:
        tracked.on_event(event)
    return stopped

  def _event(self, tracked: _Tracked, out: EngineOutput) -> StreamEvent:
    request, stream, finish = tracked.request, tracked.stream, out.finish_reason
    tokens = list(out.token_ids)
    # The token that ended the answer (EOS, a stop token id) is in token_ids but not in the text.
    ends = finish is FinishReason.STOP and tokens and self._is_stop_token(request, tokens[-1])
    stream.push(tokens[:-1] if ends else tokens)
    tracked.token_ids += tokens
    tracked.logprobs += out.logprobs
    if out.prompt_logprobs is not None:
      tracked.prompt_logprobs = list(out.prompt_logprobs)
    if finish is None and stream.stop_index() is not None:
      finish = FinishReason.STOP
    delta = stream.delta(final=finish is not None)
    return StreamEvent(
      request_id=request.request_id,
      text=delta,
      token_ids=tokens,
      finish_reason=finish,
      output=None if finish is None else self._output(tracked, finish),
      logprobs=None if request.logprobs is None else list(out.logprobs),
      prompt_logprobs=None if out.prompt_logprobs is None else list(out.prompt_logprobs),
      prompt_token_ids=None if out.prompt_logprobs is None else list(request.prompt_ids),
      prompt_tokens=len(request.prompt_ids),
    )

  def _is_stop_token(self, request: EngineRequest, token: int) -> bool:
    return token in request.stop_token_ids or (not request.ignore_eos and token == self.eos_token_id)

  def _output(self, tracked: _Tracked, finish: FinishReason) -> RequestOutput:
    r = tracked.request
    # A request ended here at a stop string is still the engine's until its next step: only the
    # counters are read from its record, never its token list.
    end = r.finished_at or time.perf_counter()
    first = r.first_token_at or end
    n = len(tracked.token_ids)
    return RequestOutput(
      request_id=r.request_id,
      text=tracked.stream.emitted,
      token_ids=list(tracked.token_ids),
      prompt_token_ids=list(r.prompt_ids),
      finish_reason=finish,
      error=None if r.error is None else str(r.error),
      retry_later=isinstance(r.error, QueueFullError),
      logprobs=None if r.logprobs is None else list(tracked.logprobs),
      prompt_logprobs=tracked.prompt_logprobs,
      stats=RequestStats(
        prompt_tokens=len(r.prompt_ids),
        output_tokens=n,
        predicted_bucket=r.predicted_bucket,
        predicted_output_len=r.predicted_output_len,
        reserved_tokens=r.reserved_tokens,
        grows=r.grows,
        preemptions=r.preemptions,
        ttft_s=first - r.submitted_at,
        tpot_s=(end - first) / max(n - 1, 1),
        e2e_s=end - r.submitted_at,
      ),
    )
