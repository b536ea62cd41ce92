"""uvicorn, set up so that no client can hold the server: a header timeout, and a drain on SIGTERM
that keeps answering (503) instead of refusing connections.

uvicorn bounds an idle kept-alive connection (``timeout_keep_alive``), the size of a request's
headers (``h11_max_incomplete_event_size``) and the connections it serves at once
(``limit_concurrency``, 503 beyond it), but not the time a client takes to send its headers:
``HeaderTimeoutProtocol`` closes a connection whose request line and headers are not complete
within ``header_timeout_s``. (The body's time limit is the app's: ``guard.py``.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

from s3jax.extras import missing_extra

try:
  import uvicorn
  from fastapi import FastAPI
  from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError as e:
  raise missing_extra(e, "serve", "the s3jax server") from e

from s3jax.serving.server import begin_drain, drain

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
  """Transport-level limits (uvicorn's).

  Attributes:
    header_timeout_s: time a client has to send a request's line and headers.
    keep_alive_timeout_s: how long an idle kept-alive connection stays open.
    max_connections: connections (and requests) served at once; beyond it new requests get 503.
    max_header_bytes: the largest request line and headers.
  """

  header_timeout_s: float = 10.0
  keep_alive_timeout_s: int = 5
  max_connections: int | None = 1000
  max_header_bytes: int = 16 * 1024


class HeaderTimeoutProtocol(H11Protocol):
  """uvicorn's h11 protocol, closing connections that start a request and do not finish its headers."""

  header_timeout_s = ConnectionLimits.header_timeout_s  # set per server by ``make_protocol``

  def connection_made(self, transport) -> None:  # type: ignore[override]
    super().connection_made(transport)
    self._header_timer: asyncio.TimerHandle | None = None
    self._arm_header_timer()

  def data_received(self, data: bytes) -> None:
    if self.cycle is None or self.cycle.response_complete:  # bytes of a new request's head
      self._arm_header_timer()
    super().data_received(data)
    if self.cycle is not None and not self.cycle.response_complete:  # its head is complete
      self._disarm_header_timer()

  def connection_lost(self, exc: Exception | None) -> None:
    self._disarm_header_timer()
    super().connection_lost(exc)

  def _arm_header_timer(self) -> None:
    if self._header_timer is None:
      self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

  def _disarm_header_timer(self) -> None:
    if self._header_timer is not None:
      self._header_timer.cancel()
      self._header_timer = None

  def _on_header_timeout(self) -> None:
    self._header_timer = None
    if not self.transport.is_closing():
      logger.info(
        "closed a connection from %s: no complete request head within %g s", self.client, self.header_timeout_s
      )
      self.transport.close()


def make_protocol(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
  return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})


class DrainingServer(uvicorn.Server):
  """uvicorn's server with a drain: the first SIGTERM / SIGINT starts ``server.drain`` (new
  requests get 503 on the still-open socket, in-flight ones run up to ``drain_timeout_s``, then
  open streams get an error event and ``[DONE]``), and only then the usual graceful shutdown.
  A second signal skips to uvicorn's own handling (a second SIGINT forces the exit)."""

  def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float):
    super().__init__(config)
    self._app = app
    self._drain_timeout_s = drain_timeout_s
    self._loop: asyncio.AbstractEventLoop | None = None
    self._draining = False
    self._drain_task: asyncio.Task | None = None  # held: the loop keeps only a weak reference

  async def startup(self, sockets=None) -> None:
    self._loop = asyncio.get_running_loop()
    await super().startup(sockets)

  def handle_exit(self, sig: int, frame) -> None:
    if self._loop is None or self._draining or self.should_exit:
      super().handle_exit(sig, frame)
      return
    self._draining = True
    begin_drain(self._app)  # now, in the signal handler: no request slips in before the task runs
    logger.info("%s: draining (up to %g s), new requests get 503", signal.Signals(sig).name, self._drain_timeout_s)
    self._loop.call_soon_threadsafe(self._start_drain, sig)

  def _start_drain(self, sig: int) -> None:
    self._drain_task = self._loop.create_task(self._drain_then_exit(sig))

  async def _drain_then_exit(self, sig: int) -> None:
    try:
      await drain(self._app, self._drain_timeout_s)
    finally:
      super().handle_exit(sig, None)
