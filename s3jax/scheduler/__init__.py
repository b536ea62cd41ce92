"""Host-side, length-aware scheduler: plans each iteration for the engine, never touches tensors.

``Scheduler.schedule()`` returns a ``StepPlan`` (ops, then the rows to decode);
``Scheduler.update()`` consumes the engine's ``StepResult``. ``Policy`` picks the reservation rule
(MAX, S3, ORACLE, CONSTANT) of the same scheduler.
"""

from s3jax.scheduler.config import (
  DEFAULT_BATCH_SIZES,
  AdmissionOrder,
  MemoryLayout,
  Policy,
  SchedulerConfig,
  parse_bytes,
)
from s3jax.scheduler.plan import (
  Admit,
  Grow,
  MoveRow,
  Op,
  Preempt,
  QueueFull,
  Release,
  ReleaseReason,
  SchedRequest,
  StepPlan,
  StepResult,
)
from s3jax.scheduler.reservation import class_for, reservation_tokens
from s3jax.scheduler.scheduler import Placement, RequestState, Scheduler, SchedulerStats
from s3jax.scheduler.supervisor_policy import Overflow, OverflowDecision, decide_overflows, resume_cache_len

__all__ = [
  "DEFAULT_BATCH_SIZES",
  "AdmissionOrder",
  "Admit",
  "Grow",
  "MemoryLayout",
  "MoveRow",
  "Op",
  "Overflow",
  "OverflowDecision",
  "Placement",
  "Policy",
  "Preempt",
  "QueueFull",
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
