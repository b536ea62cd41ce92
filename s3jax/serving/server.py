"""OpenAI-compatible HTTP server (FastAPI) in front of one ``LLM``.

Routes: ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text).

Threading model: the LLM's engine thread is the only thread that touches the
device; it batches every submitted request continuously. HTTP handlers run on
the asyncio event loop and never block it: they validate, call
``LLM.submit`` (thread-safe, non-blocking; raises at once when the waiting
queue is full) and then only read a per-request ``asyncio.Queue``. The engine
thread fills that queue through ``loop.call_soon_threadsafe`` from its
``on_event`` callback. Each queue holds at most one event per generated token
plus a final one, so it is bounded by the request's ``max_tokens``; the engine's
waiting queue is bounded by ``max_queue`` (full -> HTTP 429).

Lifecycle: the app's lifespan starts the LLM and shuts it down. On SIGTERM the
CLI calls ``begin_drain(app)``: new completions get 503 while uvicorn lets the
in-flight ones finish (up to its graceful timeout), then the lifespan shutdown
drains or cancels whatever is left in the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from s3jax.engine import FinishReason
from s3jax.serving import protocol as P
from s3jax.serving.backend import Backend
from s3jax.serving.llm import QueueFullError, RequestOutput, SamplingParams, StreamEvent
from s3jax.serving.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger(__name__)

# Fields of SamplingParams / prompt problems the engine reports in ValueError messages.
_ENGINE_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
                  "replay_output_len")
_ROUTES = ("/v1/completions", "/v1/models", "/health", "/metrics")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  """Settings of the HTTP layer (the engine's own live in ``LLM``).

  Attributes:
    served_model_name: the model id clients must send (and /v1/models lists);
      None uses the LLM's model name.
    retry_after_s: the ``Retry-After`` header on 429 answers (queue full).
    drain_timeout_s: at shutdown, how long in-flight requests may run before
      they are cancelled.
    trace_replay: accept the ``replay_output_len`` extension (load tests that
      replay a trace through random weights); off, a request carrying it gets 400.
  """

  served_model_name: str | None = None
  retry_after_s: int = 1
  drain_timeout_s: float = 30.0
  trace_replay: bool = False


@dataclasses.dataclass
class _State:
  llm: Backend
  config: ServerConfig
  model_name: str
  metrics: ServerMetrics
  # One worker: submissions keep their arrival order, and the length predictor
  # (which ``submit`` runs) never runs twice at once or on the event loop.
  submitter: concurrent.futures.ThreadPoolExecutor
  draining: bool = False


def _retrain_stats(backend: Backend):
  retrainer = getattr(backend, "retrainer", None)
  return None if retrainer is None else retrainer.stats


def _server_info(backend: Backend, config: ServerConfig) -> dict[str, str]:
  info = {"model": config.served_model_name or backend.model_name, "policy": backend.policy.value,
          "memory_budget": f"{backend.memory_budget_bytes / 2**20:g}MiB", "max_model_len": str(backend.max_model_len)}
  predictor = getattr(backend, "predictor", None)
  if hasattr(predictor, "generator"):
    info.update(predictor_head=predictor.generator, max_under_rate=f"{predictor.max_under_rate:g}",
                reservation_rule=predictor.rule.value,
                online_retraining=str(getattr(backend, "retrainer", None) is not None).lower())
  return info


def _error(err: P.ProtocolError) -> JSONResponse:
  body = P.ErrorResponse(error=P.ErrorInfo(message=err.message, type=err.error_type, param=err.param,
                                           code=None))
  return JSONResponse(body.model_dump(), status_code=err.status_code, headers=err.headers)


def _engine_value_error(exc: ValueError) -> P.ProtocolError:
  """A 400 for a ValueError from ``LLM.submit``, naming the field it is about."""
  message = str(exc)
  param = next((f for f in _ENGINE_FIELDS if message.startswith(f)), None)
  if param is None and ("prompt" in message or "context" in message or "token" in message):
    param = "prompt"
  return P.ProtocolError(message, param=param)


def _unavailable(message: str = "server is shutting down") -> P.ProtocolError:
  return P.ProtocolError(message, status_code=503, error_type="service_unavailable")


class _Channel:
  """Per-HTTP-request bridge from the engine thread to the event loop.

  One queue for all prompts of the request: items are ``(choice index, event)``.
  """

  def __init__(self, loop: asyncio.AbstractEventLoop, metrics: ServerMetrics):
    self._loop = loop
    self._metrics = metrics
    self.queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()

  def callback(self, index: int) -> Callable[[StreamEvent], None]:
    """The ``on_event`` for choice ``index``; runs on the engine thread, so it only hands off."""
    def on_event(event: StreamEvent) -> None:
      try:
        self._loop.call_soon_threadsafe(self._deliver, index, event)
      except RuntimeError:
        pass  # The loop is closed: the server is gone and nobody reads this request any more.
    return on_event

  def _deliver(self, index: int, event: StreamEvent) -> None:
    # Metrics are recorded here, on the loop, even when the client has gone
    # (a cancelled request's final event arrives after its handler returned).
    if event.finish_reason is not None:
      out = event.output
      self._metrics.finished(event.finish_reason.value, out.stats if out is not None else None)
    self.queue.put_nowait((index, event))


async def _wait_for_disconnect(request: Request) -> None:
  while (await request.receive())["type"] != "http.disconnect":
    pass


class _HttpMetricsMiddleware:
  """Counts responses by route and status code (pure ASGI: safe around streaming bodies)."""

  def __init__(self, app: ASGIApp, metrics: Callable[[], ServerMetrics]):
    self.app = app
    self._metrics = metrics

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    route = scope["path"] if scope["path"] in _ROUTES else "other"

    async def send_and_count(message: Message) -> None:
      if message["type"] == "http.response.start":
        self._metrics().http_response(route, message["status"])
      await send(message)

    await self.app(scope, receive, send_and_count)


def begin_drain(app: FastAPI) -> None:
  """Refuse new completions with 503 from now on (called on SIGTERM)."""
  app.state.s3.draining = True


def build_app(llm: Backend, config: ServerConfig = ServerConfig()) -> FastAPI:
  """The ASGI app serving ``llm``; the app's lifespan starts and shuts down ``llm``."""
  state = _State(llm=llm, config=config, model_name=config.served_model_name or llm.model_name,
                 metrics=ServerMetrics(llm.metrics, _server_info(llm, config),
                                       retrain_stats=_retrain_stats(llm)),
                 submitter=concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="s3jax-submit"))

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    llm.start()
    try:
      yield
    finally:
      state.draining = True
      state.submitter.shutdown(wait=True)
      # shutdown() joins the engine thread: off the loop, so late events still arrive.
      await run_in_threadpool(llm.shutdown, config.drain_timeout_s)

  app = FastAPI(title="s3jax", lifespan=lifespan)
  app.state.s3 = state
  app.add_middleware(_HttpMetricsMiddleware, metrics=lambda: state.metrics)

  @app.exception_handler(RequestValidationError)
  async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    state.metrics.rejected("invalid")
    return _error(P.error_from_validation(list(exc.errors())))

  @app.exception_handler(P.ProtocolError)
  async def on_protocol_error(_: Request, exc: P.ProtocolError) -> JSONResponse:
    return _error(exc)

  @app.exception_handler(StarletteHTTPException)
  async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(P.ProtocolError(str(exc.detail), status_code=exc.status_code, error_type=kind,
                                  headers=exc.headers))

  @app.exception_handler(Exception)
  async def on_internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error")
    return _error(P.ProtocolError(f"internal error: {exc}", status_code=500, error_type="internal_error"))

  @app.get("/health")
  async def health() -> JSONResponse:
    alive = llm.is_alive()
    if state.draining or not alive:
      return JSONResponse({"status": "draining" if state.draining else "engine stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})

  @app.get("/v1/models")
  async def models() -> P.ModelList:
    return P.ModelList(data=[P.ModelCard(id=state.model_name, max_model_len=llm.max_model_len)])

  @app.get("/metrics")
  def metrics() -> Response:
    # A plain def: FastAPI runs it in a worker thread, so the engine snapshot never blocks the loop.
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)

  @app.post("/v1/completions", response_model=None)
  async def completions(request: Request) -> Response:
    # Parsed here rather than by FastAPI so that any content type carrying JSON is accepted
    # (curl -d sends form-encoded) and every failure becomes one OpenAI-style error.
    try:
      body = P.CompletionRequest.model_validate_json(await request.body())
    except ValidationError as exc:
      state.metrics.rejected("invalid")
      raise P.error_from_validation(exc.errors()) from exc
    if state.draining:
      state.metrics.rejected("unavailable")
      raise _unavailable()
    params = _sampling_params(body, state)
    channel = _Channel(asyncio.get_running_loop(), state.metrics)
    request_ids = await _submit_off_loop(body.prompts, params, channel, state)
    response_id, created = P.completion_id(), int(time.time())
    if body.stream:
      return StreamingResponse(
          _stream(channel, request_ids, body, response_id, created, state),
          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _complete(request, channel, request_ids, response_id, created, state)

  return app


def _sampling_params(body: P.CompletionRequest, state: _State) -> SamplingParams:
  """Checks against the served model, then the engine's own ``SamplingParams`` checks."""
  if body.model is not None and body.model != state.model_name:
    state.metrics.rejected("invalid")
    raise P.ProtocolError(f"model '{body.model}' does not exist; this server serves '{state.model_name}'",
                          param="model", error_type="invalid_request_error")
  if body.replay_output_len is not None and not state.config.trace_replay:
    state.metrics.rejected("invalid")
    raise P.ProtocolError("replay_output_len is a load-test extension; start the server with --trace-replay to "
                          "accept it", param="replay_output_len")
  limit = state.llm.max_model_len
  if body.max_tokens is not None and body.max_tokens >= limit:
    state.metrics.rejected("invalid")
    raise P.ProtocolError(f"max_tokens must be less than the model's context length {limit} (the prompt "
                          f"needs at least one token), got {body.max_tokens}", param="max_tokens")
  try:
    params = SamplingParams(**body.sampling_kwargs())
    params.validate(limit)
  except ValueError as exc:
    state.metrics.rejected("invalid")
    raise _engine_value_error(exc) from exc
  return params


async def _submit_off_loop(prompts: list[str | list[int]], params: SamplingParams, channel: _Channel,
                           state: _State) -> list[int]:
  """``_submit_all`` on the submit thread: tokenizing and predicting lengths never stall the loop."""
  future = asyncio.get_running_loop().run_in_executor(state.submitter, _submit_all, prompts, params, channel,
                                                      state)
  try:
    return await asyncio.shield(future)
  except asyncio.CancelledError:
    # The handler was cancelled (graceful-shutdown timeout) mid-submit: cancel what got submitted.
    future.add_done_callback(lambda f: f.cancelled() or f.exception() or _cancel(state.llm, f.result()))
    raise


def _submit_all(prompts: list[str | list[int]], params: SamplingParams, channel: _Channel,
                state: _State) -> list[int]:
  """Submits every prompt; on any refusal cancels those already submitted and raises."""
  request_ids: list[int] = []
  try:
    for index, prompt in enumerate(prompts):
      # Counted before submit: the engine may finish the request before submit returns.
      state.metrics.submitted()
      try:
        request_ids.append(state.llm.submit(prompt, params, channel.callback(index)))
      except BaseException:
        state.metrics.unsubmitted()
        raise
  except QueueFullError as exc:
    state.metrics.rejected("queue_full")
    _cancel(state.llm, request_ids)
    raise P.ProtocolError(f"server is at capacity, retry later ({exc})".replace(" ()", ""),
                          status_code=429, error_type="rate_limit_error",
                          headers={"Retry-After": str(state.config.retry_after_s)}) from exc
  except ValueError as exc:
    state.metrics.rejected("invalid")
    _cancel(state.llm, request_ids)
    raise _engine_value_error(exc) from exc
  except RuntimeError as exc:  # LLM.shutdown() has begun.
    state.metrics.rejected("unavailable")
    _cancel(state.llm, request_ids)
    raise _unavailable() from exc
  return request_ids


def _cancel(llm: Backend, request_ids: list[int]) -> None:
  for request_id in request_ids:
    llm.cancel(request_id)


def _final_error(reasons: list[FinishReason | None]) -> P.ProtocolError | None:
  """The error to report when a choice ended without an answer (engine error or shutdown)."""
  if FinishReason.ERROR in reasons:
    return P.ProtocolError("the engine failed while generating", status_code=500, error_type="internal_error")
  if FinishReason.CANCELLED in reasons:
    return _unavailable("request cancelled: the server is shutting down")
  return None


async def _complete(request: Request, channel: _Channel, request_ids: list[int], response_id: str,
                    created: int, state: _State) -> JSONResponse:
  """Waits for every choice, or for the client to leave (which cancels them)."""
  collect = asyncio.ensure_future(_collect(channel, len(request_ids)))
  gone = asyncio.ensure_future(_wait_for_disconnect(request))
  try:
    await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    gone.cancel()
    if not collect.done():
      collect.cancel()
      _cancel(state.llm, request_ids)
  if not collect.done() or collect.cancelled():
    return JSONResponse({}, status_code=499)  # Nobody is listening; the status is for the logs.
  outputs = collect.result()
  err = _final_error([out.finish_reason for out in outputs])
  if err is not None:
    return _error(err)
  usage = P.UsageInfo()
  for out in outputs:
    usage.add(out.stats.prompt_tokens, out.stats.output_tokens)
  choices = [P.CompletionChoice(index=i, text=out.text, finish_reason=out.finish_reason.value)
             for i, out in enumerate(outputs)]
  body = P.CompletionResponse(id=response_id, created=created, model=state.model_name, choices=choices,
                              usage=usage)
  return JSONResponse(body.model_dump())


async def _collect(channel: _Channel, n: int) -> list[RequestOutput]:
  outputs: list[RequestOutput | None] = [None] * n
  pending = n
  while pending:
    index, event = await channel.queue.get()
    if event.finish_reason is not None:
      outputs[index] = event.output
      pending -= 1
  return outputs


async def _stream(channel: _Channel, request_ids: list[int], body: P.CompletionRequest, response_id: str,
                  created: int, state: _State) -> AsyncIterator[str]:
  """Server-sent events: one chunk per new text, a usage chunk if asked, then ``[DONE]``.

  If the client disconnects, Starlette cancels this generator; ``finally`` then
  cancels the requests still running so their slots and KV reservations free up.
  """
  usage = P.UsageInfo()
  done = [False] * len(request_ids)
  reasons: list[FinishReason | None] = [None] * len(request_ids)
  # With include_usage every chunk carries "usage": null (as OpenAI's do); without, no usage key.
  exclude = None if body.include_usage else {"usage"}

  def chunk(index: int, text: str, finish_reason: FinishReason | None) -> str:
    choice = P.CompletionChoice(index=index, text=text, finish_reason=finish_reason and finish_reason.value)
    resp = P.CompletionResponse(id=response_id, created=created, model=state.model_name, choices=[choice])
    return P.sse(resp.model_dump_json(exclude=exclude))

  try:
    while not all(done):
      index, event = await channel.queue.get()
      reason = event.finish_reason
      if reason in (FinishReason.ERROR, FinishReason.CANCELLED):
        done[index], reasons[index] = True, reason
        break
      if event.text or reason is not None:
        yield chunk(index, event.text, reason)
      if reason is not None:
        done[index], reasons[index] = True, reason
        stats = event.output.stats if event.output is not None else None
        if stats is not None:
          usage.add(stats.prompt_tokens, stats.output_tokens)
    err = _final_error(reasons)
    if err is not None:
      yield P.sse(P.ErrorResponse(error=P.ErrorInfo(message=err.message, type=err.error_type)))
    elif body.include_usage:
      final = P.CompletionResponse(id=response_id, created=created, model=state.model_name, choices=[],
                                   usage=usage)
      yield P.sse(final)
    yield P.SSE_DONE
  finally:
    _cancel(state.llm, [rid for rid, d in zip(request_ids, done) if not d])
