"""Host-side, length-aware scheduler: plans each iteration for the engine, never touches tensors.

``Scheduler.schedule()`` returns a ``StepPlan`` (ops, then decode); ``Scheduler.update()``
consumes the engine's ``StepResult``. ``Policy`` picks the reservation rule (MAX, S3, ORACLE)
of the same scheduler.
"""

from s3jax.scheduler.config import Policy, SchedulerConfig, parse_bytes
from s3jax.scheduler.plan import (
    Admit, Move, Op, Preempt, QueueFull, Release, ReleaseReason, Resize, SchedRequest, StepPlan,
    StepResult, arena_bytes, reserved_bytes_after_each_op)
from s3jax.scheduler.reservation import class_for, reservation_tokens, slots_for
from s3jax.scheduler.scheduler import Placement, RequestState, Scheduler, SchedulerStats
from s3jax.scheduler.supervisor_policy import Overflow, OverflowDecision, decide_overflows, resume_cache_len

__all__ = [
    "Admit", "Move", "Op", "Overflow", "OverflowDecision", "Placement", "Policy", "Preempt",
    "QueueFull", "Release", "ReleaseReason", "RequestState", "Resize", "SchedRequest", "Scheduler",
    "SchedulerConfig", "SchedulerStats", "StepPlan", "StepResult", "arena_bytes", "class_for",
    "decide_overflows", "parse_bytes", "reservation_tokens", "reserved_bytes_after_each_op",
    "resume_cache_len", "slots_for",
]
