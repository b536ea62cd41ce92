"""From engine events to OpenAI responses: the per-request channel, the JSON body of a finished
request and the server-sent events of a streamed one, for both the completions and the chat API.

A request's choices are numbered as OpenAI numbers them: prompt i's choice j is ``i * n + j``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from s3jax.engine import FinishReason, TokenLogprobs
from s3jax.errors import RequestError
from s3jax.serving import chat as C
from s3jax.serving import protocol as P
from s3jax.serving.metrics import ServerMetrics
from s3jax.serving.outputs import RequestOutput, StreamEvent

# What a channel delivers: (choice index, event), or ABORTED when the server gives up on the request.
ABORTED = (-1, None)


class Channel:
  """Per-HTTP-request bridge from the engine thread to the event loop.

  One queue for all choices of the request: items are ``(choice index, event)``. Each queue
  holds at most one event per generated token plus a final one per choice, so it is bounded by
  the request's ``max_tokens``.
  """

  def __init__(self, loop: asyncio.AbstractEventLoop, metrics: ServerMetrics):
    self._loop = loop
    self._metrics = metrics
    self.queue: asyncio.Queue[tuple[int, StreamEvent | None]] = asyncio.Queue()

  def callback(self, index: int) -> Callable[[StreamEvent], None]:
    """The ``on_event`` for choice ``index``; runs on the engine thread, so it only hands off."""

    def on_event(event: StreamEvent) -> None:
      try:
        self._loop.call_soon_threadsafe(self._deliver, index, event)
      except RuntimeError:
        pass  # The loop is closed: the server is gone and nobody reads this request any more.

    return on_event

  def abort(self) -> None:
    """Ends the request's response now (the drain timeout expired); call it on the loop."""
    self.queue.put_nowait(ABORTED)

  def _deliver(self, index: int, event: StreamEvent) -> None:
    # Metrics are recorded here, on the loop, even when the client has gone
    # (a cancelled request's final event arrives after its handler returned).
    if event.finish_reason is not None:
      out = event.output
      self._metrics.finished(event.finish_reason.value, out.stats if out is not None else None)
    self.queue.put_nowait((index, event))


class Aborted(Exception):
  """The server ended the request before its answer was complete (drain timeout)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choices:
  """What was submitted for one HTTP request.

  Attributes:
    request_ids: the engine request of each choice, by choice index.
    n: choices per prompt (their prompt's tokens count once in the usage).
    echoes: text to put before each choice's answer (the prompt, with ``echo``), or None.
    echo_logprobs: the echoed prompt comes with its tokens' log-probabilities (``echo`` and
      ``logprobs``), which arrive with each choice's first event.
    continuous_usage: every chunk reports the usage so far (vLLM's ``continuous_usage_stats``).
  """

  request_ids: list[int]
  n: int = 1
  echoes: list[str] | None = None
  echo_logprobs: bool = False
  continuous_usage: bool = False

  def usage_so_far(self, usage: P.UsageInfo | None, event: StreamEvent, *, first: bool) -> P.UsageInfo | None:
    """Counts a choice's event into ``usage`` (its prompt's tokens with the ``first`` event of
    any of the prompt's choices, then its new tokens); a copy for the chunk, or None when the
    usage so far is not reported."""
    if usage is None:
      return None
    usage.add(event.prompt_tokens if first else 0, len(event.token_ids))
    return usage.model_copy()

  def add_usage(self, usage: P.UsageInfo, index: int, output: RequestOutput | None) -> None:
    if output is not None:
      usage.add(output.stats.prompt_tokens if index % self.n == 0 else 0, output.stats.output_tokens)


def bad_request(exc: RequestError, kind: type[P.SamplingRequest]) -> P.ProtocolError:
  """The 400 of a ``RequestError``, naming the field at fault (a chat's prompt is its ``messages``)."""
  param = "messages" if exc.param == "prompt" and kind is C.ChatCompletionRequest else exc.param
  return P.ProtocolError(exc.message, param=param)


def queue_full(detail: str = "", retry_after_s: int = 1) -> P.ProtocolError:
  """The 429 of a ``QueueFullError``, wherever the queue was found full."""
  return P.ProtocolError(
    f"server is at capacity, retry later ({detail})".replace(" ()", ""),
    status_code=429,
    error_type="rate_limit_error",
    headers={"Retry-After": str(retry_after_s)},
  )


def final_error(reasons: list[FinishReason | None], retry_later: bool = False) -> P.ProtocolError | None:
  """The error to report when a choice ended without an answer: the engine's queue was full
  (``retry_later``: 429), the engine failed (500) or the server is shutting down (503)."""
  if retry_later:
    return queue_full()
  if FinishReason.ERROR in reasons:
    return P.ProtocolError("the engine failed while generating", status_code=500, error_type="internal_error")
  if FinishReason.CANCELLED in reasons or None in reasons:
    return P.ProtocolError(
      "request cancelled: the server is shutting down", status_code=503, error_type="service_unavailable"
    )
  return None


async def collect(channel: Channel, n: int) -> list[RequestOutput]:
  """Every choice's output; raises ``Aborted`` if the server gives up first."""
  outputs: list[RequestOutput | None] = [None] * n
  pending = n
  while pending:
    index, event = await channel.queue.get()
    if event is None:
      raise Aborted()
    if event.finish_reason is not None:
      outputs[index] = event.output
      pending -= 1
  return outputs


Logprobs = list[TokenLogprobs] | None
# An echoed prompt's token ids and their log-probabilities (None for the first token), or None.
PromptLogprobs = tuple[list[int], list[TokenLogprobs | None]] | None


class Format:
  """How one API spells its responses; ``CompletionFormat`` and ``ChatFormat`` implement it.

  Args:
    decode: token ids -> text (spells the tokens of log-probabilities).
    include_usage: the stream ends with a usage chunk.
  """

  def __init__(
    self, *, response_id: str, created: int, model: str, include_usage: bool, decode: Callable[[list[int]], str]
  ):
    self.response_id, self.created, self.model = response_id, created, model
    self._decode = decode
    # With include_usage every chunk carries "usage": null (as OpenAI's do); without, no usage key.
    self._exclude = None if include_usage else {"usage"}

  def opening(self, index: int, echo: str | None, prompt: PromptLogprobs = None) -> str | None:
    """The event that opens choice ``index``'s stream, if any (with the echoed prompt's
    log-probabilities, ``prompt``)."""
    raise NotImplementedError

  def chunk(
    self,
    index: int,
    text: str,
    finish_reason: FinishReason | None,
    logprobs: Logprobs,
    usage: P.UsageInfo | None = None,
  ) -> str:
    """One choice's new text; ``usage``: the usage so far, for vLLM's ``continuous_usage_stats``."""
    raise NotImplementedError

  def usage_chunk(self, usage: P.UsageInfo) -> str:
    raise NotImplementedError

  def body(
    self,
    texts: list[str],
    reasons: list[str],
    usage: P.UsageInfo,
    logprobs: list[Logprobs],
    prompts: list[PromptLogprobs] | None = None,
  ) -> dict:
    raise NotImplementedError

  def _sse(self, payload) -> str:
    return P.sse(payload.model_dump_json(exclude=None if payload.usage is not None else self._exclude))

  def _token(self, token: int) -> str:
    return self._decode([token])


class CompletionFormat(Format):
  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._offsets: dict[int, int] = {}  # per choice: where the next token's text starts

  def opening(self, index: int, echo: str | None, prompt: PromptLogprobs = None) -> str | None:
    if not echo:
      return None
    choice = P.CompletionChoice(index=index, text=echo, logprobs=self._logprobs(index, None, prompt))
    return self._sse(
      P.CompletionResponse(id=self.response_id, created=self.created, model=self.model, choices=[choice])
    )

  def chunk(
    self,
    index: int,
    text: str,
    finish_reason: FinishReason | None,
    logprobs: Logprobs,
    usage: P.UsageInfo | None = None,
  ) -> str:
    choice = P.CompletionChoice(
      index=index,
      text=text,
      finish_reason=finish_reason and finish_reason.value,
      logprobs=self._logprobs(index, logprobs),
    )
    return self._sse(
      P.CompletionResponse(id=self.response_id, created=self.created, model=self.model, choices=[choice], usage=usage)
    )

  def _logprobs(self, index: int, entries: Logprobs, prompt: PromptLogprobs = None) -> P.CompletionLogprobs | None:
    """The legacy API's log-probabilities: the echoed prompt's tokens (``prompt``), then ``entries``."""
    if entries is None and prompt is None:
      return None
    out = P.CompletionLogprobs()
    offset = self._offsets.get(index, 0)
    scored = list(zip(*prompt)) if prompt is not None else []  # (token id, entry or None for the first)
    scored += [(entry.token, entry) for entry in entries or ()]
    for token_id, entry in scored:
      token = self._token(token_id)
      out.tokens.append(token)
      out.token_logprobs.append(None if entry is None else entry.logprob)
      out.top_logprobs.append(
        None if entry is None else {**{self._token(t): lp for t, lp in entry.top}, token: entry.logprob}
      )
      out.text_offset.append(offset)
      offset += len(token)
    self._offsets[index] = offset
    return out

  def usage_chunk(self, usage: P.UsageInfo) -> str:
    return P.sse(
      P.CompletionResponse(id=self.response_id, created=self.created, model=self.model, choices=[], usage=usage)
    )

  def body(
    self,
    texts: list[str],
    reasons: list[str],
    usage: P.UsageInfo,
    logprobs: list[Logprobs],
    prompts: list[PromptLogprobs] | None = None,
  ) -> dict:
    prompts = prompts or [None] * len(texts)
    choices = [
      P.CompletionChoice(index=i, text=t, finish_reason=r, logprobs=self._logprobs(i, lp, prompt))
      for i, (t, r, lp, prompt) in enumerate(zip(texts, reasons, logprobs, prompts))
    ]
    return P.CompletionResponse(
      id=self.response_id, created=self.created, model=self.model, choices=choices, usage=usage
    ).model_dump()


class ChatFormat(Format):
  def opening(self, index: int, echo: str | None, prompt: PromptLogprobs = None) -> str | None:
    return self._chunk(index, C.ChatDelta(role="assistant", content=""), None, None)

  def chunk(
    self,
    index: int,
    text: str,
    finish_reason: FinishReason | None,
    logprobs: Logprobs,
    usage: P.UsageInfo | None = None,
  ) -> str:
    return self._chunk(index, C.ChatDelta(content=text if text else None), finish_reason, logprobs, usage)

  def _chunk(
    self,
    index: int,
    delta: C.ChatDelta,
    finish_reason: FinishReason | None,
    logprobs: Logprobs,
    usage: P.UsageInfo | None = None,
  ) -> str:
    choice = C.ChatChunkChoice(
      index=index, delta=delta, finish_reason=finish_reason and finish_reason.value, logprobs=self._logprobs(logprobs)
    )
    return self._sse(
      C.ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model, choices=[choice], usage=usage)
    )

  def _logprobs(self, entries: Logprobs) -> C.ChatLogprobs | None:
    if entries is None:
      return None

    def top(token: int, logprob: float) -> dict:
      text = self._token(token)
      return dict(token=text, logprob=logprob, bytes=list(text.encode()))

    return C.ChatLogprobs(
      content=[
        C.ChatTokenLogprob(**top(e.token, e.logprob), top_logprobs=[C.ChatTopLogprob(**top(t, lp)) for t, lp in e.top])
        for e in entries
      ]
    )

  def usage_chunk(self, usage: P.UsageInfo) -> str:
    return P.sse(
      C.ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model, choices=[], usage=usage)
    )

  def body(
    self,
    texts: list[str],
    reasons: list[str],
    usage: P.UsageInfo,
    logprobs: list[Logprobs],
    prompts: list[PromptLogprobs] | None = None,
  ) -> dict:
    choices = [
      C.ChatChoice(index=i, message=C.ChatMessageOut(content=t), finish_reason=r, logprobs=self._logprobs(lp))
      for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))
    ]
    return C.ChatCompletionResponse(
      id=self.response_id, created=self.created, model=self.model, choices=choices, usage=usage
    ).model_dump()


def response_body(fmt: Format, choices: Choices, outputs: list[RequestOutput]) -> dict:
  usage = P.UsageInfo()
  for index, out in enumerate(outputs):
    choices.add_usage(usage, index, out)
  echoes = choices.echoes or [""] * len(outputs)
  return fmt.body(
    [echo + out.text for echo, out in zip(echoes, outputs)],
    [out.finish_reason.value for out in outputs],
    usage,
    [out.logprobs for out in outputs],
    [(out.prompt_token_ids, out.prompt_logprobs) for out in outputs] if choices.echo_logprobs else None,
  )


def error_event(err: P.ProtocolError) -> str:
  return P.sse(P.ErrorResponse(error=P.ErrorInfo(message=err.message, type=err.error_type)))
