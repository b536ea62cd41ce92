"""Train the output-length predictor, calibrate it, save it and evaluate it.

Example (the committed default checkpoint):
  python scripts/train_predictor.py --generator llama-2-7b-chat-hf \
      --scheme equal_width --out checkpoints/predictor/llama-2-7b-chat-hf

One model learns from every generator's lengths (shared encoder and head,
per-generator offsets, plus an `<any>` head for a new served model);
`--generator` picks the served model: its quantile scheme (if chosen), the
checkpoint's default head, and the generator reported first.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s3jax.buckets import BucketKind, BucketScheme  # noqa: E402
from s3jax.predictor.calibration import DecodeRule  # noqa: E402
from s3jax.predictor.data import (  # noqa: E402
  DEFAULT_CACHE_DIR,
  DEFAULT_GENERATOR,
  DEFAULT_TOKENIZER_DIR,
  load_length_data,
  split_by_id,
)
from s3jax.predictor.evaluate import fit_calibration, format_table, run_evaluation  # noqa: E402
from s3jax.predictor.losses import LossKind  # noqa: E402
from s3jax.predictor.model import ANY_GENERATOR, ModelConfig  # noqa: E402
from s3jax.predictor.predictor import LengthPredictor  # noqa: E402
from s3jax.predictor.train import TrainConfig, train  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", type=pathlib.Path, default=None,
                 help="directory of full answers, one <generator>.jsonl "
                 "per model, counted with --tokenizer (default: the shipped "
                 "GPT-2 lengths, data/alpaca_eval/lengths.jsonl)")
  p.add_argument("--tokenizer", type=pathlib.Path,
                 default=DEFAULT_TOKENIZER_DIR,
                 help="served model's tokenizer (counts output lengths)")
  p.add_argument("--generator", default=DEFAULT_GENERATOR,
                 help="served model (default head of the checkpoint)")
  p.add_argument("--train-generators", choices=("all", "served"),
                 default="all", help="learn from every generator's lengths "
                 "or only the served one's")
  p.add_argument("--scheme", type=BucketKind, default=BucketKind.EQUAL_WIDTH,
                 choices=list(BucketKind), metavar="{" + ",".join(
                     k.value for k in BucketKind) + "}")
  p.add_argument("--num-buckets", type=int, default=10)
  p.add_argument("--max-length", type=int, default=2048)
  p.add_argument("--min-bound", type=int, default=32,
                 help="first upper bound of a geometric scheme")
  p.add_argument("--loss", type=LossKind, default=LossKind.ORDINAL_EMD,
                 choices=list(LossKind), metavar="{" + ",".join(
                     k.value for k in LossKind) + "}")
  p.add_argument("--ordinal-weight", type=float, default=1.0)
  p.add_argument("--decode", type=DecodeRule, default=DecodeRule.MEDIAN,
                 choices=list(DecodeRule), metavar="{" + ",".join(
                     k.value for k in DecodeRule) + "}")
  p.add_argument("--epochs", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--encoder-lr", type=float, default=1e-4)
  p.add_argument("--head-lr", type=float, default=1e-3)
  p.add_argument("--trainable-layers", type=int, default=3,
                 help="top encoder layers to fine-tune (stored in the "
                 "checkpoint, about 7 MB each)")
  p.add_argument("--max-tokens", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="checkpoint dir (default checkpoints/predictor/"
                 "<generator>)")
  p.add_argument("--results", type=pathlib.Path,
                 default=REPO / "results" / "predictor",
                 help="where metrics JSON and PNGs go")
  p.add_argument("--tag", default="", help="suffix of result file names")
  p.add_argument("--plot", nargs="*", default=None,
                 help="generators that get a confusion-matrix PNG (default: "
                 "the served one, gpt4, tulu-2-dpo-7b, text_davinci_003)")
  p.add_argument("--cache-dir", type=pathlib.Path, default=DEFAULT_CACHE_DIR)
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  t0 = time.time()
  data = load_length_data(args.data, args.tokenizer, args.cache_dir)
  split = split_by_id(data.ids, seed=args.seed)
  gens = (list(data.generators) if args.train_generators == "all"
          else [args.generator])
  cols = [data.generator_index(g) for g in gens]
  train_d, calib_d = data.subset(split.train), data.subset(split.calib)
  served = data.generator_index(args.generator)
  scheme = BucketScheme.make(args.scheme, num_buckets=args.num_buckets,
                             max_length=args.max_length,
                             lengths=train_d.lengths[:, served],
                             min_bound=args.min_bound)
  model_cfg = ModelConfig(generators=(ANY_GENERATOR, *gens),
                          num_buckets=scheme.num_buckets,
                          trainable_layers=args.trainable_layers,
                          max_tokens=args.max_tokens)
  train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                          encoder_lr=args.encoder_lr, head_lr=args.head_lr,
                          loss=args.loss, ordinal_weight=args.ordinal_weight,
                          seed=args.seed)
  print(f"scheme {scheme.describe()}; {len(split.train)} train / "
        f"{len(split.calib)} calib / {len(split.test)} test prompts; "
        f"{len(gens)} generator(s); lengths in {data.tokenizer}")
  result = train(model_cfg=model_cfg, train_cfg=train_cfg, scheme=scheme,
                 prompts=list(train_d.prompts),
                 lengths=train_d.lengths[:, cols],
                 calib_prompts=list(calib_d.prompts),
                 calib_lengths=calib_d.lengths[:, cols],
                 progress=not args.no_progress)
  train_seconds = time.time() - t0
  # Calibrate on the held-out calibration prompts with a provisional
  # predictor, then rebuild it with the fitted calibration.
  meta = {"default_generator": args.generator, "decode_rule": args.decode.value,
          "train": train_cfg.to_dict(), "history": result.history,
          "best_epoch": result.best_epoch, "tokenizer": data.tokenizer,
          "split_seed": args.seed, "train_seconds": round(train_seconds, 1),
          "command": "python scripts/train_predictor.py " + " ".join(
              sys.argv[1:] if argv is None else argv)}
  provisional = LengthPredictor(result.model, buckets=scheme,
                                calibration=None, generator=args.generator,
                                decode_rule=args.decode, meta=meta)
  calib = fit_calibration(scheme, model_cfg.generators,
                          provisional.predict_proba_all(list(calib_d.prompts)),
                          calib_d.lengths[:, cols], train_d.lengths[:, cols])
  predictor = LengthPredictor(result.model, buckets=scheme, calibration=calib,
                              generator=args.generator,
                              decode_rule=args.decode, meta=meta)
  out = args.out or REPO / "checkpoints" / "predictor" / args.generator
  predictor.save(out)
  print(f"saved {out} (trained in {train_seconds:.0f} s)")
  plots = args.plot if args.plot is not None else [
      args.generator, "gpt4", "tulu-2-dpo-7b", "text_davinci_003"]
  report = run_evaluation(predictor, data, split, args.results, tag=args.tag,
                          plot_generators=plots)
  print(format_table(report, args.decode.value))
  print(json.dumps({g: r[f"beats_{args.decode.value}"]
                    for g, r in report["generators"].items()
                    if g == args.generator}, indent=1))


if __name__ == "__main__":
  main()
