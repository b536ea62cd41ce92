"""OpenAI-compatible HTTP server (FastAPI) in front of one ``LLM``.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON or server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Threading model: the LLM's engine thread owns the engine and batches every submitted request
continuously (an online retrainer trains the predictor on the device from its own thread). HTTP
handlers run on the asyncio event loop and never block it. The request guard (``guard.py``)
first reads each body within its size and time limits.
Parsing, validation, chat-template rendering and tokenization then run in a pool of
``submit_workers`` threads, which end in ``LLM.submit`` (thread-safe, non-blocking; raises at once
when the waiting queue is full): one client's long prompt or large batch takes one worker, never
the path every other request shares. A prompt too long to fit is refused from its length in
characters, before it is tokenized. The pool is bounded by its workers, and what waits for it by
uvicorn's connection limit. Handlers then only read a per-request ``asyncio.Queue`` (a
``responses.Channel``), which the LLM's output thread fills through ``loop.call_soon_threadsafe``.
The engine's waiting queue is bounded by ``max_queue``: full -> HTTP 429, wherever it is found.
Errors map to HTTP by type: ``RequestError`` -> 400 with its ``param``, ``QueueFullError`` -> 429.

Lifecycle: the app's lifespan starts the LLM and shuts it down. On SIGTERM the CLI calls
``drain(app, timeout)``: new requests get 503 while the listening socket stays open, in-flight
ones may finish until the timeout, then every open stream gets an error event and ``[DONE]`` and
every waiting request a 503; only then does uvicorn close its sockets and the lifespan shut the
engine down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from pydantic import ValidationError

from s3jax.extras import missing_extra

try:
  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.middleware.cors import CORSMiddleware
  from fastapi.responses import JSONResponse, Response, StreamingResponse
  from starlette.concurrency import run_in_threadpool
  from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as e:
  raise missing_extra(e, "serve", "the s3jax server") from e

from s3jax.engine import FinishReason
from s3jax.errors import QueueFullError, RequestError
from s3jax.serving import chat as C
from s3jax.serving import protocol as P
from s3jax.serving import responses as R
from s3jax.serving.backend import Backend
from s3jax.serving.guard import CLIENT_CLOSED, GuardConfig, RequestGuard
from s3jax.serving.inputs import SamplingParams
from s3jax.serving.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger(__name__)

_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# After the drain timeout, how long aborted responses get to write their last events.
_ABORT_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  """Settings of the HTTP layer (the engine's own live in ``LLM``).

  Attributes:
    served_model_name: the model id clients must send (and /v1/models lists);
      None uses the LLM's model name.
    retry_after_s: the ``Retry-After`` header on 429 answers (queue full).
    drain_timeout_s: at shutdown, how long in-flight requests may run before
      they are ended (streams with an error event).
    trace_replay: accept the ``replay_output_len`` extension (load tests that
      replay a trace through random weights); off, a request carrying it gets 400.
    api_key: when set, ``/v1/`` routes need ``Authorization: Bearer <api_key>``.
    allowed_origins: browser origins allowed by CORS (``["*"]`` for any); empty: no CORS headers.
    max_body_bytes: the largest request body (413 beyond it).
    body_timeout_s: how long a client may take to send its body (408 after it).
    max_prompts_per_request: most choices (prompts x ``n``) in one request (400 beyond it).
    submit_workers: threads that parse, validate and tokenize requests.
    chat_template: a Jinja chat template replacing the tokenizer's (see ``chat.py``); None: the
      tokenizer's own, else ``chat.DEFAULT_CHAT_TEMPLATE``.
  """

  served_model_name: str | None = None
  retry_after_s: int = 1
  drain_timeout_s: float = 30.0
  trace_replay: bool = False
  api_key: str | None = None
  allowed_origins: tuple[str, ...] = ()
  max_body_bytes: int = 4 * 2**20
  body_timeout_s: float = 30.0
  max_prompts_per_request: int = 256
  submit_workers: int = 4
  chat_template: str | None = None


@dataclasses.dataclass
class _State:
  llm: Backend
  config: ServerConfig
  model_name: str
  metrics: ServerMetrics
  workers: concurrent.futures.ThreadPoolExecutor
  channels: set[R.Channel] = dataclasses.field(default_factory=set)  # requests in flight, for the drain
  draining: bool = False


def _server_info(backend: Backend, config: ServerConfig) -> dict[str, str]:
  info = {
    "model": config.served_model_name or backend.model_name,
    "policy": backend.policy.value,
    "memory_budget": f"{backend.memory_budget_bytes / 2**20:g}MiB",
    "max_model_len": str(backend.max_model_len),
    "mesh": str(backend.mesh_shape),
  }
  from s3jax.predictor import LengthPredictor  # Deferred: Orbax's import configures logging (absl).
  from s3jax.predictor.self_head import SelfLengthPredictor

  predictor = backend.predictor
  if isinstance(predictor, SelfLengthPredictor):
    info.update(
      predictor_head=f"self, block {predictor.config.layer}",
      max_under_rate=f"{predictor.max_under_rate:g}",
      reservation_rule=predictor.rule.value,
      online_retraining=str(backend.retrainer is not None).lower(),
    )
  elif isinstance(predictor, LengthPredictor):  # a fixed-bucket or user's predictor has no head or target
    info.update(
      predictor_head=predictor.generator,
      max_under_rate=f"{predictor.max_under_rate:g}",
      reservation_rule=predictor.rule.value,
      online_retraining=str(backend.retrainer is not None).lower(),
    )
  return info


def _error(err: P.ProtocolError) -> JSONResponse:
  body = P.ErrorResponse(error=P.ErrorInfo(message=err.message, type=err.error_type, param=err.param, code=err.code))
  return JSONResponse(body.model_dump(), status_code=err.status_code, headers=err.headers)


def _unavailable(message: str = "server is shutting down") -> P.ProtocolError:
  return P.ProtocolError(message, status_code=503, error_type="service_unavailable")


async def _wait_for_disconnect(request: Request) -> None:
  while (await request.receive())["type"] != "http.disconnect":
    pass


def begin_drain(app: FastAPI) -> None:
  """Refuse new requests with 503 from now on (called on SIGTERM)."""
  app.state.s3.draining = True


async def drain(app: FastAPI, timeout_s: float) -> None:
  """Refuses new requests, lets in-flight ones run up to ``timeout_s``, then ends the rest: each
  open stream gets an error event then ``[DONE]``, each waiting request a 503. Returns when they
  have been written (or after a few more seconds)."""
  state: _State = app.state.s3
  begin_drain(app)
  loop = asyncio.get_running_loop()
  deadline = loop.time() + timeout_s
  while state.channels and loop.time() < deadline:
    await asyncio.sleep(0.05)
  if state.channels:
    logger.warning("drain timeout (%g s): ending %d request(s) still in flight", timeout_s, len(state.channels))
  for channel in list(state.channels):
    channel.abort()
  deadline = loop.time() + _ABORT_GRACE_S
  while state.channels and loop.time() < deadline:
    await asyncio.sleep(0.02)


def build_app(llm: Backend, config: ServerConfig = ServerConfig()) -> FastAPI:
  """The ASGI app serving ``llm``; the app's lifespan starts and shuts down ``llm``."""
  state = _State(
    llm=llm,
    config=config,
    model_name=config.served_model_name or llm.model_name,
    metrics=ServerMetrics(
      llm.metrics,
      _server_info(llm, config),
      retrain_stats=None if llm.retrainer is None else llm.retrainer.stats,
      adapter=llm.adapter,
    ),
    workers=concurrent.futures.ThreadPoolExecutor(config.submit_workers, thread_name_prefix="s3jax-submit"),
  )

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    llm.start()
    try:
      yield
    finally:
      state.draining = True
      state.workers.shutdown(wait=True)
      # shutdown() joins the engine thread: off the loop, so late events still arrive.
      await run_in_threadpool(llm.shutdown, config.drain_timeout_s)

  app = FastAPI(title="s3jax", lifespan=lifespan)
  app.state.s3 = state
  guard = GuardConfig(
    max_body_bytes=config.max_body_bytes, body_timeout_s=config.body_timeout_s, api_key=config.api_key
  )
  app.add_middleware(
    RequestGuard,
    config=guard,
    on_response=lambda route, status: state.metrics.http_response(route, status),
    routes=_ROUTES,
  )
  if config.allowed_origins:  # outermost: a browser's preflight carries no API key
    app.add_middleware(
      CORSMiddleware,
      allow_origins=list(config.allowed_origins),
      allow_methods=["GET", "POST"],
      allow_headers=["*"],
      expose_headers=["X-Request-Id"],
    )

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
    return _error(P.ProtocolError(str(exc.detail), status_code=exc.status_code, error_type=kind, headers=exc.headers))

  @app.exception_handler(Exception)
  async def on_internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error (request_id=%s)", request.scope.get("state", {}).get("request_id"))
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
    return await _generate(request, state, P.CompletionRequest)

  @app.post("/v1/chat/completions", response_model=None)
  async def chat_completions(request: Request) -> Response:
    return await _generate(request, state, C.ChatCompletionRequest)

  return app


async def _generate(request: Request, state: _State, kind: type[P.SamplingRequest]) -> Response:
  """Parses, submits (in a worker) and answers one request of either API."""
  if state.draining:
    state.metrics.rejected("unavailable")
    raise _unavailable()
  # The body was read by the guard; any content type carrying JSON is accepted (curl -d sends form-encoded).
  raw = await request.body()
  channel = R.Channel(asyncio.get_running_loop(), state.metrics)
  state.channels.add(channel)
  streaming = False
  try:
    body, choices = await _in_worker(state, _parse_and_submit, raw, kind, channel, state)
    chat = isinstance(body, C.ChatCompletionRequest)
    fmt_type = R.ChatFormat if chat else R.CompletionFormat
    fmt = fmt_type(
      response_id=C.chat_completion_id() if chat else P.completion_id(),
      created=int(time.time()),
      model=state.model_name,
      include_usage=body.include_usage,
      decode=state.llm.decode,
    )
    if body.stream:
      streaming = True
      return StreamingResponse(
        _stream(channel, choices, fmt, body.include_usage, state),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
      )
    return await _complete(request, channel, choices, fmt, state)
  finally:
    if not streaming:
      state.channels.discard(channel)


async def _in_worker(state: _State, fn: Callable, *args):
  """``fn(*args)`` on a submit worker. If the handler is cancelled meanwhile (the graceful-shutdown
  timeout), whatever ``fn`` submitted is cancelled when it returns."""
  future = asyncio.get_running_loop().run_in_executor(state.workers, fn, *args)
  try:
    return await asyncio.shield(future)
  except asyncio.CancelledError:
    future.add_done_callback(lambda f: f.cancelled() or f.exception() or _cancel(state.llm, f.result()[1].request_ids))
    raise


def _parse(raw: bytes, kind: type[P.SamplingRequest]) -> P.SamplingRequest:
  try:
    return kind.model_validate_json(raw)
  except ValidationError as exc:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
      surrogate = P.surrogate_error(raw)
      if surrogate is not None:
        raise surrogate from None
    raise P.error_from_validation(errors) from None


def _parse_and_submit(
  raw: bytes, kind: type[P.SamplingRequest], channel: R.Channel, state: _State
) -> tuple[P.SamplingRequest, R.Choices]:
  """On a submit worker: parses and checks the body, renders and tokenizes, submits every choice."""
  try:
    body = _parse(raw, kind)
    params = _sampling_params(body, state)
    if isinstance(body, C.ChatCompletionRequest):
      prompts = [state.llm.chat_prompt_ids(body.template_messages(), state.config.chat_template)]
    else:
      prompts = body.prompts
    limit = state.config.max_prompts_per_request
    if len(prompts) * body.n > limit:
      raise P.ProtocolError(
        f"prompt: {len(prompts)} prompt(s) x n={body.n} make {len(prompts) * body.n} choices; "
        f"this server takes at most {limit} per request (--max-prompts-per-request): split "
        "the batch",
        param="prompt",
      )
  except P.ProtocolError as err:
    state.metrics.rejected("invalid" if err.status_code in (400, 404) else "unavailable")
    raise
  except RequestError as exc:  # the chat template failed, or a prompt is too long
    state.metrics.rejected("invalid")
    raise R.bad_request(exc, kind) from exc
  echoes = None
  if isinstance(body, P.CompletionRequest) and body.echo:
    texts = [p if isinstance(p, str) else state.llm.decode(p) for p in prompts]
    echoes = [text for text in texts for _ in range(body.n)]
  request_ids = _submit_all(prompts, params, body.n, channel, state, kind)
  return body, R.Choices(
    request_ids=request_ids,
    n=body.n,
    echoes=echoes,
    echo_logprobs=echoes is not None and body.prompt_logprobs_wanted is not None,
    continuous_usage=body.continuous_usage,
  )


def _sampling_params(body: P.SamplingRequest, state: _State) -> SamplingParams:
  """Checks against the served model, then the engine's own ``SamplingParams`` checks."""
  if body.model is not None and body.model != state.model_name:
    raise P.ProtocolError(
      f"the model '{body.model}' does not exist; this server serves '{state.model_name}' (GET /v1/models lists it)",
      param="model",
      status_code=404,
      code="model_not_found",
    )
  if body.replay_output_len is not None and not state.config.trace_replay:
    raise P.ProtocolError(
      "replay_output_len is a load-test extension; start the server with --trace-replay to accept it",
      param="replay_output_len",
    )
  try:
    params = SamplingParams(**body.sampling_kwargs())
    params.validate(state.llm.max_model_len)
  except RequestError as exc:
    raise R.bad_request(exc, type(body)) from exc
  return params


def _submit_all(
  prompts: list[str | list[int]],
  params: SamplingParams,
  n: int,
  channel: R.Channel,
  state: _State,
  kind: type[P.SamplingRequest],
) -> list[int]:
  """Submits ``n`` choices of every prompt (choice j with seed + j); on any refusal cancels those
  already submitted and raises."""
  request_ids: list[int] = []
  try:
    for index in range(len(prompts) * n):
      prompt, j = prompts[index // n], index % n
      choice_params = (
        params if j == 0 or params.seed is None else dataclasses.replace(params, seed=(params.seed + j) % 2**32)
      )
      # Counted before submit: the engine may finish the request before submit returns.
      state.metrics.submitted()
      try:
        request_ids.append(state.llm.submit(prompt, choice_params, channel.callback(index)))
      except BaseException:
        state.metrics.unsubmitted()
        raise
  except QueueFullError as exc:
    state.metrics.rejected("queue_full")
    _cancel(state.llm, request_ids)
    raise R.queue_full(str(exc), state.config.retry_after_s) from exc
  except RequestError as exc:
    state.metrics.rejected("invalid")
    _cancel(state.llm, request_ids)
    raise R.bad_request(exc, kind) from exc
  except RuntimeError as exc:  # LLM.shutdown() has begun.
    state.metrics.rejected("unavailable")
    _cancel(state.llm, request_ids)
    raise _unavailable() from exc
  return request_ids


def _cancel(llm: Backend, request_ids: list[int]) -> None:
  for request_id in request_ids:
    llm.cancel(request_id)


async def _complete(
  request: Request, channel: R.Channel, choices: R.Choices, fmt: R.Format, state: _State
) -> JSONResponse:
  """Waits for every choice, or for the client to leave (which cancels them)."""
  collect = asyncio.ensure_future(R.collect(channel, len(choices.request_ids)))
  gone = asyncio.ensure_future(_wait_for_disconnect(request))
  try:
    await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    gone.cancel()
    if not collect.done():
      collect.cancel()
    if not collect.done() or collect.cancelled() or collect.exception() is not None:
      _cancel(state.llm, choices.request_ids)
  if collect.cancelled():
    return JSONResponse({}, status_code=CLIENT_CLOSED)  # Nobody is listening; the status is for the logs.
  if isinstance(collect.exception(), R.Aborted):
    return _error(_unavailable("request ended: the server is shutting down and its drain timeout expired"))
  outputs = collect.result()
  err = R.final_error([out.finish_reason for out in outputs], any(out.retry_later for out in outputs))
  if err is not None:
    return _error(err)
  return JSONResponse(R.response_body(fmt, choices, outputs))


async def _stream(
  channel: R.Channel, choices: R.Choices, fmt: R.Format, include_usage: bool, state: _State
) -> AsyncIterator[str]:
  """Server-sent events: each choice's opening event, one chunk per new text (carrying the usage so
  far under vLLM's ``continuous_usage_stats``), a usage chunk if asked, then ``[DONE]``; an error
  event before ``[DONE]`` when the answer could not be finished.

  If the client disconnects, Starlette cancels this generator; ``finally`` then
  cancels the requests still running so their slots and KV reservations free up.
  """
  request_ids = choices.request_ids
  usage = P.UsageInfo()
  running_usage = P.UsageInfo() if choices.continuous_usage else None  # the usage so far, in every chunk
  prompt_counted = [False] * (len(request_ids) // choices.n)
  done = [False] * len(request_ids)
  reasons: list[FinishReason | None] = [None] * len(request_ids)
  retry_later = False
  echo = (lambda index: choices.echoes[index]) if choices.echoes else (lambda index: None)
  try:
    if not choices.echo_logprobs:  # else each choice opens with its first event, which brings the prompt's scores
      for index in range(len(request_ids)):
        opening = fmt.opening(index, echo(index))
        if opening is not None:
          yield opening
    opened = [not choices.echo_logprobs] * len(request_ids)
    while not all(done):
      index, event = await channel.queue.get()
      if event is None:  # the drain timeout expired
        break
      reason = event.finish_reason
      if not opened[index] and event.prompt_logprobs is not None:
        opened[index] = True
        yield fmt.opening(index, echo(index), (event.prompt_token_ids, event.prompt_logprobs))
      if reason in (FinishReason.ERROR, FinishReason.CANCELLED):
        done[index], reasons[index] = True, reason
        retry_later = event.output is not None and event.output.retry_later
        break
      prompt = index // choices.n
      so_far = choices.usage_so_far(running_usage, event, first=not prompt_counted[prompt])
      prompt_counted[prompt] = True
      if event.text or reason is not None or event.logprobs:  # tokens whose text is held back keep their logprobs
        yield fmt.chunk(index, event.text, reason, event.logprobs, usage=so_far)
      if reason is not None:
        done[index], reasons[index] = True, reason
        choices.add_usage(usage, index, event.output)
    err = R.final_error(reasons, retry_later)
    if err is not None:
      yield R.error_event(err)
    elif include_usage:
      yield fmt.usage_chunk(usage)
    yield P.SSE_DONE
  finally:
    state.channels.discard(channel)
    _cancel(state.llm, [rid for rid, d in zip(request_ids, done) if not d])
