"""Back-pressure and shutdown of a real server process: 429 when the queue is full, SIGTERM.

One small server (``--max-queue 1``, a KV budget of a couple of slots) serves
both tests; the SIGTERM test runs last and ends it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from test_server_harness import ServerProcess

pytestmark = pytest.mark.server

# The tiny model takes 1 KiB per token (2 layers x 2 x 64 wide x 4 bytes): one 512-token slot,
# so `max` runs one request at a time and the queue fills.
BUDGET = str(512 * 1024)


@pytest.fixture(scope="module")
def server():
  proc = ServerProcess("--max-queue", "1", "--memory-budget", BUDGET, "--drain-timeout", "60")
  try:
    yield proc.wait_ready()
  finally:
    proc.close()


def test_full_queue_is_429_with_retry_after(server):
  body = {"prompt": "Flood", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

  async def flood() -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
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
  ok = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=300)
  assert ok.status_code == 200


def test_sigterm_finishes_in_flight_and_exits_zero(server):
  result: dict = {}

  def stream() -> None:
    body = {"prompt": "Long answer", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300) as r:
      for line in r.iter_lines():
        if line.startswith("data: "):
          chunks.append(line[6:])
          result.setdefault("first_chunk_at", time.monotonic())
    result["chunks"] = chunks

  reader = threading.Thread(target=stream)
  reader.start()
  deadline = time.monotonic() + 120
  while "first_chunk_at" not in result and time.monotonic() < deadline:
    time.sleep(0.05)
  assert "first_chunk_at" in result, "the stream never started"
  code = server.terminate(timeout_s=120)
  reader.join(timeout=10)
  assert code == 0, server.log()
  chunks = result["chunks"]
  assert chunks[-1] == "[DONE]"
  usage = json.loads(chunks[-2])["usage"]
  assert usage["completion_tokens"] == 60  # The in-flight request finished, not cut.
  with pytest.raises(httpx.ConnectError):
    httpx.get(f"{server.url}/health", timeout=5)
