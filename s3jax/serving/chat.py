"""Chat completions (``POST /v1/chat/completions``): the request and response models, and the
chat template that turns messages into one prompt.

The template is the checkpoint's own (``chat_template`` in its ``tokenizer_config.json``),
rendered by the ``transformers`` tokenizer's ``apply_chat_template``; ``--chat-template`` replaces
it. A base model has none (GPT-2, and the shipped tokenizer): it gets ``DEFAULT_CHAT_TEMPLATE``,
one line per message, ``"<Role>: <content>"``, then ``"Assistant:"`` for the answer:

    System: You are terse.
    User: Name a river.
    Assistant:

The rendered text is tokenized without adding special tokens (a template writes the ones it
wants, e.g. its ``bos_token``).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from s3jax.errors import RequestError
from s3jax.executor.sampling import MAX_TOP_LOGPROBS
from s3jax.serving.protocol import SamplingRequest, UsageInfo, invalid

DEFAULT_CHAT_TEMPLATE = (
  "{% for message in messages %}"
  "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
  "{% endfor %}"
  "{% if add_generation_prompt %}Assistant:{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant", "tool")


class TextPart(BaseModel):
  model_config = ConfigDict(extra="forbid")
  type: Literal["text"]
  text: StrictStr


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="ignore")
  role: StrictStr
  content: StrictStr | Annotated[list[TextPart], Field(min_length=1)] | None = None
  name: StrictStr | None = None

  @model_validator(mode="after")
  def _known_role(self) -> ChatMessage:
    if self.role not in ROLES:
      raise invalid("messages", f"messages: role must be one of {', '.join(ROLES)}, got {self.role!r}")
    return self

  def as_template_input(self) -> dict[str, str]:
    """The message as chat templates read it: text parts joined into one string."""
    content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
    message = {"role": self.role, "content": content}
    if self.name is not None:
      message["name"] = self.name
    return message


class ChatCompletionRequest(SamplingRequest):
  """Body of ``POST /v1/chat/completions``; ``max_tokens`` (or ``max_completion_tokens``) defaults
  to whatever fits in the context, as OpenAI's chat API does."""

  messages: Annotated[list[ChatMessage], Field(min_length=1)]
  max_completion_tokens: StrictInt | None = None
  logprobs: StrictBool = False
  top_logprobs: StrictInt | None = None
  tools: list[Any] | None = None

  @model_validator(mode="after")
  def _check_chat_options(self) -> ChatCompletionRequest:
    if self.max_completion_tokens is not None:
      if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
        raise invalid("max_completion_tokens", "give max_completion_tokens or max_tokens, not both")
      if self.max_completion_tokens < 1:
        raise invalid(
          "max_completion_tokens", f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}"
        )
      self.max_tokens = self.max_completion_tokens
    if self.top_logprobs is not None:
      if not self.logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
      if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
        raise invalid("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
    if self.tools:
      raise invalid("tools", "tools (function calling) are not supported by this server")
    return self

  @property
  def top_logprobs_wanted(self) -> int | None:
    return (self.top_logprobs or 0) if self.logprobs else None

  def template_messages(self) -> list[dict[str, str]]:
    return [m.as_template_input() for m in self.messages]


def render_chat(tokenizer, messages: list[dict[str, str]], template: str | None = None) -> str:
  """The prompt text of ``messages``, ending where the assistant's answer starts.

  Args:
    tokenizer: the served model's tokenizer (a ``transformers`` tokenizer, or s3jax's shipped BPE).
    messages: ``{"role": ..., "content": ...}`` dicts.
    template: a Jinja chat template overriding the tokenizer's own.

  Raises:
    ValueError: the template failed on these messages (its message says why).
  """
  own = getattr(tokenizer, "chat_template", None)
  chosen = template or own or DEFAULT_CHAT_TEMPLATE
  try:
    if hasattr(tokenizer, "apply_chat_template"):
      return tokenizer.apply_chat_template(messages, chat_template=chosen, tokenize=False, add_generation_prompt=True)
    return _render_jinja(chosen, messages, tokenizer)
  except Exception as e:  # jinja2's TemplateError, or a template's raise_exception("...")
    raise RequestError("messages", f"messages: the chat template failed on these messages: {e}") from e


def _render_jinja(template: str, messages: list[dict[str, str]], tokenizer) -> str:
  """The template rendered as ``apply_chat_template`` renders it, for a tokenizer without that method."""
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message: str):
    raise ValueError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  eos = getattr(tokenizer, "eos_token", "")
  return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos)


class ChatMessageOut(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class ChatTopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
  top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
  content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
  index: int
  message: ChatMessageOut
  logprobs: ChatLogprobs | None = None
  finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  choices: list[ChatChoice]
  usage: UsageInfo | None = None


class ChatDelta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class ChatChunkChoice(BaseModel):
  index: int
  delta: ChatDelta
  logprobs: ChatLogprobs | None = None
  finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  choices: list[ChatChunkChoice]
  usage: UsageInfo | None = None


def chat_completion_id() -> str:
  return f"chatcmpl-{uuid.uuid4().hex}"
