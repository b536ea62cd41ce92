"""From what a caller gives to an ``EngineRequest``: sampling settings, prompts, one fit check.

Everything here runs in the caller's thread (``LLM.submit``, a server worker), so bad input
raises there, as a ``RequestError`` naming the request field at fault, never on the engine
thread. A prompt is tokenized once; text that cannot fit whatever its tokens is refused from its
length in characters before it is tokenized.

A prompt is text or token ids (a list of ints, or a NumPy or JAX integer array, so a JAX pipeline
hands its batches over as they are). The length predictor reads text, so a token-id prompt is
decoded with the tokenizer for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from s3jax.engine import EngineRequest
from s3jax.errors import RequestError
from s3jax.executor.sampling import MAX_PROMPT_LOGPROBS, MAX_TOP_LOGPROBS
from s3jax.serving.chat import render_chat
from s3jax.tokenizer import max_chars_per_token

Prompt = str | Sequence[int] | np.ndarray | jax.Array  # text, or token ids (a 1-D integer array)


def _is_int(value, low: int = 0, high: float = float("inf")) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and low <= value < high


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
  """Per-request generation settings (OpenAI names; top_k and stop_token_ids are vLLM's extensions).

  The defaults are OpenAI's (and vLLM's) for completions, the same in the library and the server:
  temperature 1.0 (sampling) and 16 answer tokens. Pass ``temperature=0`` for greedy answers and
  ``max_tokens=None`` to answer up to the model's maximum length.

  Attributes:
    max_tokens: most answer tokens; None = up to the model's maximum length; 0 = no answer (with
      ``prompt_logprobs``: only the prompt's scores, e.g. for evaluation harnesses).
    temperature: 0 is greedy.
    top_p: nucleus mass kept, in (0, 1].
    top_k: keep the k most likely tokens; 0 = off.
    seed: makes sampling reproducible whatever batch the request lands in.
    stop: strings that end the answer (not included in the text).
    stop_token_ids: token ids that end the answer like EOS (finish reason "stop"; the id is the
      last of ``token_ids`` but not in the text).
    logprobs: None for no log-probabilities; k (0..20) for each answer token's log-probability
      under the model (the log-softmax of its logits, before temperature, top-k and top-p) and
      those of its k most likely alternatives (``RequestOutput.logprobs``).
    prompt_logprobs: the same for each prompt token, k in 0..5 (``RequestOutput.prompt_logprobs``,
      None for the first token, which nothing precedes); computed by the prefill.
    ignore_eos: keep generating past EOS (benchmarks with random weights).
    replay_output_len: trace replay (benchmarks with random weights): the answer ends after this
      many tokens, like an EOS. No policy sees it but "oracle", which reserves it as the true
      length; so unlike ``max_tokens`` it leaks nothing to max, s3 or constant.
  """

  max_tokens: int | None = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  logprobs: int | None = None
  prompt_logprobs: int | None = None
  ignore_eos: bool = False
  replay_output_len: int | None = None

  def validate(self, max_model_len: int) -> None:
    """Raises ``RequestError`` naming the first invalid field."""
    if self.replay_output_len is not None and not _is_int(self.replay_output_len, 1):
      raise RequestError(
        "replay_output_len", f"replay_output_len must be an integer >= 1, got {self.replay_output_len!r}"
      )
    if self.max_tokens is not None:
      if not _is_int(self.max_tokens, -(2**63)):
        raise RequestError("max_tokens", f"max_tokens must be an integer, got {self.max_tokens!r}")
      if self.max_tokens < 0:
        raise RequestError("max_tokens", f"max_tokens must be >= 0 (0: no answer), got {self.max_tokens}")
      if self.max_tokens >= max_model_len:
        raise RequestError(
          "max_tokens",
          f"max_tokens must be < the model's maximum length {max_model_len} (the prompt needs at least one "
          f"token), got {self.max_tokens}",
        )
    if not isinstance(self.temperature, (int, float)) or self.temperature < 0 or not np.isfinite(self.temperature):
      raise RequestError("temperature", f"temperature must be a finite number >= 0, got {self.temperature!r}")
    if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
      raise RequestError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
    if not _is_int(self.top_k):
      raise RequestError("top_k", f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
    if self.seed is not None and not _is_int(self.seed, 0, 2**32):
      raise RequestError("seed", f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
      raise RequestError("stop", f"stop must be a sequence of non-empty strings, got {self.stop!r}")
    if self.logprobs is not None and not _is_int(self.logprobs, 0, MAX_TOP_LOGPROBS + 1):
      raise RequestError(
        "logprobs",
        f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {self.logprobs!r}",
      )
    if self.prompt_logprobs is not None and not _is_int(self.prompt_logprobs, 0, MAX_PROMPT_LOGPROBS + 1):
      raise RequestError(
        "prompt_logprobs",
        f"prompt_logprobs must be an integer in [0, {MAX_PROMPT_LOGPROBS}] (alternatives per prompt token), got "
        f"{self.prompt_logprobs!r}",
      )
    if any(not _is_int(t) for t in self.stop_token_ids):
      raise RequestError(
        "stop_token_ids", f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}"
      )


def prompt_list(prompts) -> list[Prompt]:
  """``generate``'s prompts, one entry per prompt: a string or token ids (a list of ints, a 1-D
  array) is one prompt; a 2-D array is one prompt per row."""
  if isinstance(prompts, str):
    return [prompts]
  if isinstance(prompts, (np.ndarray, jax.Array)):
    if prompts.ndim == 1:
      return [prompts]
    if prompts.ndim == 2:
      return list(np.asarray(prompts))  # one transfer off the device, not one per row
    raise RequestError(
      "prompt",
      f"prompts: a token-id array is 1-D (one prompt) or 2-D (one prompt per row), got shape "
      f"{prompts.shape}; pass a list of 1-D arrays for prompts of different lengths",
    )
  prompts = list(prompts)
  if prompts and isinstance(prompts[0], (int, np.integer)):
    return [prompts]
  return prompts


def token_ids(prompt, vocab: int) -> list[int]:
  """A token-id prompt (a sequence of ints, or a 1-D integer array) as a list, checked against the
  vocabulary; ``RequestError`` naming what is wrong and the fix."""
  if isinstance(prompt, (np.ndarray, jax.Array)):
    if prompt.ndim != 1:
      raise RequestError(
        "prompt",
        f"prompt: a token-id array prompt is 1-D, got shape {prompt.shape}; generate() takes a 2-D "
        "array as one prompt per row",
      )
    if not np.issubdtype(prompt.dtype, np.integer):
      raise RequestError(
        "prompt", f"prompt token ids must be integers, got a {prompt.dtype} array; cast it with .astype(np.int32)"
      )
    ids = np.asarray(prompt).tolist()
  else:
    ids = list(prompt)
    wrong = next((t for t in ids if not _is_int(t, -(2**63))), None)
    if wrong is not None:
      raise RequestError(
        "prompt", f"prompt token ids must be integers, got {wrong!r} ({type(wrong).__name__}); pass a string for text"
      )
    ids = [int(t) for t in ids]
  outside = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab]
  if outside:
    i, t = outside[0]
    more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
    raise RequestError(
      "prompt",
      f"prompt token ids must be in [0, {vocab}), the model's vocabulary: got {t} at position {i}"
      f"{more}; encode text with llm.tokenizer (or the tokenizer the model was trained with)",
    )
  return ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputLimits:
  """What the input processor checks requests against.

  Attributes:
    vocab_size: the model's vocabulary (a token id outside it is refused).
    max_model_len: the model's longest sequence.
    max_total_len: the longest prompt + answer the engine holds (the model's, or less under the
      memory budget): ``Engine.max_total_len``.
    check_lengths: the engine's fit check of (prompt tokens, max_tokens), ``Engine.check_lengths``.
    needs_true_length: the policy (oracle) reserves the true length: ``replay_output_len`` is required.
  """

  vocab_size: int
  max_model_len: int
  max_total_len: int
  check_lengths: Callable[[int, int], None]
  needs_true_length: bool = False


class InputProcessor:
  """Validates, tokenizes and checks requests; thread-safe (it keeps nothing per request)."""

  def __init__(self, tokenizer, limits: InputLimits):
    self.tokenizer = tokenizer
    self.limits = limits
    self._max_chars_per_token: int | None = None  # read from the vocabulary the first time a prompt needs it

  def prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
    """(the prompt's text or None, its token ids)."""
    vocab = self.limits.vocab_size
    if not isinstance(prompt, str):
      return None, token_ids(prompt, vocab)
    self.check_chars(prompt)
    ids = list(self.tokenizer.encode(prompt))
    # A model in memory may have a smaller vocabulary than the (default GPT-2) tokenizer: its
    # embedding lookup would clamp such an id and answer without a word of warning.
    outside = next((t for t in ids if not 0 <= t < vocab), None)
    if outside is not None:
      raise RequestError(
        "prompt",
        f"prompt: the tokenizer gives token id {outside}, outside the model's vocabulary [0, "
        f"{vocab}); pass the tokenizer the model was trained with (LLM(..., tokenizer=...))",
      )
    return prompt, ids

  def check_chars(self, text: str, param: str = "prompt") -> None:
    """Refuses, before tokenizing it, a text too long to fit whatever its tokens (tokenizing a
    20 MB prompt takes seconds and a gigabyte only to learn that it does not fit)."""
    if self._max_chars_per_token is None:
      self._max_chars_per_token = max_chars_per_token(self.tokenizer)
    limit = self.limits.max_total_len - 1
    if len(text) > limit * self._max_chars_per_token:
      raise RequestError(
        param,
        f"prompt is too long: {len(text)} characters need more than {limit} tokens, the most that "
        f"fit (model maximum {self.limits.max_model_len}, and the memory budget); shorten the prompt",
      )

  def chat_prompt_ids(self, messages: list[dict[str, str]], chat_template: str | None = None) -> list[int]:
    """``messages`` rendered by the chat template and tokenized without adding special tokens (the
    template writes those it wants)."""
    text = render_chat(self.tokenizer, messages, chat_template)
    self.check_chars(text, param="messages")
    return list(self.tokenizer.encode(text, add_special_tokens=False))

  def make_request(
    self,
    request_id: int,
    prompt: Prompt,
    params: SamplingParams,
    *,
    true_output_len: int | None = None,
    eos_at: int | None = None,
  ) -> EngineRequest:
    """The engine's record of one request; ``RequestError`` when it can never run as given."""
    if not isinstance(params, SamplingParams):
      raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    limits = self.limits
    params.validate(limits.max_model_len)
    if any(t >= limits.vocab_size for t in params.stop_token_ids):
      raise RequestError(
        "stop_token_ids",
        f"stop_token_ids must be token ids in [0, {limits.vocab_size}), got {list(params.stop_token_ids)}",
      )
    text, ids = self.prompt_ids(prompt)
    if not ids:
      raise RequestError("prompt", "prompt is empty: give at least one token of prompt")
    room = limits.max_total_len - len(ids)
    if room < 1:
      raise RequestError(
        "prompt",
        f"prompt is too long: {len(ids)} tokens, but at most {limits.max_total_len - 1} fit "
        f"(model maximum {limits.max_model_len}, and the memory budget); shorten the prompt",
      )
    max_tokens = room if params.max_tokens is None else params.max_tokens
    limits.check_lengths(len(ids), max_tokens)  # the one fit check: the scheduler's
    true_output_len = params.replay_output_len if true_output_len is None else true_output_len
    if limits.needs_true_length and true_output_len is None:
      raise RequestError(
        "replay_output_len", "policy oracle reserves each answer's true length: give replay_output_len"
      )
    return EngineRequest(
      request_id=request_id,
      prompt_ids=ids,
      max_tokens=max_tokens,
      temperature=float(params.temperature),
      top_k=params.top_k,
      top_p=float(params.top_p),
      seed=params.seed if params.seed is not None else np.random.randint(2**31),
      ignore_eos=params.ignore_eos,
      stop_token_ids=frozenset(int(t) for t in params.stop_token_ids),
      logprobs=params.logprobs,
      prompt_logprobs=params.prompt_logprobs,
      prompt_text=text if text is not None else self.tokenizer.decode(ids),
      true_output_len=true_output_len,
      eos_at=params.replay_output_len if eos_at is None else eos_at,
    )
