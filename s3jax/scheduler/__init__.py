"""Host-side, length-aware scheduler: plans each iteration for the engine, never touches tensors.

``Scheduler.schedule()`` returns a ``StepPlan`` (ops, the rows to decode, the pages granted);
``Scheduler.update()`` consumes the engine's ``StepResult``. ``Policy`` picks how the same
scheduler admits, orders and evicts: the reserving baselines (MAX, CONSTANT, S3_RESERVE), the
predictor-free peers (ON_DEMAND: vLLM's, ADAPTIVE: SGLang's), and S3 and ORACLE, which forecast
the pool's use from length distributions (``LengthDist``).
"""

from s3jax.scheduler.config import (
  DEFAULT_BATCH_SIZES,
  AdmissionOrder,
  MemoryLayout,
  Policy,
  SchedulerConfig,
  parse_bytes,
)
from s3jax.scheduler.length import LengthDist
from s3jax.scheduler.pages import PageAllocator, prefix_hashes
from s3jax.scheduler.plan import (
  Admit,
  Grant,
  Grow,
  MoveRow,
  Op,
  Preempt,
  PrefillChunk,
  Release,
  ReleaseReason,
  SchedRequest,
  StepPlan,
  StepResult,
)
from s3jax.scheduler.reservation import class_for, reservation_tokens
from s3jax.scheduler.scheduler import Scheduler
from s3jax.scheduler.sequence import RequestState, SchedulerStats
from s3jax.scheduler.supervisor_policy import Overflow, OverflowDecision, decide_overflows, resume_cache_len

__all__ = [
  "DEFAULT_BATCH_SIZES",
  "AdmissionOrder",
  "Admit",
  "Grant",
  "Grow",
  "LengthDist",
  "MemoryLayout",
  "MoveRow",
  "Op",
  "Overflow",
  "OverflowDecision",
  "PageAllocator",
  "prefix_hashes",
  "Policy",
  "Preempt",
  "PrefillChunk",
  "Release",
  "ReleaseReason",
  "RequestState",
  "SchedRequest",
  "Scheduler",
  "SchedulerConfig",
  "SchedulerStats",
  "StepPlan",
  "StepResult",
  "class_for",
  "decide_overflows",
  "parse_bytes",
  "reservation_tokens",
  "resume_cache_len",
]
