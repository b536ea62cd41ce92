"""The ASGI layer in front of every route: request ids, one log line per request, HTTP metrics,
the API key, and a bounded, timed read of the request body.

It runs before any handler, so no client can make a handler wait for its body or hold its
memory: a body over ``max_body_bytes`` gets 413 as soon as its ``Content-Length`` (or its
running total, when chunked) says so; a body still unfinished after ``body_timeout_s`` gets 408;
a client that hangs up mid-upload is logged as one INFO line with status 499. Handlers then read
the whole body at once (``await request.body()``) and later ``receive`` calls reach the client
(to see it leave).

Every request gets an id: the client's ``X-Request-Id`` when it is a short printable string, else
a fresh one. It comes back in the response's ``X-Request-Id`` header, is in the request's log line
and in ``scope["state"]["request_id"]`` for handlers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable

from s3jax.extras import missing_extra

try:
  from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ModuleNotFoundError as e:
  raise missing_extra(e, "serve", "the s3jax server") from e

logger = logging.getLogger("s3jax.serving.access")

# The status nginx made the convention for "the client closed the connection first".
CLIENT_CLOSED = 499
_MAX_REQUEST_ID = 128
_QUIET_PATHS = ("/health", "/metrics")
# A client that sends a body too large writes it all before it reads the answer: closing the
# connection on it makes it see a reset instead of the 413. So the rest of a body up to twice the
# limit is read and dropped (never kept), within the body timeout, before the 413 is sent; after a
# larger one the 413 is sent at once and the connection closed (reading it would cost the event loop
# more than the client's error message is worth: such a client may see only the reset).
_DISCARD_FACTOR = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class GuardConfig:
  """Limits applied to every request before a handler runs.

  Attributes:
    max_body_bytes: the largest request body accepted (413 beyond it).
    body_timeout_s: how long a client may take to send its whole body (408 after it).
    api_key: when set, routes under ``/v1/`` need ``Authorization: Bearer <api_key>`` (401).
  """

  max_body_bytes: int = 4 * 2**20
  body_timeout_s: float = 30.0
  api_key: str | None = None


class _Refusal(Exception):
  def __init__(self, status: int, message: str, error_type: str, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.error_type, self.code = status, message, error_type, code


class _ClientGone(Exception):
  pass


def _header(scope: Scope, name: bytes) -> str | None:
  for key, value in scope.get("headers", ()):
    if key == name:
      return value.decode("latin-1")
  return None


def _request_id(scope: Scope) -> str:
  given = _header(scope, b"x-request-id")
  if given and len(given) <= _MAX_REQUEST_ID and given.isprintable() and given.isascii():
    return given
  return uuid.uuid4().hex


class RequestGuard:
  """Pure ASGI middleware (safe around streaming bodies); see the module docstring.

  Args:
    app: the wrapped application.
    config: the limits.
    on_response: called with (route label, status) once per request, 499 included (metrics).
    routes: paths counted under their own label; others count as "other".
  """

  def __init__(
    self, app: ASGIApp, config: GuardConfig, on_response: Callable[[str, int], None], routes: tuple[str, ...]
  ):
    self.app = app
    self.config = config
    self._on_response = on_response
    self._routes = routes

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    start = time.perf_counter()
    request_id = _request_id(scope)
    scope.setdefault("state", {})["request_id"] = request_id
    status: list[int] = []  # the status sent, if any
    finished = False  # the last body message went out
    gone = False  # the client hung up

    async def send_with_id(message: Message) -> None:
      nonlocal finished
      if message["type"] == "http.response.start":
        status.append(message["status"])
        message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
      elif message["type"] == "http.response.body" and not message.get("more_body", False):
        finished = True
      await send(message)

    async def receive_watching() -> Message:
      nonlocal gone
      message = await receive()
      gone = gone or message["type"] == "http.disconnect"
      return message

    try:
      self._authorize(scope)
      body = await self._read_body(scope, receive_watching)
      await self.app(scope, _replay(body, receive_watching), send_with_id)
    except _Refusal as refusal:
      if refusal.status != 413 or await self._discard_body(scope, receive_watching):
        await _send_error(send_with_id, refusal)
    except _ClientGone:
      pass
    final = CLIENT_CLOSED if gone and not finished else (status[0] if status else CLIENT_CLOSED)
    route = scope["path"] if scope["path"] in self._routes else "other"
    self._on_response(route, final)
    # Health checks and scrapes come every few seconds: their successes only at DEBUG.
    level = logging.DEBUG if scope["path"] in _QUIET_PATHS and final < 400 else logging.INFO
    logger.log(
      level,
      "%s %s %d %.3fs request_id=%s",
      scope["method"],
      scope["path"],
      final,
      time.perf_counter() - start,
      request_id,
    )

  def _authorize(self, scope: Scope) -> None:
    key = self.config.api_key
    if key is None or not scope["path"].startswith("/v1/") or scope["method"] == "OPTIONS":
      return
    auth = _header(scope, b"authorization") or ""
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
      problem = "is missing" if not auth else "is wrong"
      raise _Refusal(
        401,
        f"the API key {problem}: send the header 'Authorization: Bearer <key>' with the key the "
        "server was started with (--api-key or $S3JAX_API_KEY)",
        "invalid_request_error",
        "invalid_api_key",
      )

  async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
    """The whole body of a request that has one (None for GET and friends), within the limits."""
    if scope["method"] not in ("POST", "PUT", "PATCH"):
      return None
    limit = self.config.max_body_bytes
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
      raise self._too_large(int(declared))
    chunks, size = [], 0
    deadline = asyncio.get_running_loop().time() + self.config.body_timeout_s
    while True:
      remaining = deadline - asyncio.get_running_loop().time()
      try:
        message = await asyncio.wait_for(receive(), max(remaining, 0.0))
      except asyncio.TimeoutError:
        raise _Refusal(
          408,
          f"the request body did not arrive within {self.config.body_timeout_s:g} s (--body-timeout); send it at once",
          "invalid_request_error",
        ) from None
      if message["type"] == "http.disconnect":
        raise _ClientGone()
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > limit:
        raise self._too_large(size, at_least=True)
      chunks.append(chunk)
      if not message.get("more_body", False):
        return b"".join(chunks)

  async def _discard_body(self, scope: Scope, receive: Receive) -> bool:
    """Reads and drops the rest of a refused body unless it is too large; False if the client left."""
    cap = _DISCARD_FACTOR * self.config.max_body_bytes
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
      return True
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + self.config.body_timeout_s, 0
    while dropped < cap:
      try:
        message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
      except asyncio.TimeoutError:
        return True
      if message["type"] == "http.disconnect":
        return False
      dropped += len(message.get("body", b""))
      if not message.get("more_body", False):
        return True
    return True

  def _too_large(self, size: int, at_least: bool = False) -> _Refusal:
    return _Refusal(
      413,
      f"the request body is {'more than ' if at_least else ''}{size} bytes; this server accepts "
      f"at most {self.config.max_body_bytes} (--max-body-bytes): send fewer or shorter prompts",
      "invalid_request_error",
    )


def _replay(body: bytes | None, receive: Receive) -> Receive:
  """A ``receive`` that first hands over the body read already, then reaches the client."""
  pending = [] if body is None else [{"type": "http.request", "body": body, "more_body": False}]

  async def replay() -> Message:
    if pending:
      return pending.pop()
    return await receive()

  return replay


async def _send_error(send: Send, refusal: _Refusal) -> None:
  payload = {"error": {"message": refusal.message, "type": refusal.error_type, "param": None, "code": refusal.code}}
  body = json.dumps(payload).encode()
  headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
  if refusal.status in (408, 413):
    headers.append((b"connection", b"close"))  # the unread rest of the body must not be parsed as a request
  if refusal.status == 401:
    headers.append((b"www-authenticate", b"Bearer"))
  await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
  await send({"type": "http.response.body", "body": body, "more_body": False})
