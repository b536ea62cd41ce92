"""Decode speed of the engine's own step executable, with nothing else running.

``decode_tokens_per_s`` puts ``batch`` live rows of ``context`` tokens each into a pool and runs
the same decode executable the engine runs, back to back with no host work in between: the
ceiling an engine iteration can reach at that batch and cache length. The engine benchmark
divides the engine's throughput by it (engine efficiency); ``scripts/bench_decode.py`` compares it
with transformers.
"""

from __future__ import annotations

import math
import statistics
import time

import jax

from s3jax.executor.runner import ModelRunner
from s3jax.executor.step_state import Admission, StepShapes, StepUpdates


def decode_shapes(runner: ModelRunner, batch: int, context: int, steps: int, page_size: int = 64) -> StepShapes:
  """One batch size and exactly the pages ``batch`` rows need for ``context + steps``."""
  pages = batch * math.ceil(min(context + steps, runner.cfg.max_seq_len) / page_size)
  return StepShapes.create(
    max_seq_len=runner.cfg.max_seq_len, num_pages=pages, page_size=page_size, batch_sizes=(batch,), max_admissions=batch
  )


def decode_tokens_per_s(
  runner: ModelRunner,
  batch: int,
  context: int,
  *,
  steps: int = 16,
  repeats: int = 3,
  live: int | None = None,
  shapes: StepShapes | None = None,
) -> float:
  """Median tokens/s of ``steps`` decode iterations of ``live`` rows (default ``batch``) that hold
  ``context`` tokens each when the first one starts.

  Args:
    runner: the model.
    batch: rows the executable computes (B).
    context: tokens each live row holds before the first timed step.
    steps: decode iterations per repeat; every row grows by that many tokens.
    repeats: timed repeats; the median is returned.
    live: rows holding a sequence (the rest of the batch is padding), <= ``batch``.
    shapes: the engine's shapes to run in (its pool and batch sizes); default: just
      enough pages for the live rows.
  """
  live = batch if live is None else live
  if context + steps * (repeats + 1) > runner.cfg.max_seq_len:
    raise ValueError(
      f"context {context} + {steps * (repeats + 1)} decode steps exceed the model maximum {runner.cfg.max_seq_len}"
    )
  shapes = shapes or decode_shapes(runner, batch, context, steps * (repeats + 1))
  g = shapes.page_size
  per_row = math.ceil((context + steps * (repeats + 1)) / g)
  if live * per_row > shapes.num_pages or batch not in shapes.batch_sizes or live > shapes.max_admissions:
    raise ValueError(f"{live} rows of {per_row} pages do not fit these shapes: {shapes}")
  state = runner.init_state(shapes)
  admissions = [
    Admission(tokens=[0] * context, pages=range(r * per_row, (r + 1) * per_row), row=r) for r in range(live)
  ]  # the KV content does not change the cost
  pages = live * per_row
  none = jax.device_put(StepUpdates.from_host(shapes))
  state, tokens = runner.generate(shapes, state, StepUpdates.from_host(shapes, admissions=admissions), batch, pages)
  state, tokens = runner.generate(shapes, state, none, batch, pages)  # warm: the first real decode
  jax.block_until_ready(tokens)
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, tokens = runner.generate(shapes, state, none, batch, pages)
    jax.block_until_ready(tokens)
    rates.append(live * steps / (time.perf_counter() - t0))
  return statistics.median(rates)
