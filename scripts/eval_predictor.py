"""Evaluate a saved length predictor against the baselines on held-out prompts.

Example:
  python scripts/eval_predictor.py \
      --checkpoint checkpoints/predictor/llama-2-7b-chat-hf --latency

Uses the checkpoint's split seed, so its test prompts are the ones it never
trained or calibrated on. Prints a markdown table and writes metrics JSON,
confusion matrices and the safety-margin trade-off curve.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from s3jax.predictor.calibration import DecodeRule  # noqa: E402
from s3jax.predictor.data import DEFAULT_CACHE_DIR, DEFAULT_TOKENIZER_DIR, load_length_data, split_by_id  # noqa: E402
from s3jax.predictor.evaluate import format_table, run_evaluation  # noqa: E402
from s3jax.predictor.predictor import DEFAULT_CHECKPOINT, LengthPredictor  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", type=pathlib.Path, default=DEFAULT_CHECKPOINT)
  p.add_argument("--data", type=pathlib.Path, default=None,
                 help="directory of full answers, one <generator>.jsonl "
                 "per model, counted with --tokenizer (default: the shipped "
                 "GPT-2 lengths, data/alpaca_eval/lengths.jsonl)")
  p.add_argument("--tokenizer", type=pathlib.Path,
                 default=DEFAULT_TOKENIZER_DIR)
  p.add_argument("--generator", nargs="*", default=None,
                 help="generators to report (default: every head)")
  p.add_argument("--decode", type=DecodeRule, default=None,
                 choices=list(DecodeRule), metavar="{" + ",".join(
                     k.value for k in DecodeRule) + "}",
                 help="override the checkpoint's decode rule")
  p.add_argument("--out", type=pathlib.Path,
                 default=REPO / "results" / "predictor")
  p.add_argument("--tag", default="_eval")
  p.add_argument("--cache-dir", type=pathlib.Path, default=DEFAULT_CACHE_DIR)
  p.add_argument("--latency", action="store_true",
                 help="also time predict() at batch 1 and 32")
  return p.parse_args(argv)


def measure_latency(predictor: LengthPredictor, prompts: list[str],
                    repeats: int = 8) -> dict:
  """Wall time per request of `predict` (tokenization included).

  Each repeat takes the next 32 test prompts and times them once as one
  batch-32 call and once as 32 batch-1 calls, so both see the same prompts.
  """
  predictor.warmup()  # Every (batch, tokens) shape: none compiles below.
  compiled = predictor.num_compilations
  single, batched = [], []
  for r in range(repeats):
    chunk = [prompts[(r * 32 + i) % len(prompts)] for i in range(32)]
    t0 = time.perf_counter()
    predictor.predict(chunk)
    batched.append((time.perf_counter() - t0) / 32)
    for p in chunk:
      t0 = time.perf_counter()
      predictor.predict([p])
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
  predictor = LengthPredictor.load(args.checkpoint, decode_rule=args.decode)
  data = load_length_data(args.data, args.tokenizer, args.cache_dir)
  split = split_by_id(data.ids, seed=predictor.meta.get("split_seed", 0))
  report = run_evaluation(predictor, data, split, args.out, tag=args.tag,
                          generators=args.generator)
  print(f"checkpoint {args.checkpoint}; scheme "
        f"{predictor.buckets.describe()}; lengths in {data.tokenizer}")
  print(format_table(report, predictor.decode_rule.value))
  if args.latency:
    test_prompts = [data.prompts[i] for i in split.test]
    lat = measure_latency(predictor, test_prompts)
    report["latency"] = lat
    print(json.dumps(lat, indent=1))
    path = args.out / f"metrics{args.tag}.json"
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
