"""A roofline cost model of the engine's two device calls, per device and per pipeline stage.

Shape legend: B rows one decode computes, S KV tokens a decode's attention scans (the pool up to
its highest page in use), T tokens of one packed prefill, A prompts in it, L layers, D width,
V vocabulary, P parameters of the blocks (embeddings excluded), W bytes of all weights.

A call's work:

  decode(B, S):   FLOPs = 2 P B + 2 V D B + 4 L D S          bytes = W + S kv_bytes_per_token
  prefill(T, A):  FLOPs = 2 P T + 2 V D A + 4 L D T^2        bytes = W + T kv_bytes_per_token

(attention of a packed prefill scores every pair of its T tokens and masks across prompts, as the
engine's ``prefill_packed`` does; logits are computed at each prompt's last token only).

Its time on a device is ``overhead + max(FLOPs / F, bytes / BW)`` where compute and memory
overlap (GPUs), or ``overhead + FLOPs / F + bytes / BW`` where they do not (XLA:CPU runs one
after the other), with F and BW the device's peak times an efficiency. The CPU's numbers are
fitted to measured calls (``s3jax.sim.calibrate``); the GPUs' are data-sheet peaks times stated
efficiencies: assumptions, not measurements.

Pipeline stages: L layers split into ``stages`` contiguous stages on as many devices (the largest
holds ceil(L / stages) layers and sets the pace), the batch into as many micro-batches so that every
stage works on one at a time; an iteration (every row advances one token) is then ``stages`` ticks,
each the time of the largest stage on one micro-batch: a stage reads its share of the weights once
per micro-batch, and the KV of its layers only.
"""

from __future__ import annotations

import dataclasses

from s3jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
  """One accelerator (or this host's CPU) as the roofline sees it.

  Attributes:
    name: for tables.
    flops_per_s: effective dense FLOP/s (peak x efficiency) at the serving dtype.
    bytes_per_s: effective memory bandwidth.
    memory_bytes: device memory (HBM; for the CPU, what the benchmarks budget).
    call_overhead_s: fixed time per device call (launches, host dispatch, synchronisation).
    overlap: True when compute and memory traffic overlap (roofline max), False when they add.
    source: where the numbers come from.
  """

  name: str
  flops_per_s: float
  bytes_per_s: float
  memory_bytes: int
  call_overhead_s: float
  overlap: bool = True
  source: str = ""


# Data-sheet peaks (dense fp16/bf16 tensor cores; HBM) times efficiencies we assume for a tuned
# inference stack such as the paper's FasterTransformer: 60% of peak compute in large matrix
# products, 80% of peak bandwidth when streaming, and 15 us of launches per layer-step amortised as
# a call overhead of 0.4 ms. Assumptions, stated as such in BENCHMARKS.md.
A100_80GB = DeviceSpec(
  name="A100-80GB",
  flops_per_s=0.6 * 312e12,
  bytes_per_s=0.8 * 2.039e12,
  memory_bytes=80 * 10**9,
  call_overhead_s=4e-4,
  source="data sheet x assumed efficiency (0.6 compute, 0.8 bandwidth)",
)
H100_80GB = DeviceSpec(
  name="H100-80GB",
  flops_per_s=0.6 * 989e12,
  bytes_per_s=0.8 * 3.35e12,
  memory_bytes=80 * 10**9,
  call_overhead_s=3e-4,
  source="data sheet x assumed efficiency (0.6 compute, 0.8 bandwidth)",
)
GPUS = {"a100-80gb": A100_80GB, "h100-80gb": H100_80GB}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostModel:
  """Times of the engine's calls for one model on ``stages`` devices of one kind.

  Attributes:
    model: the model's shape.
    device: the device of every stage.
    dtype_bytes: bytes per weight and per cached value (2 for fp16/bf16, 4 for fp32).
    stages: pipeline stages, one device each.
  """

  model: ModelConfig
  device: DeviceSpec
  dtype_bytes: int = 2
  stages: int = 1

  def __post_init__(self):
    if not 1 <= self.stages <= self.model.n_layers:
      raise ValueError(f"{self.model.n_layers} layers do not split into {self.stages} stages")

  @property
  def stage_share(self) -> float:
    """The largest stage's share of the layers (and, as an estimate, of all work and weights)."""
    return -(-self.model.n_layers // self.stages) / self.model.n_layers

  @property
  def kv_bytes_per_token(self) -> int:
    return self.model.kv_bytes_per_token(self.dtype_bytes)

  @property
  def weight_bytes(self) -> int:
    return self.model.num_params() * self.dtype_bytes

  @property
  def block_params(self) -> int:
    """P: parameters of the decoder blocks (those every token multiplies; grouped-query k/v and
    gated MLPs counted as they are)."""
    return self.model.block_params()

  def kv_budget_bytes(self, workspace_fraction: float = 0.1) -> int:
    """KV bytes the devices hold beside the weights, keeping ``workspace_fraction`` of each device
    for activations and the runtime."""
    free = self.stages * self.device.memory_bytes * (1 - workspace_fraction) - self.weight_bytes
    if free <= 0:
      raise ValueError(f"{self.weight_bytes / 1e9:.0f} GB of weights do not fit {self.stages} x {self.device.name}")
    return int(free)

  def _time(self, flops: float, nbytes: float) -> float:
    d = self.device
    compute, memory = flops / d.flops_per_s, nbytes / d.bytes_per_s
    return d.call_overhead_s + (max(compute, memory) if d.overlap else compute + memory)

  def decode_work(self, rows: int, scanned_tokens: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode call on one device holding the whole model."""
    m = self.model
    flops = (
      2 * self.block_params * rows + 2 * m.vocab_size * m.d_model * rows + 4 * m.n_layers * m.d_model * scanned_tokens
    )
    return flops, self.weight_bytes + scanned_tokens * self.kv_bytes_per_token

  def prefill_work(self, tokens: int, prompts: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one packed prefill call of ``tokens`` (padded) tokens."""
    m = self.model
    flops = (
      2 * self.block_params * tokens
      + 2 * m.vocab_size * m.d_model * prompts
      + 4 * m.n_layers * m.d_model * tokens * tokens
    )
    return flops, self.weight_bytes + tokens * self.kv_bytes_per_token

  def decode_s(self, rows: int, scanned_tokens: int) -> float:
    """Seconds for one iteration of ``rows`` rows scanning ``scanned_tokens`` KV tokens."""
    s = self.stages
    if s == 1:
      return self._time(*self.decode_work(rows, scanned_tokens))
    # A micro-batch's next token needs its last one through all s stages: an iteration is s ticks
    # whatever the number of micro-batches (fewer than s leave stages idle).
    micro = min(s, max(rows, 1))
    flops, nbytes = self.decode_work(-(-rows // micro), scanned_tokens / micro)
    return s * self._time(flops * self.stage_share, nbytes * self.stage_share)

  def prefill_s(self, tokens: int, prompts: int) -> float:
    """Seconds for one packed prefill; across stages it passes through each one in turn."""
    flops, nbytes = self.prefill_work(tokens, prompts)
    return self.stages * self._time(flops * self.stage_share, nbytes * self.stage_share)
