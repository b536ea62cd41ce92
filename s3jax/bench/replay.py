"""Replays a trace through the engine: one policy, all requests at once, every step recorded.

With random weights each answer ends through ``eos_at`` (the trace's length, invisible to the
scheduler) and greedy decoding makes every policy's tokens comparable request by request. Every
request asks for as many tokens as the model holds (``max_tokens`` = the room its prompt leaves),
so ``max`` reserves the model's maximum, ``s3`` the predicted length and ``oracle`` the
true length: the paper's comparison. With a real model (``ModelAnswers``) each answer ends where
the model ends it, sampled with a seed per request, so policies stay comparable too.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import time
from collections.abc import Sequence

from s3jax.bench.trace import Trace
from s3jax.engine import Engine, EngineConfig, EngineMetrics, EngineRequest
from s3jax.executor.runner import ModelRunner, xla_compilations
from s3jax.executor.step_state import StepShapes
from s3jax.stats import StepSample, goodput, latency_percentiles


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelAnswers:
  """Answers a real model ends itself (its end token), not ``eos_at``.

  Attributes:
    max_tokens: the longest answer (the room a prompt leaves, if less): what ``max`` reserves.
    temperature, top_p: sampling (temperature 0: greedy).
    seeds: request i samples with ``seeds[i]`` (reproducible whatever batch it runs in).
  """

  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seeds: Sequence[int] | None = None


@dataclasses.dataclass(kw_only=True)
class ReplayRun:
  """One timed replay of one policy."""

  policy: str
  wall_s: float
  cpu_s: float
  steal_s: float | None  # CPU seconds the hypervisor gave other machines meanwhile (Linux), all cores
  requests: list[EngineRequest]
  metrics: EngineMetrics
  timeline: list[StepSample]
  xla_compilations: int  # inside the timed run: 0 when the warm-up covered everything
  warmup_built: int
  shapes: StepShapes

  @property
  def output_tokens(self) -> int:
    return sum(len(r.output_ids) for r in self.requests)

  def goodput(self, slo: dict[str, float]) -> float:
    """Requests per second of this run that met every SLO (``s3jax.stats.goodput``)."""
    reqs = self.requests
    return goodput(
      [r.submitted_at for r in reqs],
      [r.first_token_at for r in reqs],
      [r.finished_at for r in reqs],
      [len(r.output_ids) for r in reqs],
      self.wall_s,
      slo,
    )

  def summary(self) -> dict:
    m, reqs = self.metrics, self.requests
    return {
      "policy": self.policy,
      "wall_s": self.wall_s,
      "cpu_s": self.cpu_s,
      "steal_s": self.steal_s,
      "output_tokens": self.output_tokens,
      "tokens_per_s": self.output_tokens / self.wall_s,
      "requests_per_s": len(reqs) / self.wall_s,
      "tokens_per_cpu_s": self.output_tokens / self.cpu_s,
      "steps": m.steps,
      "mean_batch": m.mean_batch_size,
      "max_batch": m.max_batch_size,
      "mean_context": m.mean_context,
      "slot_occupancy": m.slot_occupancy,
      "mean_rows_computed": m.decoded_rows / max(m.steps, 1),
      "mean_pages_scanned": m.scanned_pages / max(m.steps, 1),
      "prefill_calls": m.prefill_calls,
      "prefill_tokens": m.prefill_tokens,
      "peak_reserved_bytes": m.peak_reserved_bytes,
      "peak_used_bytes": m.peak_used_bytes,
      "device_bytes": m.device_bytes,
      "budget_bytes": m.budget_bytes,
      "host_wait_s": m.host_wait_s,
      "mispredictions": m.mispredictions,
      "overflow_rate": m.mispredictions / len(reqs),
      "grows": m.grows,
      "preemptions": m.preemptions,
      "recomputed_tokens": m.recomputed_tokens,
      "holds": m.holds,
      "row_moves": m.scheduler.row_moves,
      "xla_compilations_in_timed_run": self.xla_compilations,
      "warmup_built": self.warmup_built,
      **latency_percentiles(
        [r.submitted_at for r in reqs],
        [r.first_token_at for r in reqs],
        [r.finished_at for r in reqs],
        [len(r.output_ids) for r in reqs],
      ),
      "finish_reasons": {
        reason.value: sum(r.finish_reason is reason for r in reqs) for reason in {r.finish_reason for r in reqs}
      },
    }


def replay(
  runner: ModelRunner,
  config: EngineConfig,
  trace: Trace,
  prompt_ids: Sequence[list[int]],
  *,
  eos_at: Sequence[int] | None = None,
  predictor=None,
  arrivals_s: Sequence[float] | None = None,
  retrainer=None,
  answers: ModelAnswers | None = None,
  progress: bool = False,
) -> ReplayRun:
  """Warms a fresh engine up (untimed), then replays the requests of ``trace`` (timed): all at once,
  or each at its time in ``arrivals_s`` (online).

  Args:
    runner: shared by every policy: the same weights, and its executables compile once.
    config: the policy, budget and shapes.
    trace: prompts and true lengths.
    prompt_ids: the prompts tokenized for the served model.
    eos_at: where each answer ends (default: the trace's lengths); unused with ``answers``.
    predictor: the length predictor (the s3 policy), run on the engine thread inside the timed run.
    arrivals_s: seconds after the start at which each request arrives (None: all at the start).
    retrainer: an ``OnlineRetrainer`` of ``predictor``, attached to the engine and running on its
      own thread during the timed run (None: the predictor never changes).
    answers: a real model's answers, ended by the model (``trace.output_lens`` is then only what
      ``oracle`` reserves); None: random weights, each answer ended at ``eos_at``.
    progress: show a progress bar of finished requests.
  """
  engine = Engine(runner, config, predictor)
  built = engine.warmup()
  if retrainer is not None:
    retrainer.attach(engine)
    retrainer.warmup()
    retrainer.start()
  eos_at = trace.output_lens if eos_at is None else eos_at
  limit = engine.max_total_len
  requests = [
    EngineRequest(
      request_id=i,
      prompt_ids=list(ids),
      max_tokens=limit - len(ids),
      ignore_eos=True,
      prompt_text=text,
      true_output_len=int(n),
      eos_at=int(e),
    )
    if answers is None
    else EngineRequest(
      request_id=i,
      prompt_ids=list(ids),
      max_tokens=min(answers.max_tokens, limit - len(ids)),
      temperature=answers.temperature,
      top_p=answers.top_p,
      seed=0 if answers.seeds is None else int(answers.seeds[i]),
      prompt_text=text,
      true_output_len=int(n),
    )
    for i, (ids, text, n, e) in enumerate(zip(prompt_ids, trace.prompts, trace.output_lens, eos_at))
  ]
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(requests), desc=f"{config.policy.value}", unit="req")
  timeline: list[StepSample] = []
  arrivals = [0.0] * len(requests) if arrivals_s is None else list(arrivals_s)
  pending = collections.deque(sorted(range(len(requests)), key=arrivals.__getitem__))
  s0 = stolen_cpu_s()  # before the clock starts: reading /proc/stat must not delay the first arrivals
  xla0, t0, c0 = xla_compilations(), time.perf_counter(), time.process_time()
  finished = 0
  while pending or engine.has_work:
    now = time.perf_counter() - t0
    while pending and arrivals[pending[0]] <= now:
      engine.submit(requests[pending.popleft()])
    if not engine.has_work:
      time.sleep(max(0.0, arrivals[pending[0]] - now))  # idle until the next arrival
      continue
    engine.step()
    sched = engine.scheduler
    timeline.append(
      StepSample(
        t_s=time.perf_counter() - t0,
        running=sched.num_running,
        waiting=engine.num_waiting,
        reserved_bytes=sched.reserved_bytes,
        used_bytes=engine.metrics.used_bytes,
      )
    )
    if bar is not None:
      done = sum(r.finish_reason is not None for r in requests)
      bar.update(done - finished)
      finished = done
  wall, cpu, s1 = time.perf_counter() - t0, time.process_time() - c0, stolen_cpu_s()
  if retrainer is not None:
    retrainer.stop()
  if bar is not None:
    bar.close()
  return ReplayRun(
    policy=config.policy.value,
    wall_s=wall,
    cpu_s=cpu,
    steal_s=None if s0 is None or s1 is None else s1 - s0,
    requests=requests,
    metrics=engine.snapshot(),
    timeline=timeline,
    xla_compilations=xla_compilations() - xla0,
    warmup_built=built,
    shapes=engine.shapes,
  )


def stolen_cpu_s() -> float | None:
  """CPU seconds stolen from this virtual machine since boot, all cores (``/proc/stat``): a noisy
  neighbour's share, which slows a timed run without showing in its own CPU time. None off Linux."""
  try:
    fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return None


def compare_tokens(runs: dict[str, ReplayRun]) -> dict:
  """Per request, whether every policy produced the same tokens (greedy, or sampled with its seed)."""
  names = list(runs)
  ref = runs[names[0]].requests
  differing = []
  for i, request in enumerate(ref):
    others = [p for p in names[1:] if runs[p].requests[i].output_ids != request.output_ids]
    if others:
      differing.append({"request": i, "policies": others})
  return {"reference": names[0], "requests": len(ref), "identical": len(ref) - len(differing), "differing": differing}
