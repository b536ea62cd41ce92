"""Engine configuration: policy, memory budget and the static shapes it may compile."""

from __future__ import annotations

import dataclasses

from s3jax.scheduler import Policy, parse_bytes


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
  """How the engine sizes and schedules its KV arenas.

  Attributes:
    policy: reservation policy (``Policy.S3``, ``Policy.MAX``, ``Policy.ORACLE``).
    memory_budget_bytes: device bytes all KV arenas together may take.
    min_cache_len: the shortest arena class. Classes are powers of two from
      here up to the model's maximum sequence length (which is always a class):
      few classes keep compiled shapes few, and each decode step reads the
      weights once per arena, so on memory-bound hardware fewer, fuller
      arenas decode faster than many small ones.
    slot_options: arena slot counts allowed (each is one compiled shape).
    max_waiting: bound on queued requests (None: unbounded).
    starvation_limit: bypasses after which a waiting request is head-of-line.
    max_admissions_per_step: prefills per iteration.
    misprediction_log_size: most recent overflow records kept for retraining.
  """

  policy: Policy = Policy.S3
  memory_budget_bytes: int = 512 * 2**20
  min_cache_len: int = 128
  slot_options: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
  max_waiting: int | None = None
  starvation_limit: int = 64
  max_admissions_per_step: int = 16
  misprediction_log_size: int = 10_000

  @classmethod
  def create(cls, *, policy: str | Policy = Policy.S3, memory_budget: str | int = "512MiB", **kwargs) -> "EngineConfig":
    """Builds a config from user-facing values (``policy="s3"``, ``memory_budget="2GiB"``)."""
    if not isinstance(policy, Policy):
      try:
        policy = Policy(policy)
      except ValueError:
        raise ValueError(f"unknown policy {policy!r}; choose one of {[p.value for p in Policy]}") from None
    return cls(policy=policy, memory_budget_bytes=parse_bytes(memory_budget), **kwargs)

  def cache_lens(self, max_seq_len: int) -> tuple[int, ...]:
    lens, n = [], self.min_cache_len
    while n < max_seq_len:
      lens.append(n)
      n *= 2
    return tuple(lens) + (max_seq_len,)
