"""One request's record from submission to finish, and why it finished."""

from __future__ import annotations

import dataclasses
import enum

from s3jax.scheduler import LengthDist


class FinishReason(enum.Enum):
  """Why an answer ended (the values are OpenAI's ``finish_reason`` strings)."""

  STOP = "stop"  # end-of-text, or a stop string found by the serving layer
  LENGTH = "length"  # max_tokens reached
  CANCELLED = "cancelled"  # the caller cancelled it, or the client went away
  ERROR = "error"  # the engine failed while it was in flight


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprobs:
  """One answer token's log-probability under the model, and its most likely alternatives'."""

  token: int
  logprob: float
  top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclasses.dataclass(kw_only=True, eq=False)
class EngineRequest:
  """One request's host-side state.

  ``true_output_len`` is what the oracle policy reserves for (a trace's true length).
  ``eos_at`` replays a trace with random weights, which never emit EOS: the answer ends after
  that many tokens as if EOS had been sampled. The scheduler never sees ``eos_at``, so no policy
  learns the length from it. ``prompt_text`` is what the length predictor reads (and what the
  misprediction log keeps for retraining it); a request that comes with its prediction needs none.

  ``max_tokens=0`` asks for no answer: the prompt is prefilled only to score it (with
  ``prompt_logprobs``), writes no KV and takes no memory from the budget.

  The engine fills in the fields below the line as the request runs; its caller learns of new
  tokens and of the finish from the ``EngineOutput``s that ``Engine.step`` returns, never by a
  call from the engine.
  """

  request_id: int
  prompt_ids: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  ignore_eos: bool = False
  stop_token_ids: frozenset[int] = frozenset()  # end the answer like EOS (even with ignore_eos)
  logprobs: int | None = None  # None: no log-probabilities; k: each token's and its k top alternatives'
  prompt_logprobs: int | None = None  # the same for each prompt token (k <= MAX_PROMPT_LOGPROBS)
  prompt_text: str | None = None
  predicted_bucket: int | None = None
  predicted_output_len: int | None = None
  predicted_length: LengthDist | None = None  # the predictor's distribution (policy s3)
  true_output_len: int | None = None
  eos_at: int | None = None
  # Filled in by the engine.
  output_ids: list[int] = dataclasses.field(default_factory=list)
  output_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # with ``logprobs`` set
  # With ``prompt_logprobs`` set, once the prefill scored the prompt: one per prompt token, None for the first.
  prompt_token_logprobs: list[TokenLogprobs | None] | None = None
  finish_reason: FinishReason | None = None
  error: Exception | None = None  # why it ended with FinishReason.ERROR
  submitted_at: float = 0.0
  first_token_at: float | None = None
  finished_at: float | None = None
  grows: int = 0  # growths into a larger class (reserving policies)
  preemptions: int = 0
  reserved_tokens: int = 0  # the cache length held for it (prompt included); 0 while preempted


@dataclasses.dataclass(frozen=True, slots=True)
class EngineOutput:
  """What one ``Engine.step`` gave one request: the tokens new in that step, and its finish.

  ``request`` is the engine's record itself: read its totals (``output_ids``, ``grows``, the
  timestamps) once ``finish_reason`` is set, when the engine no longer writes to it.
  """

  request: EngineRequest
  token_ids: tuple[int, ...] = ()
  logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked for them
  finish_reason: FinishReason | None = None
  prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None  # with the request's first output, when asked

  @property
  def request_id(self) -> int:
    return self.request.request_id
