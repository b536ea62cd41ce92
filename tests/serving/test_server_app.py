"""The HTTP layer against a fake LLM (in process, no model; see ``fake_backend.py``): protocol, errors,
metrics, load-test helpers."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fake_backend import FakeLLM
from prometheus_client.parser import text_string_to_metric_families
from test_server_harness import metric_value

from s3jax.bench.trace import poisson_arrivals
from s3jax.serving import protocol as P
from s3jax.serving.server import ServerConfig, begin_drain, build_app

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _client(llm: FakeLLM) -> tuple[httpx.AsyncClient, object]:
  app = build_app(llm, ServerConfig(retry_after_s=3))
  return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), app


def _run(coro):
  return asyncio.run(coro)


def test_completion_and_usage():
  async def go():
    async with _client(FakeLLM())[0] as c:
      r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3})
      return r.status_code, r.json()

  code, body = _run(go())
  assert code == 200
  assert [ch["text"] for ch in body["choices"]] == [" t0 t1 t2"] * 2
  assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}


def test_stream_chunks_usage_and_done():
  async def go():
    async with _client(FakeLLM())[0] as c:
      body = {"prompt": "a", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
      r = await c.post("/v1/completions", json=body)
      return r.text

  events = [e for e in _run(go()).split("\n\n") if e]
  assert events[-1] == "data: [DONE]"
  chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
  assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == " t0 t1 t2"
  assert chunks[-2]["choices"][0]["finish_reason"] == "length"
  assert all(c["usage"] is None for c in chunks[:-1])
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_the_request_guidellm_sends_streams_with_the_usage_in_every_chunk(caplog):
  """guidellm 0.8's chat request (backends/openai/request_handlers.py): vLLM's
  ``continuous_usage_stats``, ``max_completion_tokens``, ``stop: null`` and ``ignore_eos``; an
  unknown field is ignored with one warning per name, as vLLM does."""
  body = {
    "model": "fake",
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_completion_tokens": 3,
    "stop": None,
    "ignore_eos": True,
    "messages": [{"role": "user", "content": "a"}],
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "request_id": "client-7",
    "a_field_nobody_knows": 1,
  }

  async def go():
    async with _client(FakeLLM())[0] as c:
      return [await c.post("/v1/chat/completions", json=body) for _ in range(2)]

  with caplog.at_level("WARNING", logger="s3jax.serving.protocol"):
    responses = _run(go())
  assert all(r.status_code == 200 for r in responses)
  events = [e.removeprefix("data: ") for e in responses[0].text.split("\n\n") if e]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  answered = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
  assert [c["usage"]["completion_tokens"] for c in answered] == [1, 2, 3]
  assert all(c["usage"]["prompt_tokens"] == 3 for c in answered)
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
  warnings = [r.getMessage() for r in caplog.records if "a_field_nobody_knows" in r.getMessage()]
  assert len(warnings) == 1, warnings  # once per name, not per request


@pytest.mark.parametrize(
  "field, value",
  [("repetition_penalty", 1.2), ("min_p", 0.1), ("priority", 1), ("use_beam_search", True)],
)
def test_vllm_fields_at_a_value_this_engine_cannot_honour_are_400(field, value):
  async def go():
    async with _client(FakeLLM())[0] as c:
      return await c.post("/v1/completions", json={"prompt": "a", field: value})

  r = _run(go())
  assert r.status_code == 400 and r.json()["error"]["param"] == field
  assert "not supported" in r.json()["error"]["message"]


def test_queue_full_is_429_and_cancels_earlier_prompts():
  llm = FakeLLM(step_s=0.05, max_queue=1)

  async def go():
    async with _client(llm)[0] as c:
      return await c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 50})

  r = _run(go())
  assert r.status_code == 429 and r.headers["retry-after"] == "3"
  assert r.json()["error"]["type"] == "rate_limit_error"
  assert llm.cancelled == [0]  # The first prompt was submitted, then withdrawn.


def test_a_full_engine_queue_is_429_too():
  """The engine's own queue bound, found full after submit returned, answers 429 as well."""

  async def go():
    async with _client(FakeLLM(engine_full=True))[0] as c:
      plain = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})
      streamed = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "stream": True})
      return plain, streamed

  plain, streamed = _run(go())
  assert plain.status_code == 429 and plain.json()["error"]["type"] == "rate_limit_error"
  events = [e for e in streamed.text.split("\n\n") if e]
  assert events[-1] == "data: [DONE]" and '"rate_limit_error"' in events[-2]


def test_request_errors_are_400_with_their_param_by_type():
  async def go():
    async with _client(FakeLLM())[0] as c:
      return await c.post("/v1/completions", json={"prompt": "refused by the engine", "max_tokens": 5})

  r = _run(go())
  assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"


def test_engine_error_is_500_and_stream_error_event():
  async def go():
    async with _client(FakeLLM(fail=True))[0] as c:
      plain = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})
      streamed = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "stream": True})
      return plain, streamed

  plain, streamed = _run(go())
  assert plain.status_code == 500 and plain.json()["error"]["type"] == "internal_error"
  events = [e for e in streamed.text.split("\n\n") if e]
  assert events[-1] == "data: [DONE]" and '"error"' in events[-2]


def test_draining_refuses_new_work_with_503():
  async def go():
    client, app = _client(FakeLLM())
    async with client as c:
      begin_drain(app)
      return await c.post("/v1/completions", json={"prompt": "a"}), await c.get("/health")

  completion, health = _run(go())
  assert completion.status_code == 503 and completion.json()["error"]["type"] == "service_unavailable"
  assert health.status_code == 503


def test_engine_value_error_names_prompt():
  async def go():
    async with _client(FakeLLM())[0] as c:
      return await c.post("/v1/completions", json={"prompt": ""})

  r = _run(go())
  assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_metrics_exposition_parses_with_engine_series():
  async def go():
    async with _client(FakeLLM())[0] as c:
      await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
      await c.post("/v1/completions", json={"prompt": "a", "max_tokens": -1})
      return (await c.get("/metrics")).text

  text = _run(go())
  names = {f.name for f in text_string_to_metric_families(text)}
  assert {
    "s3jax_requests",
    "s3jax_kv_reserved_bytes",
    "s3jax_num_requests_waiting_per_class",
    "s3jax_time_to_first_token_seconds",
    "s3jax_server_info",
  } <= names
  assert metric_value(text, "s3jax_requests_total", {"status": "length"}) == 1
  assert metric_value(text, "s3jax_requests_total", {"status": "invalid"}) == 1
  assert metric_value(text, "s3jax_generation_tokens_total") == 2
  assert metric_value(text, "s3jax_http_requests_total", {"route": "/v1/completions", "status_code": "400"}) == 1
  assert metric_value(text, "s3jax_server_info", {"policy": "s3"}) == 1


def test_two_apps_have_separate_registries():
  a, b = build_app(FakeLLM()), build_app(FakeLLM())
  assert a.state.s3.metrics.registry is not b.state.s3.metrics.registry


@pytest.mark.parametrize(
  "body,param",
  [
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 200}, "n"),
    ({}, "prompt"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
  ],
)
def test_request_model_names_the_field(body, param):
  with pytest.raises(Exception) as info:
    P.CompletionRequest.model_validate(body)
  err = P.error_from_validation(info.value.errors())
  assert err.param == param and err.status_code == 400


def test_request_prompt_forms():
  assert P.CompletionRequest(prompt="a").prompts == ["a"]
  assert P.CompletionRequest(prompt=[1, 2]).prompts == [[1, 2]]
  assert P.CompletionRequest(prompt=[[1], [2]]).prompts == [[1], [2]]
  assert P.CompletionRequest(prompt=["a", "b"], stop="x").sampling_kwargs()["stop"] == ("x",)


def test_load_test_helpers(tmp_path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("load_test", SCRIPTS / "load_test.py")
  lt = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = lt  # Its dataclasses look their module up while being defined.
  spec.loader.exec_module(lt)
  trace = lt.load_requests("alpaca-7b", 4, max_output_tokens=25, max_model_len=128)  # the shipped lengths
  assert len(trace) == 4
  for t in trace:
    assert 1 <= t.output_tokens <= min(25, 128 - t.prompt_tokens)
  arrivals = poisson_arrivals(2000, rate=4.0)
  assert arrivals[0] == 0 and (np.diff(arrivals) >= 0).all() and abs(np.diff(arrivals).mean() - 0.25) < 0.03
  assert not poisson_arrivals(5, float("inf")).any()
  assert np.allclose(poisson_arrivals(50, rate=2.0, seed=3) * 2, poisson_arrivals(50, rate=4.0, seed=3) * 4)
  md = tmp_path / "BENCHMARKS.md"
  md.write_text("# Benchmarks\n\n## Other\n\nkeep\n")
  lt.append_row(md, "| row1 |\n")
  lt.append_row(md, "| row2 |\n")
  text = md.read_text()
  assert text.index("## Other") < text.index(lt.SECTION) < text.index("| row1 |") < text.index("| row2 |")
  assert text.count(lt.SECTION) == 1 and "keep" in text
