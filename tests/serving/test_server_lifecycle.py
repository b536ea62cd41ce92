"""Back-pressure, the API key and shutdown of a real server process: 429 when the queue is full,
401 without the key, and the drain on SIGTERM.

One small server (``--max-queue 4``, a KV budget of one slot, an API key, a 2 s drain timeout)
serves every test; the SIGTERM test runs last and ends it. It starts in the background lane
(tests/background.py) from the start of the session.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest
from test_server_harness import server_job

pytestmark = pytest.mark.server

# The tiny model takes 1 KiB per token (2 layers x 2 x 64 wide x 4 bytes): one 512-token slot,
# so `max` runs one request at a time and the queue fills.
BUDGET = str(512 * 1024)
KEY = "lifecycle-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DRAIN_TIMEOUT_S = 2


STARTED = server_job(
  "--max-queue", "4", "--memory-budget", BUDGET, "--drain-timeout", str(DRAIN_TIMEOUT_S), "--api-key", KEY
)


@pytest.fixture(scope="module")
def server():
  proc = STARTED.result()
  try:
    yield proc
  finally:
    proc.close()


def test_full_queue_is_429_with_retry_after(server):
  body = {"prompt": "Flood", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

  async def flood() -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=AUTH) as c:
      return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(16)])

  responses = asyncio.run(flood())
  codes = [r.status_code for r in responses]
  assert set(codes) <= {200, 429}, codes
  assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
  for r in responses:
    if r.status_code == 429:
      assert int(r.headers["retry-after"]) >= 1
      assert r.json()["error"]["type"] == "rate_limit_error"
    else:
      assert r.json()["usage"]["completion_tokens"] == 40
  # Back-pressure is not a failure: once the flood drains, the server serves again.
  ok = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=300, headers=AUTH)
  assert ok.status_code == 200


def test_api_key_is_required_on_v1_routes(server):
  wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError) as info:
    wrong.completions.create(model="tiny", prompt="Hi", max_tokens=1)
  assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
  missing = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
  assert missing.status_code == 401 and "missing" in missing.json()["error"]["message"]
  client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
  assert client.completions.create(model="tiny", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
  assert httpx.get(f"{server.url}/health").status_code == 200  # health checks carry no key


def _stream(server, max_tokens: int, n: int, into: dict) -> None:
  """Reads one streamed completion into ``into["events"]`` (``into["first"]`` set at its first event)."""
  body = {
    "prompt": "Long answer",
    "max_tokens": max_tokens,
    "n": n,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
  }
  events = []
  with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300, headers=AUTH) as r:
    into["status"] = r.status_code
    for line in r.iter_lines():
      if line.startswith("data: "):
        events.append(line[6:])
        into.setdefault("first", time.monotonic())
  into["events"] = events


@pytest.mark.timing  # a stream finishes within the 2 s drain
def test_sigterm_drains_then_ends_open_streams_and_exits_zero(server):
  """A short stream finishes during the drain, a new request gets 503 (not a refused connection),
  and a stream still running at the drain timeout gets an error event, then [DONE]."""
  short, long = {}, {}
  # One slot: the long request's 4 choices of 480 tokens run one after the other, after the short one.
  # Its 1,980 tokens take about 30x the short one's 60: many times the drain timeout on any CPU.
  readers = [
    threading.Thread(target=_stream, args=(server, 60, 1, short)),
    threading.Thread(target=_stream, args=(server, 480, 4, long)),
  ]
  readers[0].start()
  deadline = time.monotonic() + 120
  while "first" not in short and time.monotonic() < deadline:
    time.sleep(0.02)
  assert "first" in short, "the stream never started"
  readers[1].start()
  time.sleep(0.2)  # the long one is queued
  server.proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  during = httpx.post(
    f"{server.url}/v1/completions", json={"prompt": "Late", "max_tokens": 1}, headers=AUTH, timeout=30
  )
  assert during.status_code == 503 and during.json()["error"]["type"] == "service_unavailable"
  code = server.wait(timeout_s=120)
  for reader in readers:
    reader.join(timeout=10)
  assert code == 0, server.log()
  assert short["events"][-1] == "[DONE]"
  assert json.loads(short["events"][-2])["usage"]["completion_tokens"] == 60  # in flight: finished, not cut
  assert long["events"][-1] == "[DONE]", long["events"][-3:]
  error = json.loads(long["events"][-2])["error"]
  assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
  assert "ERROR" not in server.log(tail=None) and "Traceback" not in server.log(tail=None)
  with pytest.raises(httpx.ConnectError):
    httpx.get(f"{server.url}/health", timeout=5)
