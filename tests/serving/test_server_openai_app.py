"""The OpenAI surface and the request guard, in process against the fake backend: chat, ``n``,
``echo``, errors (401, 404, 413, 400 on too many prompts or a lone surrogate), request ids, CORS,
the drain's end of open streams, and the CLI's help text."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import pytest
from fake_backend import FakeLLM

from s3jax.serving.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from s3jax.serving.cli import parse_args
from s3jax.serving.server import ServerConfig, build_app, drain

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}


def _client(llm: FakeLLM, **config) -> tuple[httpx.AsyncClient, object]:
  app = build_app(llm, ServerConfig(**config))
  return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), app


def _events(text: str) -> list[str]:
  return [e.removeprefix("data: ") for e in text.split("\n\n") if e]


def test_chat_renders_the_default_template_and_answers_in_chat_shape():
  llm = FakeLLM()

  async def go():
    async with _client(llm)[0] as c:
      plain = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
      streamed = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "stream": True})
      return plain, streamed

  plain, streamed = asyncio.run(go())
  assert llm.last_chat_prompt == "System: Be brief.\nUser: Hi\nAssistant:"
  body = plain.json()
  assert plain.status_code == 200 and body["object"] == "chat.completion"
  assert body["choices"][0]["message"] == {"role": "assistant", "content": " t0 t1"}
  events = _events(streamed.text)
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == " t0 t1"
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"
  assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_a_configured_template_replaces_the_default():
  llm = FakeLLM()
  template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

  async def go():
    async with _client(llm, chat_template=template)[0] as c:
      return await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})

  assert asyncio.run(go()).status_code == 200
  assert llm.last_chat_prompt == "<system>Be brief.<user>Hi<assistant>"
  parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}]}
  assert render_chat(object(), [{"role": "user", "content": "AB"}], DEFAULT_CHAT_TEMPLATE) == "User: AB\nAssistant:"
  from s3jax.serving.chat import ChatCompletionRequest

  assert ChatCompletionRequest.model_validate(parts).template_messages() == [{"role": "user", "content": "AB"}]


def test_a_transformers_tokenizer_renders_its_own_template():
  from transformers import AutoTokenizer

  from s3jax.assets import GPT2_TOKENIZER_DIR

  tokenizer = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER_DIR))  # GPT-2 ships no template: the default
  messages = [{"role": "user", "content": "Hi"}]
  assert render_chat(tokenizer, messages) == "User: Hi\nAssistant:"
  # What a checkpoint's tokenizer_config.json "chat_template" sets:
  tokenizer.chat_template = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
  )
  assert render_chat(tokenizer, messages) == "<|user|>Hi<|endoftext|><|assistant|>"
  assert render_chat(tokenizer, messages, DEFAULT_CHAT_TEMPLATE) == "User: Hi\nAssistant:"  # --chat-template wins
  with pytest.raises(ValueError, match="messages: the chat template failed"):
    render_chat(tokenizer, messages, "{{ raise_exception('only system messages') }}")


def test_n_choices_are_ordered_by_prompt_and_seeded_apart():
  llm = FakeLLM()

  async def go():
    async with _client(llm)[0] as c:
      return await c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 3, "max_tokens": 1, "seed": 10})

  r = asyncio.run(go())
  assert [ch["index"] for ch in r.json()["choices"]] == list(range(6))
  assert [(prompt, params.seed) for prompt, params in llm.submitted] == [
    ("a", 10),
    ("a", 11),
    ("a", 12),
    ("b", 10),
    ("b", 11),
    ("b", 12),
  ]
  assert r.json()["usage"]["prompt_tokens"] == 2 * 3  # each prompt counted once, not once per choice


def test_logprobs_zero_is_honoured_and_streamed_chunks_carry_theirs():
  async def go():
    async with _client(FakeLLM())[0] as c:
      zero = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "logprobs": 0})
      two = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "logprobs": 2, "stream": True})
      chat = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 1})
      return zero.json(), two.text, chat.json()

  zero, two, chat = asyncio.run(go())
  assert zero["choices"][0]["logprobs"] == {
    "tokens": ["<0>", "<1>"],
    "token_logprobs": [0.0, -1.0],
    "top_logprobs": [{"<0>": 0.0}, {"<1>": -1.0}],
    "text_offset": [0, 3],
  }
  chunks = [json.loads(e)["choices"][0]["logprobs"] for e in _events(two)[:-1]]
  assert [c["top_logprobs"] for c in chunks if c and c["tokens"]] == [
    [{"<100>": -1.0, "<101>": -2.0, "<0>": 0.0}],
    [{"<100>": -2.0, "<101>": -3.0, "<1>": -1.0}],
  ]
  assert [c["text_offset"] for c in chunks if c and c["tokens"]] == [[0], [3]]  # offsets run on across chunks
  content = chat["choices"][0]["logprobs"]["content"]
  assert [(e["token"], e["logprob"], [t["token"] for t in e["top_logprobs"]]) for e in content] == [
    ("<0>", 0.0, ["<100>"]),
    ("<1>", -1.0, ["<100>"]),
  ]
  assert content[0]["bytes"] == list(b"<0>")


def test_echo_puts_the_prompt_before_the_answer():
  async def go():
    async with _client(FakeLLM())[0] as c:
      texts = await c.post("/v1/completions", json={"prompt": ["a", "b"], "echo": True, "max_tokens": 1})
      ids = await c.post("/v1/completions", json={"prompt": [7, 8], "echo": True, "max_tokens": 1})
      streamed = await c.post("/v1/completions", json={"prompt": "a", "echo": True, "max_tokens": 1, "stream": True})
      return texts.json(), ids.json(), streamed.text

  texts, ids, streamed = asyncio.run(go())
  assert [ch["text"] for ch in texts["choices"]] == ["a t0", "b t0"]
  assert ids["choices"][0]["text"] == "<7><8> t0"  # token-id prompts are echoed decoded
  assert "".join(json.loads(e)["choices"][0]["text"] for e in _events(streamed)[:-1]) == "a t0"


@pytest.mark.parametrize(
  "body,status,param,code",
  [
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": ["a"] * 5, "n": 2}, 400, "prompt", None),
    ({**CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),  # needs logprobs: true
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens", None),  # a chat needs an answer; completions may score only
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
  ],
)
def test_openai_errors(body, status, param, code):
  route = "/v1/chat/completions" if "messages" in body else "/v1/completions"

  async def go():
    async with _client(FakeLLM(), max_prompts_per_request=8)[0] as c:
      return await c.post(route, json=body)

  r = asyncio.run(go())
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert (err["param"], err["code"]) == (param, code)
  assert param in err["message"]


def test_lone_surrogate_message_names_the_field_and_the_fix():
  async def go():
    async with _client(FakeLLM())[0] as c:
      return await c.post("/v1/completions", content=b'{"prompt": ["ok", "bad \\udc00 here"]}')

  err = asyncio.run(go()).json()["error"]
  assert err["param"] == "prompt"
  assert "prompt.1" in err["message"] and "surrogate" in err["message"] and "hex escape" not in err["message"]


def test_api_key_body_limit_request_id_and_cors(caplog):
  caplog.set_level(logging.INFO, logger="s3jax.serving.access")

  async def go():
    client, _ = _client(FakeLLM(), api_key="sesame", max_body_bytes=1000, allowed_origins=("https://ui.example",))
    async with client as c:
      ok = {"authorization": "Bearer sesame"}
      return dict(
        missing=await c.post("/v1/completions", json={"prompt": "a"}),
        wrong=await c.post("/v1/completions", json={"prompt": "a"}, headers={"authorization": "Bearer nope"}),
        health=await c.get("/health"),
        big=await c.post("/v1/completions", json={"prompt": "a" * 2000}, headers=ok),
        good=await c.post(
          "/v1/completions",
          json={"prompt": "a", "max_tokens": 1},
          headers={**ok, "x-request-id": "trace-42", "origin": "https://ui.example"},
        ),
        preflight=await c.options(
          "/v1/completions",
          headers={
            "origin": "https://ui.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization",
          },
        ),
      )

  r = asyncio.run(go())
  assert r["missing"].status_code == 401 and "missing" in r["missing"].json()["error"]["message"]
  assert r["wrong"].status_code == 401 and r["wrong"].json()["error"]["code"] == "invalid_api_key"
  assert r["health"].status_code == 200  # only /v1/ routes need the key
  assert r["big"].status_code == 413 and "--max-body-bytes" in r["big"].json()["error"]["message"]
  assert r["good"].status_code == 200 and r["good"].headers["x-request-id"] == "trace-42"
  assert r["good"].headers["access-control-allow-origin"] == "https://ui.example"
  assert r["preflight"].status_code == 200
  assert len(r["missing"].headers["x-request-id"]) == 32  # generated when the client sends none
  lines = [rec.getMessage() for rec in caplog.records if rec.name == "s3jax.serving.access"]
  assert any(" 200 " in line and "request_id=trace-42" in line for line in lines)
  assert sum(" 401 " in line for line in lines) == 2 and sum(" 413 " in line for line in lines) == 1


def test_drain_ends_open_streams_with_an_error_then_done():
  llm = FakeLLM(step_s=0.05)

  async def go():
    client, app = _client(llm)
    async with client as c:

      async def stream():
        return await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 60, "stream": True})

      async def waiting():
        return await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 60})

      tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(waiting())]
      await asyncio.sleep(0.3)
      await drain(app, timeout_s=0.2)
      refused = await c.post("/v1/completions", json={"prompt": "a"})
      return [await t for t in tasks], refused

  (streamed, waited), refused = asyncio.run(go())
  events = _events(streamed.text)
  assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
  assert json.loads(events[0])["choices"][0]["text"] == " t0"
  assert waited.status_code == 503 and refused.status_code == 503
  assert sorted(llm.cancelled) == [0, 1]  # both engine requests were withdrawn


def test_help_shows_each_default_once_and_no_markup(capsys):
  with pytest.raises(SystemExit):
    parse_args(["--help"])
  text = capsys.readouterr().out
  assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
  assert "``" not in text
  blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])[1:]  # one per flag: its names, then its help
  assert len(blocks) > 30
  twice = [b.split()[0] for b in blocks if b.count("default") > 1]
  assert not twice, twice
  # The help is what follows the flag's names and metavar: "--port PORT  port to listen on".
  no_help = [b.split()[0] for b in blocks if len(re.split(r"\s{2,}", b.strip(), maxsplit=1)) < 2]
  assert not no_help, no_help
