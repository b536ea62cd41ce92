"""Drift: a length predictor trained on one model's short answers serves a long-answer model.

  python scripts/drift_experiment.py        # about 25 minutes on 2 CPU cores

The same llama-2-7b-chat-hf trace (real answer lengths, Poisson arrivals, one KV budget, random
weights of the `gpt2-mini-2k` shape) runs through the engine under the s3 policy four times:

  offline      the shipped predictor's llama-2-7b-chat-hf head, trained offline on the served model:
               the bar;
  drift, off   a predictor trained only on text_davinci_003 (answers 6x shorter), never retrained;
  drift, on    the same predictor, retrained online (s3jax.supervisor.retrainer);
  cold, on     a predictor trained on the 14 other generators, its `<any>` head (no data for the
               served model at all), retrained online.

Writes results/drift/drift.json (per-run summaries, every retraining decision) and drift.png (over
time: overflow rate, re-buckets and preemptions, reserved tokens per request, throughput) and prints a
markdown table. Predictions happen when a request arrives, so a swap changes the reservations of the
requests that arrive after it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from s3jax.assets import REPO_ROOT
from s3jax.bench.replay import replay
from s3jax.bench.trace import load_trace, poisson_arrivals
from s3jax.buckets import BucketScheme
from s3jax.engine import EngineConfig
from s3jax.executor.runner import ModelRunner
from s3jax.extras import missing_extra
from s3jax.predictor import ANY_GENERATOR, LengthModelConfig, LengthPredictor, TrainConfig, train
from s3jax.predictor.data import load_length_data, split_by_id
from s3jax.supervisor.retrainer import OnlineRetrainer, RetrainConfig
from s3jax.tokenizer import load_tokenizer

SERVED, SHORT = "llama-2-7b-chat-hf", "text_davinci_003"
OUT = REPO_ROOT / "results" / "drift"


def train_predictor(name: str, generators: list[str], default: str) -> LengthPredictor:
  """A predictor trained (3 encoder layers, 8 epochs) on `generators` only; cached (20 MB each)."""
  path = pathlib.Path.home() / ".cache" / "s3jax" / "drift-predictors" / name
  if (path / "config.json").exists():
    return LengthPredictor.load(path)
  data = load_length_data(generators=generators)
  split = split_by_id(data.ids)
  train_d, calib_d = data.subset(split.train), data.subset(split.calib)
  cfg = LengthModelConfig(generators=(ANY_GENERATOR, *data.generators), trainable_layers=3)
  result = train(
    model_cfg=cfg,
    train_cfg=TrainConfig(epochs=8, encoder_lr=5e-5, head_lr=3e-4),
    prompts=list(train_d.prompts),
    lengths=train_d.lengths,
    calib_prompts=list(calib_d.prompts),
    calib_lengths=calib_d.lengths,
    progress=True,
  )
  predictor = LengthPredictor(
    result.model,
    buckets=BucketScheme.equal_width(10, 2048),
    calibration=None,
    generator=default,
    meta={"trained_on": generators},
  )
  predictor = predictor.calibrated(list(calib_d.prompts), calib_d.lengths)
  predictor.save(path)
  return predictor


def rolling(values: np.ndarray, window: int) -> np.ndarray:
  kernel = np.ones(window) / window
  return np.convolve(values, kernel, mode="valid") if len(values) >= window else np.asarray([])


def summarize(run, retrainer, window: int) -> dict:
  reqs = run.requests
  by_finish = sorted(reqs, key=lambda r: r.finished_at)
  by_arrival = sorted(reqs, key=lambda r: r.submitted_at)
  overflow = np.asarray([len(r.output_ids) > r.predicted_output_len for r in by_arrival])
  steps = np.diff([s.t_s for s in run.timeline])
  t0 = min(r.submitted_at for r in reqs)
  out = {
    **run.summary(),
    "overflow_rate": float(overflow.mean()),
    "overflow_rate_last_half": float(overflow[len(overflow) // 2 :].mean()),
    "mean_reserved": float(np.mean([r.predicted_output_len for r in reqs])),
    "mean_reserved_last_half": float(np.mean([r.predicted_output_len for r in by_arrival[len(reqs) // 2 :]])),
    "step_ms_median": 1e3 * float(np.median(steps)),
    "step_ms_mean": 1e3 * float(np.mean(steps)),
    "series": {
      "finish_t": [r.finished_at - t0 for r in by_finish],
      "overflow": rolling(
        np.asarray([len(r.output_ids) > r.predicted_output_len for r in by_finish], float), window
      ).tolist(),
      "arrival_t": [r.submitted_at - t0 for r in by_arrival],
      "reserved": rolling(np.asarray([r.predicted_output_len for r in by_arrival], float), window).tolist(),
      "grows": np.cumsum([r.grows for r in by_finish]).tolist(),
      "preemptions": np.cumsum([r.preemptions for r in by_finish]).tolist(),
      "tokens": np.cumsum([len(r.output_ids) for r in by_finish]).tolist(),
    },
  }
  if retrainer is not None:
    decisions = [{**d, "t_s": d["at_perf_s"] - t0} for d in retrainer.decisions]  # since the first arrival
    out["retraining"] = {"decisions": decisions, "stats": vars(retrainer.stats())}
  return out


def plot(results: dict, path: pathlib.Path, window: int) -> None:
  try:
    import matplotlib
  except ModuleNotFoundError as e:
    raise missing_extra(e, "train", "the drift experiment's plot") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  for i, (name, r) in enumerate(results.items()):
    s, c = r["series"], f"C{i}"
    finish, arrival = np.asarray(s["finish_t"]), np.asarray(s["arrival_t"])
    axes[0, 0].plot(finish[window - 1 :], s["overflow"], color=c, label=name)
    axes[0, 1].plot(finish, s["grows"], color=c, label=f"{name}: grows")
    axes[0, 1].plot(finish, s["preemptions"], color=c, ls="--", label=f"{name}: preemptions")
    axes[1, 0].plot(arrival[window - 1 :], s["reserved"], color=c, label=name)
    tokens = np.asarray(s["tokens"])
    rate = (tokens[window:] - tokens[:-window]) / np.maximum(finish[window:] - finish[:-window], 1e-9)
    axes[1, 1].plot(finish[window:], rate, color=c, label=name)
    for d in r.get("retraining", {}).get("decisions", []):
      if d.get("accepted"):
        axes[0, 0].axvline(d["t_s"], color=c, lw=0.6, alpha=0.5)
  titles = (
    f"overflow rate (last {window} finished requests; lines: swaps accepted)",
    "re-buckets (solid) and preemptions (dashed), cumulative",
    f"reserved answer tokens per request (last {window} arrivals)",
    f"throughput, tokens/s (last {window})",
  )
  for ax, title in zip(axes.ravel(), titles):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("seconds since the first arrival")
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  axes[0, 1].legend(fontsize=6, ncol=2)
  fig.suptitle(f"drift: predictors trained on other models serve {SERVED}'s answer lengths", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--requests", type=int, default=400)
  p.add_argument("--rate", type=float, default=2.5, help="Poisson arrivals per second")
  p.add_argument("--model", default="gpt2-mini-2k")
  p.add_argument("--memory-budget", default="144MiB")
  p.add_argument("--max-output", type=int, default=1024)
  p.add_argument("--retrain-every", type=int, default=64)
  p.add_argument("--window", type=int, default=50, help="requests the rolling series average over")
  p.add_argument("--runs", nargs="*", default=["offline", "drift, off", "drift, on", "cold, on"])
  args = p.parse_args(argv)
  OUT.mkdir(parents=True, exist_ok=True)
  runner = ModelRunner.load(args.model, seed=0)
  trace = load_trace(
    SERVED, num_requests=args.requests, seed=0, max_len=runner.cfg.max_seq_len, max_output=args.max_output
  )
  tokenizer = load_tokenizer()
  prompt_ids = [tokenizer.encode(text) for text in trace.prompts]
  arrivals = poisson_arrivals(len(trace), args.rate, seed=0)
  config = EngineConfig.create(policy="s3", memory_budget=args.memory_budget)
  retrain = RetrainConfig(every=args.retrain_every, min_examples=48, min_new=24, window=args.window, epochs=20)
  all_gens = list(load_length_data().generators)
  results = {}
  for name in args.runs:
    if name == "offline":
      predictor, retrainer = LengthPredictor.load_default(generator=SERVED), None
    elif name.startswith("drift"):
      predictor = train_predictor("short-only", [SHORT], SHORT)
      retrainer = OnlineRetrainer(predictor, retrain) if name.endswith("on") else None
    else:
      predictor = train_predictor("without-served", [g for g in all_gens if g != SERVED], ANY_GENERATOR)
      predictor = predictor.with_options(ANY_GENERATOR)
      retrainer = OnlineRetrainer(predictor, retrain)
    t0 = time.perf_counter()
    run = replay(
      runner, config, trace, prompt_ids, predictor=predictor, arrivals_s=arrivals, retrainer=retrainer, progress=True
    )
    results[name] = summarize(run, retrainer, args.window)
    r = results[name]
    print(
      f"{name}: overflow {r['overflow_rate']:.3f} (last half {r['overflow_rate_last_half']:.3f}), reserved "
      f"{r['mean_reserved']:.0f} (last half {r['mean_reserved_last_half']:.0f}), {r['tokens_per_s']:.1f} tok/s, "
      f"step {r['step_ms_median']:.1f} ms, {time.perf_counter() - t0:.0f} s",
      flush=True,
    )
  settings = {
    "command": "python scripts/drift_experiment.py " + " ".join(sys.argv[1:] if argv is None else argv),
    "date": time.strftime("%Y-%m-%d"),
    **vars(args),
    "retrain": vars(retrain),
  }
  (OUT / "drift.json").write_text(json.dumps({"settings": settings, "runs": results}, indent=1) + "\n")
  plot(results, OUT / "drift.png", args.window)
  print(
    "| run | overflow | overflow, last half | reserved / request | last half | tok/s | step ms (median) "
    "| retraining runs (accepted) |\n|---|---:|---:|---:|---:|---:|---:|---|"
  )
  for name, r in results.items():
    st = r.get("retraining", {}).get("stats", {})
    print(
      f"| {name} | {r['overflow_rate']:.3f} | {r['overflow_rate_last_half']:.3f} | {r['mean_reserved']:.0f} "
      f"| {r['mean_reserved_last_half']:.0f} | {r['tokens_per_s']:.1f} | {r['step_ms_median']:.1f} "
      f"| {st.get('runs', '-')} ({st.get('accepted', '-')}) |"
    )


if __name__ == "__main__":
  main()
