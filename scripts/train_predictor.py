"""Train the output-length predictor, calibrate it, save it and evaluate it.

The shipped checkpoint (about 20 minutes on 2 CPU cores, most of it the cold-start calibration):
  python scripts/train_predictor.py --cold-start-calibration --out checkpoints/predictor/llama-2-7b-chat-hf

On your own data (the format is in s3jax/predictor/records.py; lengths in your served model's tokens):
  python scripts/train_predictor.py --data-file my_model.jsonl --with-shipped --generator my_model \\
      --tokenizer path/to/hf_tokenizer --out my_predictor

One model learns from every generator's lengths (a shared demand score, a log-normal per generator,
and an `<any>` head for a served model with no observed lengths). `--generator` is the served model:
the checkpoint's default head and the first row reported.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from s3jax.assets import REPO_ROOT
from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import ReservationRule
from s3jax.predictor.cold_start import (
  evaluate_cold_start,
  leave_one_generator_out,
  pooled_samples,
  summarize_cold_start,
)
from s3jax.predictor.data import (
  DEFAULT_GENERATOR,
  DEFAULT_TOKENIZER_DIR,
  describe,
  load_length_data,
  load_user_lengths,
  merge_length_data,
  split_by_id,
)
from s3jax.predictor.evaluate import format_table, run_evaluation
from s3jax.predictor.model import ANY_GENERATOR, LengthModelConfig
from s3jax.predictor.predictor import DEFAULT_MAX_UNDER_RATE, LengthPredictor
from s3jax.predictor.train import TrainConfig, train


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  data = p.add_argument_group("data")
  data.add_argument(
    "--data-file",
    type=pathlib.Path,
    nargs="+",
    default=None,
    metavar="JSONL",
    help="your own lengths: JSON Lines of instruction + output (or output_tokens), optional\n"
    "generator and id (format: s3jax/predictor/records.py). Default: the shipped AlpacaEval\n"
    "lengths of 15 LLMs (data/alpaca_eval/lengths.jsonl, GPT-2 tokens)",
  )
  data.add_argument(
    "--with-shipped",
    action="store_true",
    help="add the shipped 15 generators to --data-file as extra generators (GPT-2 tokens)",
  )
  data.add_argument(
    "--tokenizer",
    type=pathlib.Path,
    default=DEFAULT_TOKENIZER_DIR,
    help="served model's tokenizer: counts the `output` texts of --data-file",
  )
  data.add_argument("--test-frac", type=float, default=0.2, help="share of prompts held out for the test")
  data.add_argument(
    "--calib-frac",
    type=float,
    default=0.15,
    help="share of the rest held out to choose the epoch and calibrate the margin",
  )
  data.add_argument("--seed", type=int, default=0, help="split, initialisation and batch order")
  model = p.add_argument_group("model and training")
  model.add_argument(
    "--generator",
    default=None,
    help=f"served model: the default head (default: {DEFAULT_GENERATOR} on the shipped data, else the first generator)",
  )
  model.add_argument(
    "--trainable-layers",
    type=int,
    default=3,
    help="top encoder layers to fine-tune, 0-6 (about 7 MB each in the checkpoint)",
  )
  model.add_argument("--max-tokens", type=int, default=128)
  model.add_argument("--epochs", type=int, default=8)
  model.add_argument("--batch-size", type=int, default=32)
  model.add_argument("--encoder-lr", type=float, default=5e-5)
  model.add_argument("--head-lr", type=float, default=3e-4)
  model.add_argument("--demand-weight", type=float, default=1.0, help="pooled-demand target weight (0: off)")
  model.add_argument("--rank-weight", type=float, default=0.0, help="pairwise ranking loss weight (0: off)")
  model.add_argument("--max-length", type=int, default=2048, help="longest reservation (tokens)")
  model.add_argument(
    "--rule",
    type=ReservationRule,
    default=ReservationRule.MIN_COST,
    choices=list(ReservationRule),
    metavar="{" + ",".join(r.value for r in ReservationRule) + "}",
    help="how a predicted distribution becomes a reservation (s3jax/predictor/calibration.py)",
  )
  model.add_argument(
    "--max-under-rate", type=float, default=DEFAULT_MAX_UNDER_RATE, help="the checkpoint's default overflow target"
  )
  model.add_argument(
    "--cold-start-calibration",
    action="store_true",
    help="calibrate the <any> head leave-one-generator-out (trains one more model per\n"
    "generator) and report its realised overflow on each held-out generator",
  )
  out = p.add_argument_group("output")
  out.add_argument(
    "--out", type=pathlib.Path, default=None, help="checkpoint dir (default checkpoints/predictor/<generator>)"
  )
  out.add_argument(
    "--results",
    type=pathlib.Path,
    default=REPO_ROOT / "results" / "predictor",
    help="where the metrics JSON and PNG go",
  )
  out.add_argument("--tag", default="", help="suffix of result file names")
  out.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.with_shipped and not args.data_file:
    p.error("--with-shipped adds the shipped data to --data-file; without --data-file it is the default")
  return args


def load_data(args):
  if not args.data_file:
    return load_length_data()
  data = load_user_lengths(args.data_file, tokenizer_dir=args.tokenizer)
  return merge_length_data(data, load_length_data()) if args.with_shipped else data


def main(argv=None):
  args = parse_args(argv)
  t0 = time.time()
  data = load_data(args)
  generator = args.generator or (DEFAULT_GENERATOR if DEFAULT_GENERATOR in data.generators else data.generators[0])
  data.generator_index(generator)  # a clear error for an unknown name
  split = split_by_id(data.ids, seed=args.seed, test_frac=args.test_frac, calib_frac=args.calib_frac)
  print(describe(data, split))
  train_d, calib_d = data.subset(split.train), data.subset(split.calib)
  model_cfg = LengthModelConfig(
    generators=(ANY_GENERATOR, *data.generators), trainable_layers=args.trainable_layers, max_tokens=args.max_tokens
  )
  train_cfg = TrainConfig(
    epochs=args.epochs,
    batch_size=args.batch_size,
    encoder_lr=args.encoder_lr,
    head_lr=args.head_lr,
    demand_weight=args.demand_weight,
    rank_weight=args.rank_weight,
    seed=args.seed,
  )
  print(
    f"training {len(data.generators)} generator heads + {ANY_GENERATOR} on {len(split.train)} prompts "
    f"({args.trainable_layers} encoder layers fine-tuned); served model: {generator}"
  )
  result = train(
    model_cfg=model_cfg,
    train_cfg=train_cfg,
    prompts=list(train_d.prompts),
    lengths=train_d.lengths,
    calib_prompts=list(calib_d.prompts),
    calib_lengths=calib_d.lengths,
    progress=not args.no_progress,
  )
  cold = None
  report_extra = {}
  if args.cold_start_calibration:
    logo = leave_one_generator_out(data, split, model_cfg, train_cfg, progress=not args.no_progress)
    # What scripts/eval_cold_start.py serves each left-out generator with (15 models: not retrained there).
    args.results.mkdir(parents=True, exist_ok=True)
    np.savez(args.results / f"logo_dists{args.tag}.npz", dists=logo, ids=data.ids, generators=list(data.generators))
    samples, columns = pooled_samples(logo, data.lengths, split.calib, range(len(data.generators)))
    cold = samples, [data.generators[c] for c in columns]
    results = evaluate_cold_start(logo, data, split, max_length=args.max_length)
    report_extra["cold_start"] = {"per_generator": results, "summary": summarize_cold_start(results)}
  train_seconds = time.time() - t0
  meta = {
    "default_generator": generator,
    "train": train_cfg.to_dict(),
    "history": result.history,
    "best_epoch": result.best_epoch,
    "tokenizer": data.tokenizer,
    "split_seed": args.seed,
    "split": {"test_frac": args.test_frac, "calib_frac": args.calib_frac},
    "train_seconds": round(train_seconds, 1),
    "command": "python scripts/train_predictor.py " + " ".join(sys.argv[1:] if argv is None else argv),
  }
  predictor = LengthPredictor(
    result.model,
    buckets=BucketScheme.equal_width(10, args.max_length),
    calibration=None,
    generator=generator,
    max_under_rate=args.max_under_rate,
    rule=args.rule,
    meta=meta,
  ).calibrated(list(calib_d.prompts), calib_d.lengths, cold_start=cold)
  out = args.out or REPO_ROOT / "checkpoints" / "predictor" / generator
  predictor.save(out)
  print(f"saved {out} (trained in {train_seconds:.0f} s; <any> calibrated {predictor.calibration.cold_start})")
  report = run_evaluation(predictor, data, split, args.results, tag=args.tag)
  if report_extra:
    report.update(report_extra)
    (args.results / f"metrics{args.tag}.json").write_text(json.dumps(report, indent=1) + "\n")
  print(format_table(report))
  if "cold_start" in report:
    print(json.dumps(report["cold_start"]["summary"], indent=1))


if __name__ == "__main__":
  main()
