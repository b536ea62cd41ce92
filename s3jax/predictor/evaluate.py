"""Held-out evaluation: ranking, bucket accuracy, and reserved tokens against the best constant.

Shape legend: P prompts, G generator heads.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from s3jax.extras import missing_extra
from s3jax.predictor.calibration import reserved_answer_tokens
from s3jax.predictor.data import LengthData, Split
from s3jax.predictor.metrics import (
  NON_CHAT_GENERATORS,
  bucket_metrics,
  kendall_tau,
  majority_bucket_metrics,
  reservation_metrics,
)
from s3jax.predictor.model import ANY_GENERATOR

# Overflow targets on the trade-off curve; the headline uses 0.1 and 0.2.
OVERFLOW_TARGETS = (0.5, 0.3, 0.2, 0.1, 0.05)


def evaluate_head(predictor, dist: np.ndarray, true: np.ndarray, head: str, train_lengths: np.ndarray) -> dict:
  """One head's metrics on the test prompts.

  Args:
    predictor: the `LengthPredictor` (its buckets, calibration, rule and max length).
    dist: [P, 2] the head's distributions on the test prompts.
    true: [P] true lengths.
    head: the head's name (its calibration scores).
    train_lengths: the generator's training lengths (the majority-bucket baseline).
  """
  true = np.asarray(true)
  median = reserved_answer_tokens(dist, 0.0, predictor.max_length)
  out = {
    "n_test": int(len(true)),
    "kendall_tau": kendall_tau(dist[:, 0], true),
    **bucket_metrics(predictor.buckets, median, true),
    "majority": majority_bucket_metrics(predictor.buckets, train_lengths, true),
  }
  for target in OVERFLOW_TARGETS:
    level = predictor.calibration.threshold(head, target, predictor.rule)
    reserved = reserved_answer_tokens(dist, level, predictor.max_length, predictor.rule)
    out[f"at_{target}"] = reservation_metrics(reserved, true, predictor.max_length)
  return out


def run_evaluation(
  predictor, data: LengthData, split: Split, out_dir: str | pathlib.Path | None = None, *, tag: str = ""
) -> dict:
  """Evaluates every generator head, and the `<any>` head on every generator, on the test split.

  Writes `metrics{tag}.json` and `tradeoff{tag}.png` into `out_dir` when given.
  """
  test, train = data.subset(split.test), data.subset(split.train)
  dists = predictor.predict_dist_all(list(test.prompts)).astype(np.float64)  # [P, G, 2]
  results = {}
  for g, name in enumerate(predictor.generators):
    if name == ANY_GENERATOR or name not in data.generators:
      continue
    col = data.generator_index(name)
    seen = test.lengths[:, col] >= 0
    results[name] = evaluate_head(
      predictor, dists[seen, g], test.lengths[seen, col], name, train.lengths[train.lengths[:, col] >= 0, col]
    )
  report = {
    "split": {"train": len(split.train), "calib": len(split.calib), "test": len(split.test)},
    "tokenizer": data.tokenizer,
    "scheme": predictor.buckets.to_dict(),
    "checkpoint_meta": {k: v for k, v in predictor.meta.items() if k not in ("model", "history")},
    "generators": results,
    "summary": summarize(results),
  }
  if out_dir is not None:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"metrics{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_tradeoff(out_dir / f"tradeoff{tag}.png", results)
  return report


def summarize(results: dict[str, dict]) -> dict:
  """Means over the chat generators (all but `NON_CHAT_GENERATORS`) and over all."""
  out = {}
  for label, names in (("chat", [g for g in results if g not in NON_CHAT_GENERATORS]), ("all", list(results))):
    if not names:
      continue
    rs = [results[g] for g in names]
    out[label] = {
      "generators": len(names),
      "kendall_tau": float(np.mean([r["kendall_tau"] for r in rs])),
      "exact": float(np.mean([r["exact"] for r in rs])),
      "majority_exact": float(np.mean([r["majority"]["exact"] for r in rs])),
    }
    for target in OVERFLOW_TARGETS:
      key = f"at_{target}"
      out[label][key] = {m: float(np.mean([r[key][m] for r in rs])) for m in ("overflow", "saving")}
  return out


def plot_tradeoff(path: pathlib.Path, results: dict[str, dict]) -> None:
  """Mean reserved tokens against the realised overflow rate: the predictor at each target (line)
  against the best constant at the same rate (dashed), per generator."""
  try:
    import matplotlib
  except ModuleNotFoundError as e:
    raise missing_extra(e, "train", "the predictor's plots") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.8))
  for i, (gen, r) in enumerate(list(results.items())[:8]):
    pts = [r[f"at_{t}"] for t in OVERFLOW_TARGETS]
    c = f"C{i % 10}"
    ax.plot([p["overflow"] for p in pts], [p["mean_reserved"] for p in pts], "o-", color=c, ms=3, label=gen)
    ax.plot([p["overflow"] for p in pts], [p["constant"] for p in pts], "--", color=c, lw=0.8)
  ax.set_xlabel("overflow rate on the test prompts (answers longer than their reservation)")
  ax.set_ylabel("mean reserved output tokens")
  ax.set_title("calibrated predictor (solid) vs the best constant at the same overflow (dashed)", fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_table(report: dict) -> str:
  """Markdown table: one row per generator plus the means."""
  lines = [
    "| generator | tau | exact (majority) | within-1 | overflow @0.1 | saving @0.1 | overflow @0.2 | saving @0.2 |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for gen, r in report["generators"].items():
    lines.append(
      f"| {gen} | {r['kendall_tau']:.2f} | {r['exact']:.2f} ({r['majority']['exact']:.2f}) "
      f"| {r['within_one']:.2f} | {r['at_0.1']['overflow']:.2f} | {r['at_0.1']['saving']:+.0%} "
      f"| {r['at_0.2']['overflow']:.2f} | {r['at_0.2']['saving']:+.0%} |"
    )
  for label, s in report["summary"].items():
    lines.append(
      f"| **mean, {label} ({s['generators']})** | {s['kendall_tau']:.2f} | {s['exact']:.2f} "
      f"({s['majority_exact']:.2f}) | | {s['at_0.1']['overflow']:.2f} | {s['at_0.1']['saving']:+.0%} "
      f"| {s['at_0.2']['overflow']:.2f} | {s['at_0.2']['saving']:+.0%} |"
    )
  return "\n".join(lines)
