"""Scheduler configuration: the policy, the memory budget, classes, pages and rows.

Plain host code (the stdlib only): the scheduler never imports JAX.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
import math
import re


class Policy(enum.Enum):
  """How admission, order and eviction decide: one scheduler, one parameter.

  Reserving policies charge each request a reservation at admission (a class of cache length,
  in pages) and admit while the reservations fit the budget; a sequence that outgrows its class
  grows into a larger one or is itself preempted (the S3 paper's supervisor):

  * MAX reserves the model maximum whatever ``max_tokens`` says (ORCA "Max"; TGI and
    TensorRT-LLM's ``GUARANTEED_NO_EVICT`` reserve prompt + ``max_new_tokens`` alike);
  * CONSTANT the same answer length for every request (``SchedulerConfig.constant_output_len``);
  * S3_RESERVE the predictor's calibrated quantile (the paper's S3, and s3jax's until v3).

  The other policies reserve nothing ahead: pages are granted as positions cross page
  boundaries, and when none is free a victim is evicted (recomputed later):

  * ON_DEMAND is vLLM v1's (``vllm/v1/core/sched/scheduler.py``): admit FCFS while the prompt's
    pages fit; the victim is the most recently admitted request; no admission in a step that
    evicted.
  * ADAPTIVE is SGLang's (``python/sglang/srt/managers/schedule_policy.py``, the new-token ratio
    of ``scheduler.py``): admission charges each running request ``min(max_tokens - generated,
    4096) x ratio``, the ratio decaying from 0.7 towards 0.098 over 600 steps and jumping back
    after an eviction; the victim has the fewest generated tokens (ties: the longest prompt).
  * S3 (v3) reads the predictor's whole distribution: admit while the predicted *peak* of the
    pool's use fits at ``admission_risk`` (``peak.py``), shortest predicted remaining first with
    aging, evict the sequence that wastes least recompute per page-step freed.
  * ORACLE is S3 with every true length known: the ceiling prediction is measured against.
  """

  MAX = "max"
  CONSTANT = "constant"
  S3_RESERVE = "s3-reserve"
  S3 = "s3"
  ORACLE = "oracle"
  ON_DEMAND = "on-demand"
  ADAPTIVE = "adaptive"

  @property
  def reserves(self) -> bool:
    """Admission charges a class of cache length; no sequence is evicted for another."""
    return self in (Policy.MAX, Policy.CONSTANT, Policy.S3_RESERVE)

  @property
  def forecasts(self) -> bool:
    """Admission, order and eviction read a length distribution (S3 and the oracle)."""
    return self in (Policy.S3, Policy.ORACLE)


class AdmissionOrder(enum.Enum):
  """Which waiting requests admission tries first (preempted ones always come first).

  FCFS: by arrival, stopping at the first that does not fit (vLLM, SGLang). PACK: the paper's
  decreasing first-fit over reservation classes, the largest first, FCFS within one; a class
  that does not fit is skipped (reserving policies only). SHORTEST_FIRST: the shortest predicted
  answer first, aged so that no request is overtaken by one that arrived more than
  ``aging_steps`` steps after it; it stops at the first that does not fit.
  """

  FCFS = "fcfs"
  PACK = "pack"
  SHORTEST_FIRST = "shortest-first"


# Powers of two and their halfway points from 8 on. Measured on gpt2-small-2k (BENCHMARKS.md):
# 11 live rows decode 8.5% faster in 12 rows than in 16, 19 live rows 15% faster in 24 than in
# 32; fewer than 4 rows save nothing (2 rows cost what 4 do) and 1 row hits XLA:CPU's slow
# matrix-vector path (252 ms against 45 ms for 4 rows).
DEFAULT_BATCH_SIZES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerConfig:
  """Policy, budget and batch shapes of the host-side scheduler (model-independent).

  Attributes:
    policy: how admission, order and eviction decide (see ``Policy``).
    memory_budget_bytes: device bytes of KV cache: the engine's page pool is exactly this big
      (rounded down to whole pages), and the pages in use never exceed it.
    constant_output_len: the answer tokens every request reserves under ``Policy.CONSTANT``
      (required by it, ignored by the others).
    admission_order: which waiting requests admission tries first (see ``AdmissionOrder``); None:
      the policy's own (PACK for reserving policies, FCFS for on-demand and adaptive,
      SHORTEST_FIRST for s3 and the oracle).
    admission_risk: s3's admission admits while the predicted peak of the pool's use fits with
      this probability of exceeding it (at each future step; an excess is an eviction, not a
      loss).
    aging_steps: under SHORTEST_FIRST a waiting request is never overtaken by one that arrived
      more than this many scheduler steps after it: the starvation bound relative to FCFS.
    min_cache_len: the shortest cache-length class. Classes grow geometrically from here up to
      the model's maximum sequence length (always a class), each rounded up to whole pages. A
      reserving policy reserves the smallest class holding the prompt and its answer length.
    classes_per_doubling: classes between a length and its double: 1 gives powers of two (a
      reservation may be almost twice what the policy asked for); the default 16 gives classes
      of whole pages, 4% apart at most. Classes shape no executable, so they cost nothing on the
      device; measured on 32 requests at a budget of 2 max-length sequences, 16 instead of 1 took
      s3 from 1,637 to 1,420 steps and the oracle from 1,673 to 1,316 (BENCHMARKS.md).
    page_size: tokens per KV page.
    max_slots: the most sequences running at once (rows of the decode batch); None: as many as
      the budget holds at the shortest class, at most 256.
    batch_sizes: rows a decode step may compute, ascending, each one compiled shape; the
      scheduler packs running sequences into the lowest rows so that the smallest batch size
      holding them is used. None: ``DEFAULT_BATCH_SIZES`` below ``max_slots``, then ``max_slots``.
    max_waiting: bound on the waiting queue (``submit`` raises ``QueueFullError`` beyond it); None is
      unbounded. Preempted requests re-enter the queue regardless: they were already accepted.
    starvation_limit: under PACK a waiting request bypassed more than this many times becomes
      head-of-line.
    max_admissions_per_step: prefills per iteration; bounds the time-to-first-token jitter of the
      requests already decoding, since every prefill delays their next token.
    max_prefill_tokens: prompt tokens prefilled per iteration at most (chunked prefill): a longer
      prompt is prefilled over several iterations, a chunk each, while the running rows go on
      decoding; one prompt at a time is chunked. Bounds the inter-token latency a long prompt
      causes the running streams. None: every admitted prompt is prefilled at once.
    prefix_caching: a prompt's full pages stay cached after it ends, and a prompt that starts with
      the same tokens (a request's ``page_hashes``) reads them instead of prefilling them
      (``pages``). Every policy counts a shared page once.
  """

  policy: Policy
  memory_budget_bytes: int
  constant_output_len: int | None = None
  admission_order: AdmissionOrder | None = None
  admission_risk: float = 0.2
  aging_steps: int = 2048
  min_cache_len: int = 128
  classes_per_doubling: int = 16
  page_size: int = 64
  max_slots: int | None = None
  batch_sizes: tuple[int, ...] | None = None
  max_waiting: int | None = None
  starvation_limit: int = 64
  max_admissions_per_step: int = 16
  max_prefill_tokens: int | None = None
  prefix_caching: bool = True

  def __post_init__(self):
    if not isinstance(self.policy, Policy):
      raise ValueError(f"policy must be a Policy, got {self.policy!r}")
    if (self.policy is Policy.CONSTANT) != (self.constant_output_len is not None):
      raise ValueError(
        "constant_output_len is set exactly when policy is 'constant' (the answer tokens it "
        f"reserves for every request); got policy {self.policy.value!r}, "
        f"constant_output_len={self.constant_output_len!r}"
      )
    if self.constant_output_len is not None and self.constant_output_len < 1:
      raise ValueError(f"constant_output_len must be >= 1, got {self.constant_output_len}")
    order = self.admission_order
    if order is not None and not isinstance(order, AdmissionOrder):
      raise ValueError(f"admission_order must be an AdmissionOrder, got {order!r}")
    if order is AdmissionOrder.PACK and not self.policy.reserves:
      raise ValueError(f"admission order 'pack' packs reservations: policy {self.policy.value!r} reserves none")
    if order is AdmissionOrder.SHORTEST_FIRST and self.policy in (Policy.ON_DEMAND, Policy.ADAPTIVE):
      raise ValueError(
        f"admission order 'shortest-first' needs a predicted length: policy {self.policy.value!r} has none"
      )
    if not 0.0 < self.admission_risk < 1.0:
      raise ValueError(f"admission_risk must be in (0, 1), got {self.admission_risk}")
    if self.aging_steps < 0:
      raise ValueError(f"aging_steps must be >= 0, got {self.aging_steps}")
    if self.memory_budget_bytes <= 0:
      raise ValueError("memory_budget_bytes must be positive")
    if self.page_size < 1 or self.min_cache_len < 1 or self.min_cache_len % self.page_size:
      raise ValueError(
        f"min_cache_len ({self.min_cache_len}) must be a positive multiple of page_size ({self.page_size})"
      )
    if self.classes_per_doubling < 1:
      raise ValueError(f"classes_per_doubling must be >= 1, got {self.classes_per_doubling}")
    if self.max_slots is not None and self.max_slots < 1:
      raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
    sizes = self.batch_sizes
    if sizes is not None and (not sizes or sizes[0] < 1 or list(sizes) != sorted(set(sizes))):
      raise ValueError(f"batch_sizes must be positive, strictly ascending and non-empty: {sizes}")
    if self.max_waiting is not None and self.max_waiting < 0:
      raise ValueError("max_waiting must be >= 0 or None")
    if self.starvation_limit < 0 or self.max_admissions_per_step < 1:
      raise ValueError("starvation_limit must be >= 0 and max_admissions_per_step >= 1")
    if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
      raise ValueError(f"max_prefill_tokens must be >= 1 or None (no chunking), got {self.max_prefill_tokens}")

  @property
  def order(self) -> AdmissionOrder:
    """The admission order in effect (``admission_order``, or the policy's own)."""
    if self.admission_order is not None:
      return self.admission_order
    if self.policy.reserves:
      return AdmissionOrder.PACK
    return AdmissionOrder.SHORTEST_FIRST if self.policy.forecasts else AdmissionOrder.FCFS

  def layout(self, *, kv_bytes_per_token: int, max_len: int) -> "MemoryLayout":
    """What this budget means for a model with these KV bytes and maximum sequence length."""
    if kv_bytes_per_token <= 0 or max_len < 1:
      raise ValueError("kv_bytes_per_token and max_len must be positive")
    classes, k = [], 0
    while (n := self.min_cache_len * 2 ** (k / self.classes_per_doubling)) < max_len:
      classes.append(-(-math.ceil(n - 1e-9) // self.page_size) * self.page_size)  # whole pages
      k += 1
    classes = sorted(set(c for c in classes if c < max_len))
    num_pages = self.memory_budget_bytes // (self.page_size * kv_bytes_per_token)
    max_slots = self.max_slots or max(1, min(256, num_pages * self.page_size // self.min_cache_len))
    sizes = self.batch_sizes
    if sizes is None:
      sizes = tuple(b for b in DEFAULT_BATCH_SIZES if b < max_slots) + (max_slots,)
    elif sizes[-1] != max_slots:
      raise ValueError(f"the largest batch size ({sizes[-1]}) must equal max_slots ({max_slots})")
    return MemoryLayout(
      kv_bytes_per_token=kv_bytes_per_token,
      page_size=self.page_size,
      num_pages=num_pages,
      cache_lens=tuple(classes) + (max_len,),
      batch_sizes=tuple(sizes),
    )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MemoryLayout:
  """The budget in pages and rows, for one model.

  Attributes:
    kv_bytes_per_token: bytes one cached token takes across all layers (keys and values).
    page_size: tokens per page.
    num_pages: pages the budget holds (the pool).
    cache_lens: the classes, ascending; the last one is the model's maximum sequence length.
    batch_sizes: rows a decode step may compute, ascending; the last one is the number of rows.
  """

  kv_bytes_per_token: int
  page_size: int
  num_pages: int
  cache_lens: tuple[int, ...]
  batch_sizes: tuple[int, ...]

  @property
  def max_slots(self) -> int:
    return self.batch_sizes[-1]

  @property
  def max_len(self) -> int:
    """The model's maximum sequence length (the largest class)."""
    return self.cache_lens[-1]

  @property
  def page_bytes(self) -> int:
    return self.page_size * self.kv_bytes_per_token

  def pages_for(self, cache_len: int) -> int:
    """Pages a reservation of class ``cache_len`` takes."""
    return -(-cache_len // self.page_size)

  @property
  def usable_cache_lens(self) -> tuple[int, ...]:
    """Classes of which one reservation fits the budget; the others can never be reserved."""
    return tuple(c for c in self.cache_lens if self.pages_for(c) <= self.num_pages)

  def batch_size_for(self, rows: int) -> int:
    """The smallest batch size holding ``rows`` rows."""
    return next(b for b in self.batch_sizes if b >= rows)


_UNITS = {
  "": 1,
  "b": 1,
  "k": 10**3,
  "kb": 10**3,
  "kib": 2**10,
  "m": 10**6,
  "mb": 10**6,
  "mib": 2**20,
  "g": 10**9,
  "gb": 10**9,
  "gib": 2**30,
  "t": 10**12,
  "tb": 10**12,
  "tib": 2**40,
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
      f"not a byte count: {text!r} (expected a number and an optional unit among B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
    )
  value = decimal.Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
  if value != value.to_integral_value():
    raise ValueError(f"{text!r} is not a whole number of bytes")
  return int(value)


def check_budget(config: SchedulerConfig, layout: MemoryLayout) -> None:
  """Raises ValueError unless ``config``'s budget holds one sequence of its policy."""
  if not layout.usable_cache_lens:
    raise ValueError(
      f"memory budget of {config.memory_budget_bytes} bytes holds no sequence: the shortest class "
      f"({layout.cache_lens[0]} tokens) needs {_reservation_bytes(layout, layout.cache_lens[0])} "
      f"bytes; raise it"
    )
  if config.policy is Policy.MAX and layout.max_len not in layout.usable_cache_lens:
    raise ValueError(
      f"policy 'max' reserves {layout.max_len} tokens per request, and one such reservation needs "
      f"{_reservation_bytes(layout, layout.max_len)} bytes: more than the memory budget of "
      f"{config.memory_budget_bytes}; raise the budget or use policy 's3'"
    )


def _reservation_bytes(layout: MemoryLayout, cache_len: int) -> int:
  return layout.pages_for(cache_len) * layout.page_bytes
