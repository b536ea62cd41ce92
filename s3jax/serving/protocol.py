"""OpenAI-compatible request and response models of the HTTP server: the fields both APIs share,
and the legacy completions API (`POST /v1/completions`); chat's own are in ``chat.py``.

The request models check everything that does not need the engine (types, ranges, options the
engine cannot honour); checks against the model (prompt length, context limit) happen in the
server, which knows the loaded model.

Extensions to OpenAI's schema, as vLLM spells them: `top_k` (0 = off), `ignore_eos` (generate
exactly `max_tokens`, used by load tests so that random-weight models still produce a trace's
lengths) and `stop_token_ids` (token ids that end the answer, like EOS).

Defaults are OpenAI's: temperature 1.0, and 16 tokens for completions (chat: up to the context).
With `n` > 1 and a `seed`, choice j samples with seed + j, so it equals the library's
``LLM.generate(prompt, SamplingParams(seed=seed + j))``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

# The legacy completions API defaults to 16 tokens; clients that rely on it expect it.
DEFAULT_MAX_TOKENS = 16
# Stop sequences per request, as OpenAI allows.
MAX_STOP_SEQUENCES = 4
# Choices per prompt, as OpenAI allows.
MAX_N = 128
# Alternatives per token the completions API reports log-probabilities of, as OpenAI allows.
MAX_COMPLETION_LOGPROBS = 5

StrictNumber = Annotated[float, Field(strict=True)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


# Error type of the range checks below: its context carries the field at fault,
# which a model-level validator's location would lose.
INVALID_FIELD = "invalid_field"


def invalid(param: str, message: str) -> PydanticCustomError:
  """A validation error naming ``param`` (raised from the request model's validators)."""
  return PydanticCustomError(INVALID_FIELD, "{message}", {"message": message, "param": param})


class ProtocolError(ValueError):
  """A request the server refuses, with the OpenAI error fields it answers with.

  Attributes:
    message: human-readable, names the offending field.
    param: the request field at fault, or None.
    status_code: the HTTP status to answer with.
    error_type: OpenAI's error ``type``.
    code: OpenAI's error ``code`` (e.g. ``model_not_found``), or None.
    headers: extra response headers (``Retry-After`` on 429).
  """

  def __init__(
    self,
    message: str,
    *,
    param: str | None = None,
    status_code: int = 400,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
  ):
    super().__init__(message)
    self.message = message
    self.param = param
    self.status_code = status_code
    self.error_type = error_type
    self.code = code
    self.headers = headers


_log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # unknown field names already logged (one warning per name per process)


def _warn_unknown(model: type[BaseModel], data: Any, where: str) -> None:
  if not isinstance(data, dict):
    return
  known = set(model.model_fields)
  for name in data:
    key = f"{where}{name}"
    if name not in known and key not in _WARNED:
      _WARNED.add(key)
      _log.warning("ignoring the request field %r, which this server does not know (as vLLM does)", key)


class StreamOptions(BaseModel):
  """``stream_options``: OpenAI's ``include_usage`` (a usage chunk before ``[DONE]``) and vLLM's
  ``continuous_usage_stats`` (the usage so far in every chunk)."""

  model_config = ConfigDict(extra="ignore")
  include_usage: StrictBool = False
  continuous_usage_stats: StrictBool = False

  @model_validator(mode="before")
  @classmethod
  def _log_unknown(cls, data: Any) -> Any:
    _warn_unknown(cls, data, "stream_options.")
    return data


class SamplingRequest(BaseModel):
  """The fields every generating route shares (OpenAI's names, vLLM's extensions).

    Unknown fields are ignored with one logged warning per name, as vLLM's server does (clients
  send extras); the fields vLLM's server accepts that this engine cannot honour are accepted only
    at their neutral value, so a client never silently gets something else than it asked for.
  """

  model_config = ConfigDict(extra="ignore")

  @model_validator(mode="before")
  @classmethod
  def _log_unknown(cls, data: Any) -> Any:
    _warn_unknown(cls, data, "")
    return data

  model: StrictStr | None = None
  max_tokens: StrictInt | None = None
  temperature: StrictNumber = 1.0
  top_p: StrictNumber = 1.0
  top_k: StrictInt = 0
  n: StrictInt = 1
  stop: StrictStr | list[StrictStr] | None = None
  stop_token_ids: list[StrictInt] | None = None
  seed: StrictInt | None = None
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  ignore_eos: StrictBool = False
  # Benchmark extension, honoured only by a server started with --trace-replay (see SamplingParams).
  replay_output_len: StrictInt | None = None
  # Accepted for compatibility, only at their neutral values (checked below).
  best_of: StrictInt | None = None
  presence_penalty: StrictNumber = 0.0
  frequency_penalty: StrictNumber = 0.0
  logit_bias: dict[str, float] | None = None
  user: StrictStr | None = None
  # vLLM's extensions, neutral values only (vLLM's defaults); request_id is accepted and not used
  # (the server names requests itself, in its X-Request-Id header).
  min_p: StrictNumber = 0.0
  repetition_penalty: StrictNumber = 1.0
  length_penalty: StrictNumber = 1.0
  min_tokens: StrictInt = 0
  use_beam_search: StrictBool = False
  include_stop_str_in_output: StrictBool = False
  skip_special_tokens: StrictBool = True
  spaces_between_special_tokens: StrictBool = True
  priority: StrictInt = 0
  request_id: StrictStr | None = None

  @model_validator(mode="after")
  def _check_ranges(self) -> SamplingRequest:
    if self.max_tokens is not None and self.max_tokens < self.least_max_tokens:
      raise invalid("max_tokens", f"max_tokens must be at least {self.least_max_tokens}, got {self.max_tokens}")
    if self.temperature < 0:
      raise invalid("temperature", f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise invalid("top_p", f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise invalid("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 1 <= self.n <= MAX_N:
      raise invalid("n", f"n must be between 1 and {MAX_N} (choices per prompt), got {self.n}")
    if self.best_of not in (None, 1):
      raise invalid("best_of", f"best_of must be 1 (ask for n choices instead), got {self.best_of}")
    stops = self.stop_sequences
    if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
      raise invalid("stop", f"stop must be at most {MAX_STOP_SEQUENCES} non-empty strings")
    if any(t < 0 for t in self.stop_token_ids or ()):
      raise invalid("stop_token_ids", "stop_token_ids must be token ids >= 0")
    if self.stream_options is not None and not self.stream:
      raise invalid("stream_options", "stream_options is only allowed when stream is true")
    neutral = {  # field: (what this request asks, the only value this engine honours)
      "presence_penalty": (self.presence_penalty, 0),
      "frequency_penalty": (self.frequency_penalty, 0),
      "logit_bias": (self.logit_bias or None, None),
      "min_p": (self.min_p, 0),
      "repetition_penalty": (self.repetition_penalty, 1),
      "length_penalty": (self.length_penalty, 1),
      "min_tokens": (self.min_tokens, 0),
      "use_beam_search": (self.use_beam_search, False),
      "include_stop_str_in_output": (self.include_stop_str_in_output, False),
      "skip_special_tokens": (self.skip_special_tokens, True),
      "spaces_between_special_tokens": (self.spaces_between_special_tokens, True),
      "priority": (self.priority, 0),
    }
    for name, (value, only) in neutral.items():
      if value != only:
        accepted = "" if only is None else f" (only {json.dumps(only)}, its neutral value, is accepted)"
        raise invalid(name, f"{name}={json.dumps(value)} is not supported by this server{accepted}")
    return self

  least_max_tokens: ClassVar[int] = 1

  @property
  def stop_sequences(self) -> tuple[str, ...]:
    if self.stop is None:
      return ()
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

  @property
  def include_usage(self) -> bool:
    return self.stream_options is not None and self.stream_options.include_usage

  @property
  def continuous_usage(self) -> bool:
    """vLLM's ``continuous_usage_stats``: every chunk carries the usage so far."""
    return self.stream_options is not None and self.stream_options.continuous_usage_stats

  @property
  def top_logprobs_wanted(self) -> int | None:
    """Alternatives per token to report log-probabilities of; None: no log-probabilities."""
    return None

  @property
  def prompt_logprobs_wanted(self) -> int | None:
    """The same for each prompt token (completions' ``echo`` with ``logprobs``)."""
    return None

  def sampling_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of the engine's ``SamplingParams`` for every prompt of this request."""
    return dict(
      max_tokens=self.max_tokens,
      temperature=float(self.temperature),
      top_p=float(self.top_p),
      top_k=self.top_k,
      seed=self.seed,
      stop=self.stop_sequences,
      stop_token_ids=tuple(self.stop_token_ids or ()),
      ignore_eos=self.ignore_eos,
      replay_output_len=self.replay_output_len,
      logprobs=self.top_logprobs_wanted,
      prompt_logprobs=self.prompt_logprobs_wanted,
    )


class CompletionRequest(SamplingRequest):
  """Body of ``POST /v1/completions``. ``max_tokens`` may be 0: with ``echo`` and ``logprobs``, the
  prompt's log-probabilities alone (what evaluation harnesses score a model with)."""

  least_max_tokens: ClassVar[int] = 0

  prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
  max_tokens: StrictInt | None = DEFAULT_MAX_TOKENS
  echo: StrictBool = False
  logprobs: StrictInt | None = None
  suffix: StrictStr | None = None

  @field_validator("prompt")
  @classmethod
  def _prompt_not_empty(cls, value: Any) -> Any:
    if isinstance(value, list) and not value:
      raise invalid("prompt", "prompt must not be an empty list")
    return value

  @model_validator(mode="after")
  def _check_completion_options(self) -> CompletionRequest:
    # logprobs=0 asks for the sampled tokens' log-probabilities (no alternatives): honoured, never ignored.
    if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
      raise invalid(
        "logprobs",
        f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS} (alternatives per token), got {self.logprobs}",
      )
    if self.suffix:
      raise invalid("suffix", "suffix is not supported by this server")
    return self

  @property
  def top_logprobs_wanted(self) -> int | None:
    return self.logprobs

  @property
  def prompt_logprobs_wanted(self) -> int | None:
    return self.logprobs if self.echo else None

  @property
  def prompts(self) -> list[str | list[int]]:
    """The prompts: strings or token-id lists (each gives ``n`` choices)."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if isinstance(p[0], int):
      return [list(p)]
    return list(p)


class ErrorInfo(BaseModel):
  message: str
  type: str = "invalid_request_error"
  param: str | None = None
  code: str | int | None = None


class ErrorResponse(BaseModel):
  error: ErrorInfo


class UsageInfo(BaseModel):
  prompt_tokens: int = 0
  completion_tokens: int = 0
  total_tokens: int = 0

  def add(self, prompt_tokens: int, completion_tokens: int) -> None:
    self.prompt_tokens += prompt_tokens
    self.completion_tokens += completion_tokens
    self.total_tokens = self.prompt_tokens + self.completion_tokens


class CompletionLogprobs(BaseModel):
  """The legacy API's log-probabilities of a choice's tokens (each ``top_logprobs`` entry holds the
  most likely alternatives and the sampled token)."""

  tokens: list[str] = Field(default_factory=list)
  token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
  top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
  text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
  index: int
  text: str
  logprobs: CompletionLogprobs | None = None
  finish_reason: str | None = None


class CompletionResponse(BaseModel):
  id: str
  object: Literal["text_completion"] = "text_completion"
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  choices: list[CompletionChoice]
  usage: UsageInfo | None = None


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int = Field(default_factory=lambda: int(time.time()))
  owned_by: str = "s3jax"
  max_model_len: int


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


def completion_id() -> str:
  return f"cmpl-{uuid.uuid4().hex}"


def sse(payload: BaseModel | str) -> str:
  """One server-sent event: ``data: <json>`` and a blank line.

  Fields that are None stay in the JSON (as null): OpenAI clients read
  ``finish_reason: null`` and ``usage: null`` on every chunk but the last.
  """
  body = payload if isinstance(payload, str) else payload.model_dump_json()
  return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# What each field accepts, for messages about wrong types (pydantic's own name union members).
_EXPECTED = {
  "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
  "stop": "a string or a list of strings",
  "stream_options": 'an object like {"include_usage": true, "continuous_usage_stats": false}',
}


def _lone_surrogate(value: Any, path: tuple = ()) -> tuple[tuple, str, int] | None:
  """(path, string, index) of the first string in ``value`` holding an unpaired UTF-16 surrogate."""
  if isinstance(value, str):
    for i, ch in enumerate(value):
      if 0xD800 <= ord(ch) <= 0xDFFF:
        return path, value, i
    return None
  items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
  for key, item in items:
    found = _lone_surrogate(key, path) if isinstance(key, str) else None
    found = found or _lone_surrogate(item, (*path, key))
    if found:
      return found
  return None


def surrogate_error(raw: bytes | str) -> ProtocolError | None:
  """A clear 400 when invalid JSON is only invalid for a lone ``\\udXXX`` escape, else None.

  pydantic's parser calls it "unexpected end of hex escape", which sends clients looking for a
  truncated body; Python's parser accepts the escape, which lets us say which field holds it.
  """
  try:
    value = json.loads(raw)
  except (ValueError, RecursionError):
    return None
  found = _lone_surrogate(value)
  if found is None:
    return None
  path, text, index = found
  where = ".".join(str(p) for p in path) or "the body"
  return ProtocolError(
    f"{where} holds an unpaired UTF-16 surrogate (\\u{ord(text[index]):04x} at character {index}), which is not "
    "a Unicode character: escape characters beyond U+FFFF as a surrogate pair (e.g. \\ud83d\\ude00) or send "
    "them as UTF-8",
    param=str(path[0]) if path else None,
  )


def error_from_validation(errors: list[dict[str, Any]]) -> ProtocolError:
  """One OpenAI-style 400 error from pydantic's (or FastAPI's) validation errors.

  Reports the first error, naming its top-level field, since OpenAI's error
  object has room for one ``param``.

  Args:
    errors: ``ValidationError.errors()``; locations may start with ``"body"``.
  """
  if not errors:
    return ProtocolError("invalid request")
  err = errors[0]
  loc = [part for part in err.get("loc", ()) if part != "body"]
  kind = err.get("type", "")
  if kind == INVALID_FIELD:
    ctx = err.get("ctx", {})
    return ProtocolError(ctx.get("message", err.get("msg", "")), param=ctx.get("param"))
  if kind == "json_invalid":
    detail = err.get("ctx", {}).get("error", "")
    return ProtocolError(f"request body is not valid JSON: {detail}".rstrip(": "))
  if not loc or not isinstance(loc[0], str):
    return ProtocolError("request body must be a JSON object")
  field = loc[0]
  if kind == "missing":
    return ProtocolError(f"{field} is required", param=field)
  if field in _EXPECTED and len(loc) > 1:
    # Union members report one error each; name what the field accepts instead.
    return ProtocolError(f"{field} must be {_EXPECTED[field]}", param=field)
  msg = err.get("msg", "invalid value").removeprefix("Value error, ")
  where = ".".join(str(part) for part in loc)
  return ProtocolError(f"{where}: {msg}", param=field)
