"""Steady-state decoding compiles nothing: one executable per shape while rows and pages change."""

from __future__ import annotations

import numpy as np

from s3jax.executor.runner import ModelRunner, xla_compilations
from s3jax.executor.step_state import Admission, PrefillPack, StepShapes, StepUpdates


def test_runner_compiles_each_shape_once_while_rows_change(gpt2_checkpoint):
  """200 decode iterations with admissions, growth, moves and frees in changing rows."""
  runner = ModelRunner.load(gpt2_checkpoint.path)
  shapes = StepShapes.create(
    max_seq_len=runner.cfg.max_seq_len,
    num_pages=32,
    page_size=8,
    batch_sizes=(4,),
    max_admissions=2,
    min_prefill_len=16,
    scan_chunk=4,
  )
  rng = np.random.default_rng(0)
  state = runner.init_state(shapes)
  free_pages = list(range(shapes.num_pages))
  rows: dict[int, dict] = {}  # row -> {"pages", "position"}

  def admit(row: int, i: int):
    nonlocal state
    prompt = rng.integers(0, runner.cfg.vocab_size, 1 + i % 15).tolist()  # 1..15 tokens: one pack length
    pages = [free_pages.pop(0) for _ in range(-(-len(prompt) // 8))]
    a = Admission(
      tokens=prompt,
      pages=pages,
      row=row,
      temperature=(0.0, 0.7, 1.0, 1.3)[i % 4],
      top_k=(0, 1, 20, 0)[i % 4],
      top_p=(1.0, 0.9, 0.5, 0.95)[i % 4],
      seed=1000 + i,
    )
    state = runner.prefill(shapes, state, PrefillPack.from_host(shapes, [a]))
    rows[row] = {"pages": pages, "position": len(prompt)}
    return a

  def decode(**changes):
    nonlocal state
    grants = []
    for row, r in rows.items():  # a row writing into a new page is granted one
      if r["position"] // 8 == len(r["pages"]) and "admissions" not in changes:
        r["pages"].append(free_pages.pop(0))
        grants.append((row, len(r["pages"]) - 1, r["pages"][-1]))
    pages = max((p for r in rows.values() for p in r["pages"]), default=0) + 1
    state, tokens = runner.generate(shapes, state, StepUpdates.from_host(shapes, grants=grants, **changes), 4, pages)
    for r in rows.values():
      r["position"] += "admissions" not in changes
    return np.asarray(tokens.tokens)

  decode(admissions=[admit(0, 0), admit(2, 1)])  # compiles the pack length and the decode shape
  compiled, xla = runner.compilations, xla_compilations()
  assert compiled == 2
  admitted = 2
  for i in range(200):
    full = [row for row, r in rows.items() if r["position"] >= 40]
    if full:  # a long row leaves; its pages come back; a new request takes a free row
      row = full[0]
      free_pages.extend(rows.pop(row)["pages"])
      decode(frees=[row])
      new_row = min(set(range(4)) - set(rows))
      decode(admissions=[admit(new_row, admitted)])
      admitted += 1
    elif i % 25 == 0 and 3 in rows and 1 not in rows:  # move row 3 down
      rows[1] = rows.pop(3)
      decode(moves=[(3, 1)])
    else:
      decode()
  assert runner.compilations == compiled
  assert xla_compilations() == xla
  assert admitted > 10
