"""Held-out evaluation: predictor vs baselines, calibration, plots.

Shape legend: P prompts, G generator heads, N buckets.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import (
  Calibration,
  DecodeRule,
  bucket_at_threshold,
  bucket_representatives,
  conformal_scores,
  decode,
)
from s3jax.predictor.data import LengthData, Split
from s3jax.predictor.metrics import beats, length_metrics, linear_baseline, majority_baseline
from s3jax.predictor.model import ANY_GENERATOR

# Under-prediction targets on the trade-off curve.
UNDER_RATE_TARGETS = (0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.02)


def fit_calibration(scheme: BucketScheme, generators: tuple[str, ...],
                    calib_probs: np.ndarray, calib_lengths: np.ndarray,
                    train_lengths: np.ndarray) -> Calibration:
  """Conformal scores and bucket representatives for every head.

  Args:
    scheme: bucket scheme.
    generators: the heads, `generators[0] == ANY_GENERATOR`.
    calib_probs: [P, G, N] predicted probabilities on calibration prompts.
    calib_lengths: [P, G - 1] their true lengths.
    train_lengths: [P', G - 1] training lengths (for representatives).
  """
  labels = scheme.bucket_of(calib_lengths)
  scores, reps = {}, {}
  for g, name in enumerate(generators[1:], start=1):
    scores[name] = conformal_scores(calib_probs[:, g], labels[:, g - 1])
    reps[name] = bucket_representatives(scheme, train_lengths[:, g - 1])
  # The <any> head is calibrated against every generator's lengths.
  p_any = np.repeat(calib_probs[:, :1], labels.shape[1], axis=1)
  scores[ANY_GENERATOR] = conformal_scores(p_any.reshape(-1, p_any.shape[-1]),
                                           labels.reshape(-1))
  reps[ANY_GENERATOR] = bucket_representatives(scheme, train_lengths.ravel())
  return Calibration(scores=scores, representatives=reps)


def evaluate_generator(*, scheme: BucketScheme, calibration: Calibration,
                       head: str, probs: np.ndarray, true: np.ndarray,
                       train_lengths: np.ndarray,
                       train_prompt_tokens: np.ndarray,
                       test_prompt_tokens: np.ndarray,
                       any_probs: np.ndarray | None = None) -> dict:
  """All methods' metrics for one generator on the test prompts.

  Args:
    scheme: bucket scheme.
    calibration: fitted calibration.
    head: name of the generator head that produced `probs`.
    probs: [P, N] predictor probabilities on test prompts.
    true: [P] true lengths.
    train_lengths: [P'] the generator's training lengths (baselines).
    train_prompt_tokens, test_prompt_tokens: prompt lengths (linear baseline).
    any_probs: [P, N] the `<any>` head's probabilities (day-one predictor).
  """
  reps = calibration.representatives[head]
  expected = probs @ reps
  out = {"n_test": int(len(true))}
  for rule in DecodeRule:
    b = decode(probs, rule)
    out[f"predictor_{rule.value}"] = length_metrics(scheme, true, b, reps[b],
                                                    expected)
  if any_probs is not None:
    reps_any = calibration.representatives[ANY_GENERATOR]
    b = decode(any_probs, DecodeRule.MEDIAN)
    out["any_head_median"] = length_metrics(scheme, true, b, reps_any[b],
                                            any_probs @ reps_any)
  out["majority"] = length_metrics(
      scheme, true, *majority_baseline(scheme, train_lengths, len(true)))
  out["linear"] = length_metrics(
      scheme, true, *linear_baseline(scheme, train_prompt_tokens,
                                     train_lengths, test_prompt_tokens))
  curve = []
  for alpha in UNDER_RATE_TARGETS:
    b = bucket_at_threshold(probs, calibration.threshold(head, alpha))
    m = length_metrics(scheme, true, b, reps[b], expected)
    curve.append({"target": alpha, "under_rate": m["under_rate"],
                  "mean_reserved": m["mean_reserved"],
                  "over_reservation": m["over_reservation"]})
  out["safety_curve"] = curve
  for rule in DecodeRule:
    ours = out[f"predictor_{rule.value}"]
    out[f"beats_{rule.value}"] = {
        "majority": beats(ours, out["majority"]),
        "linear": beats(ours, out["linear"])}
  return out


def test_probs_and_lengths(predictor, data: LengthData, split: Split):
  """[P, G, N] probabilities on test prompts and [P, G-1] true lengths.

  Columns of the lengths follow `predictor.generators[1:]`.
  """
  test = data.subset(split.test)
  cols = [data.generator_index(g) for g in predictor.generators[1:]]
  return predictor.predict_proba_all(list(test.prompts)), test.lengths[:, cols]


def plot_confusion(path: pathlib.Path, scheme: BucketScheme, true: np.ndarray,
                   pred: np.ndarray, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = scheme.num_buckets
  tb = scheme.bucket_of(np.minimum(true, scheme.max_length))
  cm = np.zeros((n, n), np.int64)
  np.add.at(cm, (tb, pred), 1)
  fig, ax = plt.subplots(figsize=(5.5, 4.8))
  im = ax.imshow(cm, cmap="Blues")
  for i in range(n):
    for j in range(n):
      if cm[i, j]:
        ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black")
  ticks = [str(u) for u in scheme.upper_bounds]
  ax.set_xticks(range(n), ticks, rotation=60, fontsize=7)
  ax.set_yticks(range(n), ticks, fontsize=7)
  ax.set_xlabel("predicted bucket (upper bound, tokens)")
  ax.set_ylabel("true bucket (upper bound, tokens)")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_tradeoff(path: pathlib.Path, results: dict[str, dict],
                  max_length: int, title: str) -> None:
  """Under-prediction rate vs mean reserved tokens, one line per generator."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for i, (gen, r) in enumerate(results.items()):
    c = f"C{i % 10}"
    curve = r["safety_curve"]
    ax.plot([p["mean_reserved"] for p in curve],
            [p["under_rate"] for p in curve], "o-", color=c, ms=3, label=gen)
    for key, marker in (("majority", "x"), ("linear", "s")):
      ax.plot(r[key]["mean_reserved"], r[key]["under_rate"], marker,
              color=c, ms=6, mfc="none")
  ax.axvline(max_length, color="gray", ls="--", lw=0.8)
  ax.text(max_length, 0.02, " reserve max", color="gray", fontsize=7)
  ax.set_xlabel("mean reserved output tokens per request")
  ax.set_ylabel("under-prediction (overflow) rate on test")
  ax.set_title(title + "\n(lines: calibrated predictor at targets "
               "0.5..0.02; x majority, □ linear)", fontsize=9)
  ax.legend(fontsize=7, loc="upper right")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_evaluation(predictor, data: LengthData, split: Split,
                   out_dir: str | pathlib.Path, *,
                   generators: list[str] | None = None,
                   plot_generators: list[str] | None = None,
                   tag: str = "") -> dict:
  """Evaluates every head (or `generators`) on the test split.

  Writes `metrics{tag}.json`, a confusion matrix per generator in
  `plot_generators` (default: all evaluated) and the safety trade-off curve
  into `out_dir`; returns the metrics dict.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  scheme = predictor.buckets
  probs, true = test_probs_and_lengths(predictor, data, split)
  heads = list(predictor.generators[1:])
  train, test = data.subset(split.train), data.subset(split.test)
  results = {}
  for name in generators or heads:
    g = heads.index(name)
    col = data.generator_index(name)
    results[name] = evaluate_generator(
        scheme=scheme, calibration=predictor.calibration, head=name,
        probs=probs[:, g + 1], true=true[:, g],
        train_lengths=train.lengths[:, col],
        train_prompt_tokens=train.prompt_tokens,
        test_prompt_tokens=test.prompt_tokens, any_probs=probs[:, 0])
    if plot_generators is not None and name not in plot_generators:
      continue
    pred = decode(probs[:, g + 1], predictor.decode_rule)
    plot_confusion(out_dir / f"confusion{tag}_{name}.png", scheme,
                   true[:, g], pred,
                   f"{name}, {predictor.decode_rule.value} decoding, test\n"
                   f"{scheme.describe()}")
  shown = {g: r for g, r in results.items()
           if plot_generators is None or g in plot_generators}
  plot_tradeoff(out_dir / f"tradeoff{tag}.png", shown, scheme.max_length,
                f"safety margin: {scheme.describe()}")
  report = {"scheme": scheme.to_dict(), "tokenizer": data.tokenizer,
            "decode_rule": predictor.decode_rule.value,
            "split": {"train": len(split.train), "calib": len(split.calib),
                      "test": len(split.test)},
            "checkpoint_meta": {k: v for k, v in predictor.meta.items()
                                if k != "model"},
            "generators": results}
  (out_dir / f"metrics{tag}.json").write_text(json.dumps(report, indent=1))
  return report


def format_table(report: dict, rule: str = "median") -> str:
  """Markdown table: predictor vs baselines per generator."""
  cols = ("accuracy", "within_one", "under_rate", "over_reservation",
          "mae_tokens", "kendall_tau")
  lines = ["| generator | method | acc | within-1 | under | over-res (tok) "
           "| MAE (tok) | tau |", "|---|---|---|---|---|---|---|---|"]
  for gen, r in report["generators"].items():
    for key, label in ((f"predictor_{rule}", "predictor"),
                       ("any_head_median", "predictor, <any> head"),
                       ("majority", "majority"), ("linear", "linear")):
      if key not in r:
        continue
      m = r[key]
      vals = [f"{m[c]:.3f}" if c not in ("over_reservation", "mae_tokens")
              else f"{m[c]:.0f}" for c in cols]
      lines.append(f"| {gen} | {label} | " + " | ".join(vals) + " |")
  return "\n".join(lines)
