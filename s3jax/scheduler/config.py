"""Scheduler configuration: the reservation policy, the memory budget, the arena shapes.

Plain host code (the stdlib only): the scheduler never imports JAX.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
import re


class Policy(enum.Enum):
  """How many KV tokens a request reserves when it is admitted.

  MAX reserves the model maximum whatever ``max_tokens`` says (the ORCA "Max" baseline), S3 the
  upper bound of the predicted length bucket, ORACLE the true length from a trace; those two are
  capped by the user's ``max_tokens``. One scheduler runs every comparison.
  """

  MAX = "max"
  S3 = "s3"
  ORACLE = "oracle"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerConfig:
  """Policy, budget and arena shapes of the host-side scheduler.

  Attributes:
    policy: which reservation rule admission uses (see ``Policy``).
    memory_budget_bytes: device bytes all KV arenas together may reserve, after every op.
    kv_bytes_per_token: bytes one cached token takes across all layers (keys and values).
    cache_lens: the cache-length classes S, ascending; the last one is the model's maximum
      sequence length. One arena of shape (slots, S) exists per class in use.
    slot_options: the only slot counts an arena may have, ascending, so that few shapes compile.
    max_waiting: bound on the waiting queue (``submit`` raises ``QueueFull`` beyond it); None is
      unbounded. Preempted requests re-enter the queue regardless: they were already accepted.
    starvation_limit: a waiting request bypassed more than this many times becomes head-of-line.
    max_admissions_per_step: prefills per iteration; bounds the time-to-first-token jitter of the
      requests already decoding, since every prefill delays their next token.
    shrink_idle_arenas: shrink an arena that is at most a quarter used and has nobody waiting for
      it. Decode steps compute over every slot of an arena's static shape, so empty slots cost
      time; False keeps arenas until their memory is needed (fewer resizes, more wasted compute).
  """

  policy: Policy
  memory_budget_bytes: int
  kv_bytes_per_token: int
  cache_lens: tuple[int, ...]
  slot_options: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
  max_waiting: int | None = None
  starvation_limit: int = 64
  max_admissions_per_step: int = 16
  shrink_idle_arenas: bool = True

  def __post_init__(self):
    if not isinstance(self.policy, Policy):
      raise ValueError(f"policy must be a Policy, got {self.policy!r}")
    if self.memory_budget_bytes <= 0 or self.kv_bytes_per_token <= 0:
      raise ValueError("memory_budget_bytes and kv_bytes_per_token must be positive")
    for name in ("cache_lens", "slot_options"):
      values = getattr(self, name)
      if not values or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"{name} must be positive, strictly ascending and non-empty: {values}")
    if self.max_waiting is not None and self.max_waiting < 0:
      raise ValueError("max_waiting must be >= 0 or None")
    if self.starvation_limit < 0 or self.max_admissions_per_step < 1:
      raise ValueError("starvation_limit must be >= 0 and max_admissions_per_step >= 1")

  @property
  def max_len(self) -> int:
    """The model's maximum sequence length (the largest class)."""
    return self.cache_lens[-1]

  def slot_bytes(self, cache_len: int) -> int:
    """Bytes one slot of class ``cache_len`` reserves."""
    return cache_len * self.kv_bytes_per_token

  @property
  def usable_cache_lens(self) -> tuple[int, ...]:
    """Classes whose smallest arena fits the budget; the others can never exist."""
    smallest = self.slot_options[0]
    return tuple(c for c in self.cache_lens if smallest * self.slot_bytes(c) <= self.memory_budget_bytes)


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int) -> int:
  """Parses a byte count such as ``"2GiB"``, ``"512MiB"``, ``"1.5GB"`` or ``"1000000"``.

  Decimal units (kB, MB, GB, TB) are powers of 1000 and binary ones (KiB, MiB, GiB, TiB) powers of
  1024; units are case-insensitive. The value is computed exactly (no float rounding).

  Args:
    text: the count, or an int that is returned as is.

  Returns:
    The number of bytes, a non-negative int.

  Raises:
    ValueError: on an unknown unit, a malformed number, a negative or a fractional byte count.
  """
  if isinstance(text, bool):
    raise ValueError(f"not a byte count: {text!r}")
  if isinstance(text, int):
    if text < 0:
      raise ValueError(f"byte count must be >= 0, got {text}")
    return text
  if not isinstance(text, str):
    raise ValueError(f"not a byte count: {text!r}")
  match = _BYTES_RE.match(text)
  if match is None or match.group(2).lower() not in _UNITS:
    raise ValueError(
        f"not a byte count: {text!r} (expected a number and an optional unit among "
        "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
  value = decimal.Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
  if value != value.to_integral_value():
    raise ValueError(f"{text!r} is not a whole number of bytes")
  return int(value)
