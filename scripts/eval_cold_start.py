#!/usr/bin/env python
"""The cold start on served models the predictor never saw: realised overflow from the first request,
as lengths are observed (issue 30, item 3).

Each served model answers its prompts in a random order (20 orders), 32 requests in flight: a request
is reserved at the level of the lengths observed when it arrives (s3jax.predictor.cold_start's
`served_stream`). Two levels of the `<any>` head:

  shift-robust  the level the server reserves by now: the confidence-0.8 bound on the served model's
                offset, given its observed lengths, plus the per-prompt margin (shift.py);
  pooled        the level it reserved by before: one conformal level over every training generator's
                leave-one-generator-out samples, never adapted until online retraining's first run.

Served models, on the 136 test prompts (no model trained on them): each of the 15 shipped
generators, left out (its `<any>` distributions from the model trained without it,
results/predictor/logo_dists.npz, written by `train_predictor.py --cold-start-calibration`; the
level from the other 14), and SmolLM2-135M-Instruct (its own lengths, data/smollm2, at most 512
tokens; the shipped checkpoint's `<any>` head, in GPT-2 tokens, never saw it or its tokenizer).

  python scripts/eval_cold_start.py      # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from s3jax.assets import REPO_ROOT
from s3jax.predictor.calibration import Calibration
from s3jax.predictor.cold_start import evaluate_cold_start, served_stream, summarize_cold_start
from s3jax.predictor.data import load_length_data, split_by_id
from s3jax.predictor.predictor import DEFAULT_CHECKPOINT, LengthPredictor

SECTION = "## Cold start on served models the predictor never saw (issue 30)"
SMOLLM2 = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.jsonl"
SMOLLM2_MAX_TOKENS = 512  # its answers' cap (data/smollm2/README.md)
TARGETS = (0.1, 0.2)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--logo", type=pathlib.Path, default=REPO_ROOT / "results" / "predictor" / "logo_dists.npz")
  p.add_argument("--lag", type=int, default=32, help="requests in flight: lengths not yet observed")
  p.add_argument("--orders", type=int, default=20, help="random arrival orders per served model")
  p.add_argument("--results", type=pathlib.Path, default=REPO_ROOT / "results" / "cold_start")
  p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
  return p.parse_args(argv)


def smollm2_stream(test_ids, **stream) -> dict:
  """The shipped `<any>` head serving SmolLM2 on the test prompts (its lengths as served: capped at
  512, EOS counted)."""
  test_ids = set(test_ids.tolist())
  records = [r for r in map(json.loads, SMOLLM2.read_text().splitlines()) if r["id"] in test_ids]
  predictor = LengthPredictor.load(DEFAULT_CHECKPOINT)
  dist = predictor.predict_dist_all([r["instruction"] for r in records])[:, 0].astype(np.float64)
  lengths = np.asarray([r["output_tokens"] + (r["finish_reason"] == "stop") for r in records])
  return served_stream(predictor.live.calibration, dist, lengths, max_length=SMOLLM2_MAX_TOKENS, **stream)


def table(summary: dict, smollm2: dict) -> list[str]:
  rows = [
    "| level | target | at the start: mean (worst) | first 50 requests: mean (worst) | after 50 observed: mean "
    "(worst) | saving after 50 | SmolLM2: start / first 50 / after 50 | SmolLM2 saving |",
    "|---|---:|---|---|---|---:|---|---:|",
  ]
  for level in ("shift-robust", "pooled"):
    for t in TARGETS:
      s, m = summary[f"{level} at {t}"], smollm2[level][str(t)]
      cell = lambda c, s=s: f"{s[c]['mean']:.3f} ({s[c]['worst_overflow']:.3f}, {s[c]['worst']})"
      rows.append(
        f"| {level} | {t} | {cell('at_start')} | {cell('first_50')} | {cell('after_50')} | {s['mean_saving']:+.0%} | "
        f"{m['at_start']:.3f} / {m['first_50']:.3f} / {m['after_50']:.3f} | {m['saving']:+.0%} |"
      )
  return rows


def main(argv=None) -> int:
  args = parse_args(argv)
  if not args.logo.exists():
    sys.exit(f"{args.logo} is missing: run python scripts/train_predictor.py --cold-start-calibration (about 30 min)")
  data = load_length_data()
  split = split_by_id(data.ids, seed=0)
  logo = np.load(args.logo)
  if list(logo["generators"]) != list(data.generators) or not np.array_equal(logo["ids"], data.ids):
    sys.exit(f"{args.logo} was computed on other length data: rerun train_predictor.py --cold-start-calibration")
  stream = dict(lag=args.lag, orders=args.orders)
  per_generator = evaluate_cold_start(logo["dists"], data, split, max_length=2048, **stream)
  summary = summarize_cold_start(per_generator)
  smollm2 = smollm2_stream(data.ids[split.test], **stream)
  confidence = Calibration.load(DEFAULT_CHECKPOINT).confidence
  command = "python scripts/eval_cold_start.py " + " ".join(sys.argv[1:] if argv is None else argv)
  args.results.mkdir(parents=True, exist_ok=True)
  (args.results / "metrics.json").write_text(
    json.dumps({"command": command, "per_generator": per_generator, "summary": summary, "smollm2": smollm2}, indent=1)
  )
  text = "\n".join(
    [
      SECTION,
      "",
      f"`{command.strip()}` (results/cold_start/metrics.json). Realised overflow of the `<any>` head's reservations "
      f"on a served model it never saw, {args.orders} random arrival orders, {args.lag} requests in flight (a "
      "request's level reads the lengths of those that finished before it arrived). LOGO: each of the 15 shipped "
      "generators served by the model trained without it, the level fitted on the other 14 (its test "
      "prompts, 136 or fewer: no model trained on them; worst: the generator farthest from the target); SmolLM2 "
      "served by the shipped checkpoint on the same test prompts. Shift-robust at confidence "
      f"{confidence}; pooled: the level the server used before this change (not adapted). Saving: against the best "
      "constant at the same overflow on the same requests after 50 observations.",
      "",
      *table(summary, smollm2),
      "",
    ]
  )
  print(text)
  if not args.no_write:
    from bench_decode import write_section

    write_section(text + "\n", REPO_ROOT / "BENCHMARKS.md", SECTION)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
