"""Evaluate a saved length predictor on the prompts it never trained or calibrated on.

Example:
  python scripts/eval_predictor.py --checkpoint checkpoints/predictor/llama-2-7b-chat-hf --latency

Uses the checkpoint's split (seed and fractions), so its test prompts are the ones it never saw.
Prints a markdown table (Kendall tau, exact bucket against the majority bucket, and at overflow
targets 0.1 and 0.2 the realised overflow and the reserved tokens saved against the best constant at
the same overflow) and writes the metrics JSON and the trade-off PNG.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from s3jax.assets import REPO_ROOT
from s3jax.predictor.calibration import ReservationRule
from s3jax.predictor.data import DEFAULT_TOKENIZER_DIR, load_length_data, load_user_lengths, split_by_id
from s3jax.predictor.evaluate import format_table, run_evaluation
from s3jax.predictor.predictor import DEFAULT_CHECKPOINT, LengthPredictor


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", type=pathlib.Path, default=DEFAULT_CHECKPOINT)
  p.add_argument(
    "--data-file",
    type=pathlib.Path,
    nargs="+",
    default=None,
    metavar="JSONL",
    help="lengths in the user format (s3jax/predictor/records.py); default: the shipped AlpacaEval lengths",
  )
  p.add_argument(
    "--tokenizer",
    type=pathlib.Path,
    default=DEFAULT_TOKENIZER_DIR,
    help="served model's tokenizer: counts the `output` texts of --data-file",
  )
  p.add_argument(
    "--rule",
    type=ReservationRule,
    default=None,
    choices=list(ReservationRule),
    metavar="{" + ",".join(r.value for r in ReservationRule) + "}",
    help="override the checkpoint's reservation rule",
  )
  p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "results" / "predictor")
  p.add_argument("--tag", default="_eval")
  p.add_argument("--latency", action="store_true", help="also time reserve_tokens() at batch 1 and 32")
  return p.parse_args(argv)


def measure_latency(predictor: LengthPredictor, prompts: list[str], repeats: int = 8) -> dict:
  """Wall time per request of `reserve_tokens` (tokenization included).

  Each repeat takes the next 32 test prompts and times them once as one
  batch-32 call and once as 32 batch-1 calls, so both see the same prompts.
  """
  predictor.warmup()  # Every (batch, tokens) shape: none compiles below.
  compiled = predictor.num_compilations
  single, batched = [], []
  for r in range(repeats):
    chunk = [prompts[(r * 32 + i) % len(prompts)] for i in range(32)]
    t0 = time.perf_counter()
    predictor.reserve_tokens(chunk)
    batched.append((time.perf_counter() - t0) / 32)
    for p in chunk:
      t0 = time.perf_counter()
      predictor.reserve_tokens([p])
      single.append(time.perf_counter() - t0)
  return {
    "batch1_ms_per_request": 1e3 * float(np.median(single)),
    "batch1_ms_per_request_mean": 1e3 * float(np.mean(single)),
    "batch32_ms_per_request": 1e3 * float(np.median(batched)),
    "batch32_ms_per_call": 32e3 * float(np.median(batched)),
    "recompiles_during_timing": predictor.num_compilations - compiled,
  }


def main(argv=None):
  args = parse_args(argv)
  predictor = LengthPredictor.load(args.checkpoint, rule=args.rule)
  data = load_user_lengths(args.data_file, tokenizer_dir=args.tokenizer) if args.data_file else load_length_data()
  fractions = predictor.meta.get("split", {})
  split = split_by_id(data.ids, seed=predictor.meta.get("split_seed", 0), **fractions)
  report = run_evaluation(predictor, data, split, args.out, tag=args.tag)
  print(f"checkpoint {args.checkpoint} (rule {predictor.rule.value}); lengths in {data.tokenizer}")
  print(format_table(report))
  if args.latency:
    lat = measure_latency(predictor, [data.prompts[i] for i in split.test])
    report["latency"] = lat
    print(json.dumps(lat, indent=1))
    (args.out / f"metrics{args.tag}.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
  main()
