"""Engine configuration: the scheduler's settings plus the device path's."""

from __future__ import annotations

import dataclasses

from s3jax.scheduler import AdmissionOrder, Policy, SchedulerConfig, parse_bytes


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
  """How the engine schedules and runs.

  Attributes:
    scheduler: policy, budget, classes, pages and rows (see ``SchedulerConfig``).
    pipeline_depth: iterations dispatched before their tokens are read: 1 reads each iteration's
      tokens while the next one runs (the device never waits for the host); 0 reads them at once.
    prefill_pack_tokens: prompts are packed into one prefill call up to this many tokens (a
      longer prompt gets a call of its own); attention cost in a pack grows with its square.
    min_prefill_len: the shortest prefill pack; pack lengths are powers of two from here up to
      the model's maximum, each one compiled shape.
    scan_chunk_pages: pages a decode's attention scans per loop iteration: it scans whole chunks
      up to the highest page in use.
    misprediction_log_size: most recent length observations kept for retraining.
    record_plans: keep every ``StepPlan`` in ``Engine.plans`` (tests, the simulator's check);
      off in serving, where the list would only grow.
  """

  scheduler: SchedulerConfig
  pipeline_depth: int = 1
  prefill_pack_tokens: int = 512
  min_prefill_len: int = 32
  scan_chunk_pages: int = 8
  misprediction_log_size: int = 10_000
  record_plans: bool = False

  def __post_init__(self):
    if self.pipeline_depth not in (0, 1):
      raise ValueError(f"pipeline_depth must be 0 or 1, got {self.pipeline_depth}")
    if self.prefill_pack_tokens < 1 or self.min_prefill_len < 1 or self.scan_chunk_pages < 1:
      raise ValueError("prefill_pack_tokens, min_prefill_len and scan_chunk_pages must be >= 1")

  @property
  def policy(self) -> Policy:
    return self.scheduler.policy

  @property
  def memory_budget_bytes(self) -> int:
    return self.scheduler.memory_budget_bytes

  @classmethod
  def create(
    cls, *, policy: str | Policy = Policy.S3, memory_budget: str | int = "512MiB", **options
  ) -> "EngineConfig":
    """Builds a config from user-facing values (``policy="s3"``, ``memory_budget="2GiB"``,
    ``admission_order="shortest-first"``); other keyword arguments go to whichever of
    ``EngineConfig`` and ``SchedulerConfig`` has the field."""
    if not isinstance(policy, Policy):
      try:
        policy = Policy(policy)
      except ValueError:
        raise ValueError(f"unknown policy {policy!r}; choose one of {[p.value for p in Policy]}") from None
    if isinstance(options.get("admission_order"), str):
      try:
        options["admission_order"] = AdmissionOrder(options["admission_order"])
      except ValueError:
        raise ValueError(
          f"unknown admission_order {options['admission_order']!r}; choose one of {[a.value for a in AdmissionOrder]}"
        ) from None
    engine_fields = {f.name for f in dataclasses.fields(cls)} - {"scheduler"}
    scheduler_fields = {f.name for f in dataclasses.fields(SchedulerConfig)} - {"policy", "memory_budget_bytes"}
    unknown = set(options) - engine_fields - scheduler_fields
    if unknown:
      raise ValueError(f"unknown engine options {sorted(unknown)}; known: {sorted(engine_fields | scheduler_fields)}")
    scheduler = SchedulerConfig(
      policy=policy,
      memory_budget_bytes=parse_bytes(memory_budget),
      **{k: v for k, v in options.items() if k in scheduler_fields},
    )
    return cls(scheduler=scheduler, **{k: v for k, v in options.items() if k in engine_fields})
