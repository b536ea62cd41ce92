"""Predictor v2 ablation: what each modelling choice buys, on the same split, against the same bar.

  python scripts/predictor_ablation.py            # about 8 minutes on 2 CPU cores

Each variant is trained on the training prompts of all 15 generators, calibrated on the calibration
prompts, and evaluated on the test prompts under both reservation rules (calibration.py): Kendall tau,
exact bucket, and at overflow targets 0.1 and 0.2 the realised overflow and the reserved tokens
saved against the best constant at the same overflow (metrics.py), averaged over the chat generators.
Two reference rows need no training: the v1 bucket classifier (measured before this change, read
from results/predictor/v1_classifier.json) and a *ceiling*: the same calibrated rules fed the other
14 generators' real answer lengths for the prompt, which no prompt-only predictor can beat. Writes
results/predictor/ablation.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

import numpy as np

from s3jax.assets import REPO_ROOT
from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import ReservationRule, fit_calibration
from s3jax.predictor.data import load_length_data, split_by_id
from s3jax.predictor.evaluate import evaluate_head, run_evaluation, summarize
from s3jax.predictor.metrics import NON_CHAT_GENERATORS
from s3jax.predictor.model import ANY_GENERATOR, LengthModel, LengthModelConfig
from s3jax.predictor.predictor import LengthPredictor
from s3jax.predictor.train import TrainConfig, train

MAX_LENGTH = 2048
BASE = dict(epochs=8, encoder_lr=5e-5, head_lr=3e-4)
# (name, encoder layers fine-tuned, TrainConfig overrides)
VARIANTS = (
  ("log-normal, frozen encoder", 0, dict(BASE, epochs=40, head_lr=1e-3)),
  ("log-normal, 3 layers, per-generator labels only", 3, dict(BASE, demand_weight=0.0)),
  ("log-normal, 3 layers + pooled demand", 3, dict(BASE)),
  ("log-normal, 3 layers + pooled demand + pairwise ranking", 3, dict(BASE, rank_weight=1.0)),
  ("log-normal, all 6 layers + pooled demand", 6, dict(BASE)),
)


def evaluate_variant(model: LengthModel | None, data, split, *, dists_of=None) -> dict:
  """Both rules' evaluation of one trained model (or of given distributions)."""
  scheme = BucketScheme.equal_width(10, MAX_LENGTH)
  calib_d = data.subset(split.calib)
  if model is not None:
    predictor = LengthPredictor(model, buckets=scheme, calibration=None).calibrated(
      list(calib_d.prompts), calib_d.lengths
    )
    return {rule.value: run_evaluation(predictor.with_options(rule=rule), data, split) for rule in ReservationRule}
  calib = fit_calibration(
    (ANY_GENERATOR, *data.generators), dists_of(split.calib), calib_d.lengths, max_length=MAX_LENGTH
  )
  return {
    rule.value: _evaluate_given(dists_of(split.test), calib, data, split, rule, scheme) for rule in ReservationRule
  }


def _evaluate_given(test_dists, calib, data, split, rule, scheme) -> dict:
  shim = types.SimpleNamespace(buckets=scheme, calibration=calib, max_length=MAX_LENGTH, rule=rule)
  test, train_d = data.subset(split.test), data.subset(split.train)
  results = {
    name: evaluate_head(shim, test_dists[:, g + 1], test.lengths[:, g], name, train_d.lengths[:, g])
    for g, name in enumerate(data.generators)
  }
  return {"generators": results, "summary": summarize(results)}


def ceiling_dists(data, split):
  """Per prompt and generator g: log length regressed on the other generators' mean standardised
  log length for the same prompt (fitted on the training prompts), residual scale alike."""
  y = np.log1p(data.lengths.astype(np.float64))
  tr = split.train
  z = (y - y[tr].mean(0)) / y[tr].std(0)
  dists = np.zeros(y.shape + (2,))
  for g in range(y.shape[1]):
    others = np.delete(z, g, axis=1).mean(1)
    slope, icept = np.polyfit(others[tr], y[tr, g], 1)
    mean = icept + slope * others
    dists[:, g] = np.column_stack([mean, np.full(len(mean), np.log((y[tr, g] - mean[tr]).std()))])
  padded = np.concatenate([np.zeros_like(dists[:, :1]), dists], axis=1)  # no <any> column: zeros
  return lambda rows: padded[rows]


def row(name: str, report: dict) -> dict:
  s = report["summary"]["chat"]
  return {
    "variant": name,
    "kendall_tau": s["kendall_tau"],
    "exact": s.get("exact"),
    **{f"{k}_at_{t}": s[f"at_{t}"][k] for t in (0.1, 0.2) for k in ("overflow", "saving")},
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "results" / "predictor" / "ablation.json")
  p.add_argument("--only", nargs="*", default=None, help="variant name prefixes to run (default: all)")
  args = p.parse_args(argv)
  data = load_length_data()
  split = split_by_id(data.ids)
  train_d, calib_d = data.subset(split.train), data.subset(split.calib)
  rows = []
  v1 = REPO_ROOT / "results" / "predictor" / "v1_classifier.json"
  if v1.exists():
    chat = [r for g, r in json.loads(v1.read_text())["generators"].items() if g not in NON_CHAT_GENERATORS]
    rows.append(
      {
        "variant": "v1: 10-bucket classifier (shipped before)",
        "rule": "bucket upper bound",
        "kendall_tau": float(np.mean([r["kendall_tau"] for r in chat])),
        **{
          f"{k}_at_{t}": float(np.mean([r[f"at_{t}"][k] for r in chat]))
          for t in (0.1, 0.2)
          for k in ("overflow", "saving")
        },
      }
    )
  for name, layers, overrides in VARIANTS:
    if args.only and not any(name.startswith(o) for o in args.only):
      continue
    cfg = LengthModelConfig(generators=(ANY_GENERATOR, *data.generators), trainable_layers=layers)
    t0 = time.time()
    result = train(
      model_cfg=cfg,
      train_cfg=TrainConfig(**overrides),
      prompts=list(train_d.prompts),
      lengths=train_d.lengths,
      calib_prompts=list(calib_d.prompts),
      calib_lengths=calib_d.lengths,
      progress=False,
    )
    seconds = time.time() - t0
    reports = evaluate_variant(result.model, data, split)
    for rule, rep in reports.items():
      rows.append({**row(name, rep), "rule": rule, "train_seconds": round(seconds, 1)})
      print(rows[-1], flush=True)
  reports = evaluate_variant(None, data, split, dists_of=ceiling_dists(data, split))
  for rule, rep in reports.items():
    rows.append({**row("ceiling: the other 14 generators' real lengths", rep), "rule": rule})
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(
    json.dumps(
      {
        "rows": rows,
        "command": "python scripts/predictor_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
      },
      indent=1,
    )
    + "\n"
  )
  print(format_rows(rows))


def format_rows(rows: list[dict]) -> str:
  lines = [
    "| variant | rule | tau | overflow @0.1 | saving @0.1 | overflow @0.2 | saving @0.2 |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['variant']} | {r['rule']} | {r['kendall_tau']:.2f} | {r['overflow_at_0.1']:.3f} "
      f"| {r['saving_at_0.1']:+.0%} | {r['overflow_at_0.2']:.3f} | {r['saving_at_0.2']:+.0%} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
