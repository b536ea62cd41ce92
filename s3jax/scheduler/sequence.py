"""The scheduler's record of one request, its counters, and the forecast a request contributes."""

from __future__ import annotations

import dataclasses
import enum

from s3jax.errors import RequestError
from s3jax.scheduler.config import Policy
from s3jax.scheduler.length import LengthDist
from s3jax.scheduler.peak import SeqForecast
from s3jax.scheduler.plan import Admit, SchedRequest


class RequestState(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"


@dataclasses.dataclass(slots=True)
class SchedulerStats:
  """Counters since construction (overhead of the supervisor included)."""

  admissions: int = 0  # prefills, fresh and resumed
  resumes: int = 0
  preemptions: int = 0  # evictions of running sequences, by the supervisor or for a page
  grows: int = 0  # re-bucketings into a larger class (no copy)
  mispredictions: int = 0  # requests that outgrew their reservation or outlived their prediction
  recomputed_tokens: int = 0  # KV positions computed again by resumed prefills
  prefill_chunks: int = 0  # chunks of prompts prefilled over several iterations (the last one included)
  prefill_tokens: int = 0  # tokens of admitted sequences' prefills, cached prefixes included
  cached_tokens: int = 0  # of them, those read from cached prefix pages instead of prefilled
  holds: int = 0  # row-steps paused for want of a page (s3, oracle), instead of an eviction
  row_moves: int = 0
  finished: int = 0
  cancelled: int = 0
  max_bypass: int = 0  # PACK: the most times any waiting request was bypassed in one waiting period
  head_of_line_admissions: int = 0  # PACK: admissions of starving requests


@dataclasses.dataclass(slots=True, eq=False)
class Seq:
  """A request as the scheduler tracks it, waiting or running (identity, not value, equality)."""

  req: SchedRequest
  arrival: int  # submission order; kept across preemptions
  key: tuple  # the admission order's sort key while waiting fresh
  length: LengthDist | None  # what s3 and the oracle forecast with
  fresh_class: int  # a reserving policy's class for it
  total_len: int  # prompt + planned tokens (in-flight ones included)
  state: RequestState = RequestState.WAITING
  cache_len: int = 0  # reserving policies, while running: the class reserved
  slot: int = 0  # while running
  pages: list[int] = dataclasses.field(default_factory=list)  # while running, in logical order
  admitted: int = 0  # sequence number of its latest admission
  preempted: bool = False  # waiting to resume
  preempted_at: int = 0  # the step of its latest preemption
  outgrown: int = 0  # reserving policies, after a preemption: the class it outgrew
  held_steps: int = 0  # consecutive steps paused for want of a page
  bypassed: int = 0
  mispredicted: bool = False
  # While its prompt is prefilled in chunks: the ``Admit`` its last chunk emits, and the tokens
  # prefilled so far.
  chunked: Admit | None = None
  prefilled: int = 0
  hits: list[int] = dataclasses.field(default_factory=list)  # admitted this step: the cached pages it reads

  @property
  def prefilling(self) -> bool:
    return self.chunked is not None

  @property
  def generated(self) -> int:
    return self.total_len - self.req.prompt_len

  def forecast(self, shared_pages: int = 0) -> SeqForecast:
    """Its forecast as it will be after this step: one token more, running or admitted;
    ``shared_pages`` of its pages are counted as shared."""
    return SeqForecast(
      tokens=self.total_len + 1,
      generated=self.generated + 1,
      max_tokens=self.req.max_tokens,
      length=self.length,
      shared_pages=shared_pages,
    )


def length_for(policy: Policy, req: SchedRequest) -> LengthDist | None:
  """The length distribution a forecasting policy plans with: the true length (oracle) or the
  predictor's (s3); None for the others."""
  if policy is Policy.ORACLE:
    if req.true_output_len is None or req.true_output_len < 0:
      raise RequestError(
        "replay_output_len", f"policy oracle needs a non-negative true_output_len, got {req.true_output_len!r}"
      )
    return LengthDist.exact(req.true_output_len)
  if policy is Policy.S3:
    if req.predicted_length is None:
      raise RequestError(None, "policy s3 needs the predictor's predicted_length distribution")
    return req.predicted_length
  return None
