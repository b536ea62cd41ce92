"""Fits this CPU's ``DeviceSpec`` to the engine's own executables, timed one call at a time.

Decode calls at several batch sizes and cache lengths, prefill calls at several packed lengths,
each through the same executables the engine runs (in the engine's pool of a given budget); then
a least-squares fit, with non-negative coefficients, of ``time = overhead + FLOPs / F + bytes /
BW`` (XLA:CPU does not overlap compute and memory traffic). One caveat: every call streams all
the weights, so for one model the per-call overhead and the weights' share of the bandwidth term
cannot be told apart; the fitted device is exact for the model it was fitted on and a roofline
estimate for others.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time
from collections.abc import Sequence

import jax
import numpy as np
from scipy.optimize import nnls

from s3jax.executor.decode_ceiling import decode_tokens_per_s
from s3jax.executor.runner import ModelRunner
from s3jax.executor.step_state import Admission, PrefillPack, StepShapes
from s3jax.sim.cost import CostModel, DeviceSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallTiming:
  """One measured call: what it computed and how long it took (median)."""

  kind: str  # "decode" or "prefill"
  rows: int  # decode: rows computed; prefill: prompts
  tokens: int  # decode: KV tokens scanned; prefill: padded tokens
  seconds: float


def time_decodes(
  runner: ModelRunner, shapes: StepShapes, grid: Sequence[tuple[int, int]], steps: int = 8, progress=None
) -> list[CallTiming]:
  """Decode calls of ``batch`` rows of ``context`` tokens, for each ``(batch, context)`` of ``grid``."""
  out = []
  for batch, context in grid:
    rate = decode_tokens_per_s(runner, batch, context, steps=steps, repeats=3, shapes=shapes)
    pages = batch * -(-(context + steps * 2) // shapes.page_size)  # mid-run, as the timed steps saw it
    scanned = min(shapes.chunks_for(pages) * shapes.scan_chunk, shapes.num_pages) * shapes.page_size
    out.append(CallTiming(kind="decode", rows=batch, tokens=scanned, seconds=batch / rate))
    progress and progress()
  return out


def time_prefills(
  runner: ModelRunner, shapes: StepShapes, lengths: Sequence[int], repeats: int = 5, progress=None
) -> list[CallTiming]:
  """One packed prefill call per length (one prompt filling it)."""
  out = []
  for length in lengths:
    pages = list(range(-(-length // shapes.page_size)))
    pack = PrefillPack.from_host(shapes, [Admission(tokens=[0] * length, pages=pages, row=0)])
    state = jax.block_until_ready(runner.prefill(shapes, runner.init_state(shapes), pack))  # compiles, untimed
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state = jax.block_until_ready(runner.prefill(shapes, state, pack))  # the state is donated: keep the new one
      times.append(time.perf_counter() - t0)
    out.append(CallTiming(kind="prefill", rows=1, tokens=length, seconds=statistics.median(times)))
    progress and progress()
  return out


def fit_device(cost: CostModel, timings: Sequence[CallTiming], *, name: str, memory_bytes: int) -> DeviceSpec:
  """The additive roofline's overhead, F and BW that best explain ``timings`` for ``cost.model``."""
  rows = []
  for t in timings:
    work = cost.decode_work(t.rows, t.tokens) if t.kind == "decode" else cost.prefill_work(t.tokens, t.rows)
    rows.append((1.0, *work))
  a = np.asarray(rows)
  y = np.asarray([t.seconds for t in timings])
  scale = a.max(0)  # columns of similar size for the solver
  coef, _ = nnls(a / scale / y[:, None], np.ones(len(y)))  # relative errors: short calls count as much
  overhead, per_flop, per_byte = coef / scale
  return DeviceSpec(
    name=name,
    flops_per_s=1 / per_flop if per_flop > 0 else float("inf"),
    bytes_per_s=1 / per_byte if per_byte > 0 else float("inf"),
    memory_bytes=memory_bytes,
    call_overhead_s=float(overhead),
    overlap=False,
    source=f"fitted to {len(timings)} timed calls of {cost.model.name}",
  )


def fit_errors(cost: CostModel, timings: Sequence[CallTiming]) -> list[float]:
  """Relative error of the fitted model on each timed call."""
  errors = []
  for t in timings:
    predicted = cost.decode_s(t.rows, t.tokens) if t.kind == "decode" else cost.prefill_s(t.tokens, t.rows)
    errors.append(predicted / t.seconds - 1)
  return errors


def save_device(device: DeviceSpec, timings: Sequence[CallTiming], path: str | pathlib.Path) -> None:
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_text(
    json.dumps({"device": dataclasses.asdict(device), "timings": [dataclasses.asdict(t) for t in timings]}, indent=1)
  )


def load_device(path: str | pathlib.Path) -> DeviceSpec:
  return DeviceSpec(**json.loads(pathlib.Path(path).read_text())["device"])
