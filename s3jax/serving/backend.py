"""What the HTTP server needs from the model it serves: ``LLM`` implements it, and so does the
fake in the server's tests (tests/serving/test_backend_protocol.py checks it has every member)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from s3jax.engine import EngineMetrics
from s3jax.engine.engine import Predictor
from s3jax.parallel.mesh import MeshShape
from s3jax.scheduler import Policy
from s3jax.serving.inputs import SamplingParams
from s3jax.serving.outputs import StreamEvent
from s3jax.supervisor.adapter import ColdStartAdapter

if TYPE_CHECKING:  # the retrainer imports Optax and Orbax (the train extra)
  from s3jax.supervisor.retrainer import OnlineRetrainer


class Backend(Protocol):
  """A thread-safe generation backend.

  ``submit`` validates synchronously (``RequestError`` names the bad field; ``QueueFullError``
  when the queue is full; RuntimeError once shutting down) and returns a request id; events then
  arrive through ``on_event`` from another thread, the last one with a finish reason. ``cancel``
  ends a request with ``FinishReason.CANCELLED``. ``decode`` and ``chat_prompt_ids`` (the chat
  template rendered and tokenized; ``RequestError`` when the template fails or the text cannot
  fit) are thread-safe too. ``metrics`` returns a snapshot safe to read on any thread.
  """

  model_name: str
  max_model_len: int
  predictor: Predictor | None  # a LengthPredictor's head, overflow target and rule are reported
  retrainer: OnlineRetrainer | None  # its statistics are exported
  adapter: ColdStartAdapter | None  # a cold-started head's observations are exported

  @property
  def policy(self) -> Policy: ...

  @property
  def memory_budget_bytes(self) -> int: ...

  @property
  def mesh_shape(self) -> MeshShape: ...

  def start(self) -> None: ...

  def shutdown(self, drain_timeout_s: float = 30.0) -> None: ...

  def is_alive(self) -> bool: ...

  def submit(
    self, prompt: str | Sequence[int], params: SamplingParams, on_event: Callable[[StreamEvent], None]
  ) -> int: ...

  def cancel(self, request_id: int) -> None: ...

  def decode(self, token_ids: Sequence[int]) -> str: ...

  def chat_prompt_ids(self, messages: list[dict[str, str]], chat_template: str | None = None) -> list[int]: ...

  def metrics(self) -> EngineMetrics: ...
