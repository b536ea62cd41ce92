#!/usr/bin/env python
"""How well can any predictor rank a sampled answer's (remaining) length? (issue 30, offline)

A sampled answer's length is a random draw: the same prompt, sampled again, gives another length.
No predictor, however good, ranks the draws better than the draws' own spread allows. This script
measures that spread on the served model itself: for each test answer of
``results/self_refresh/answers.jsonl`` still running after t generated tokens, it samples K more
continuations of the same prefix (prompt + the answer's first t tokens; same temperature and
top-p, other seeds) and reads their remaining lengths.

Reported per t, on the test answers running at t (Kendall tau against the recorded answer's
remaining length L - t, the quantity the predictors are judged on in BENCHMARKS.md):

  * one resample: another draw of the same conditional distribution used as the prediction (a
    lower bound on what the best possible predictor reaches: it carries the draws' noise twice);
  * the mean of K resamples' log-lengths: an estimate of the conditional mean, the best predictor of
    a rank, that approaches the ceiling as K grows (noisier for small K: a lower bound too);
  * the best predictor measured so far at that t (``results/self_refresh/metrics.json``).

  python scripts/length_noise_ceiling.py     # about 20 minutes on 2 CPU cores (points 0,128,256, K=2)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from s3jax.assets import REPO_ROOT

DATA = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.jsonl"
ANSWERS = REPO_ROOT / "results" / "self_refresh" / "answers.jsonl"
REFRESH = REPO_ROOT / "results" / "self_refresh" / "metrics.json"
SECTION = "## How well can a sampled answer's length be ranked at all? (issue 30, offline)"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", type=pathlib.Path, default=DATA, help="the served model's length data: the split")
  p.add_argument("--answers", type=pathlib.Path, default=ANSWERS, help="its answers with token ids")
  p.add_argument("--points", default="0,128,256", help="generated tokens the continuations start after")
  p.add_argument("--resamples", type=int, default=2, help="K continuations per answer and point")
  p.add_argument("--memory-budget", default="2GiB", help="KV cache of the sampling run")
  p.add_argument("--results", type=pathlib.Path, default=REPO_ROOT / "results" / "noise_ceiling")
  p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
  return p.parse_args(argv)


def seed_of(answer_id: int, t: int, k: int) -> int:
  """A seed per (answer, point, resample), none equal to the recorded answers' seeds (0 + id)."""
  return (k + 1) * 1_000_000 + int(answer_id) * 1_000 + t


def best_measured(t: int) -> tuple[str, float] | None:
  """The highest tau at point t among the predictors self_prediction_refresh.py measured."""
  if not REFRESH.exists():
    return None
  table = json.loads(REFRESH.read_text())["table"]
  rows = [(label, by_t[str(t)]["kendall_tau"]) for label, by_t in table.items() if str(t) in by_t]
  return max(rows, key=lambda r: r[1]) if rows else None


def main(argv=None) -> int:
  args = parse_args(argv)
  from s3jax import LLM, SamplingParams
  from s3jax.predictor.data import user_split_by_text
  from s3jax.predictor.metrics import kendall_tau

  points = [int(x) for x in args.points.split(",")]
  role = user_split_by_text(args.data)
  answers = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
  test = [a for a in answers if role[a["instruction"].strip()] == "test"]
  temperature, top_p = 0.7, 0.9
  if any(a["decoding"] != f"T={temperature},top_p={top_p},seed=0+id" for a in test):
    raise SystemExit(f"the answers were not sampled at T={temperature}, top-p {top_p}: {test[0]['decoding']}")
  llm = LLM(None, predictor=None, policy="max", memory_budget=args.memory_budget)
  if llm.model_name != test[0]["generator"]:
    raise SystemExit(f"the served model is {llm.model_name!r}, the answers are {test[0]['generator']!r}'s")

  jobs, prompts, params = [], [], []  # one per (answer, point, resample)
  for a in test:
    chat = llm.chat_prompt_ids([{"role": "user", "content": a["instruction"]}])
    for t in points:
      if t and a["output_tokens"] <= t:
        continue  # it had ended by t: nothing remains to rank
      for k in range(args.resamples):
        jobs.append((a["id"], t, k))
        prompts.append(chat + a["output_ids"][:t])
        params.append(
          SamplingParams(
            max_tokens=a["max_tokens"] - t, temperature=temperature, top_p=top_p, seed=seed_of(a["id"], t, k)
          )
        )
  print(f"{len(jobs)} continuations of {len(test)} test answers at t = {points}", file=sys.stderr)
  outputs = llm.generate(prompts, params, progress=True)
  remaining: dict[tuple[int, int], list[int]] = {}
  for (i, t, _), out in zip(jobs, outputs):
    ended = out.finish_reason.value == "stop"  # the token that ended it is not counted (as the length data)
    remaining.setdefault((i, t), []).append(len(out.token_ids) - ended)

  recorded = {a["id"]: a["output_tokens"] for a in test}
  table = {}
  for t in points:
    keys = [(i, t) for i in recorded if (i, t) in remaining]
    truth = np.asarray([recorded[i] - t for i, _ in keys], np.float64)
    draws = np.asarray([remaining[key] for key in keys], np.float64)  # [P, K]
    row = {
      "n": len(keys),
      "one_resample": float(np.mean([kendall_tau(draws[:, k], truth) for k in range(args.resamples)])),
      "mean_of_resamples": float(kendall_tau(np.log1p(draws).mean(1), truth)),
      "resamples_against_each_other": float(kendall_tau(draws[:, 0], draws[:, 1])) if args.resamples > 1 else None,
      "median_remaining": float(np.median(truth)),
    }
    best = best_measured(t)
    if best is not None:
      row["best_measured"], row["best_measured_tau"] = best
    table[t] = row

  command = "python scripts/length_noise_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
  lines = [
    f"| t | running | one resample | mean of {args.resamples} resamples | best predictor measured | its tau |",
    "|---:|---:|---:|---:|---|---:|",
  ]
  for t, row in table.items():
    lines.append(
      f"| {t} | {row['n']} | {row['one_resample']:.3f} | {row['mean_of_resamples']:.3f} | "
      f"{row.get('best_measured', '-')} | {row.get('best_measured_tau', float('nan')):.3f} |"
    )
  text = "\n".join(
    [
      SECTION,
      "",
      f"`{command.strip()}`: {len(test)} of {llm.model_name}'s test answers (T={temperature}, top-p {top_p}, at "
      f"most 512 tokens); for each still running after t tokens, {args.resamples} more continuations of the same "
      "prefix with other seeds. Kendall tau against the recorded answer's remaining tokens L - t, as the "
      "predictors are judged. A resample is a draw of exactly the distribution a perfect predictor would "
      "know, so its tau (and that of the mean of a few) bounds from below what the best possible predictor "
      "reaches; the gap to the best predictor measured is what a better predictor could still win.",
      "",
      *lines,
      "",
    ]
  )
  print(text)
  args.results.mkdir(parents=True, exist_ok=True)
  (args.results / "metrics.json").write_text(json.dumps({"command": command, "table": table}, indent=1) + "\n")
  with (args.results / "resamples.jsonl").open("w") as f:
    for (i, t), lens in sorted(remaining.items()):
      f.write(json.dumps({"id": i, "t": t, "recorded_remaining": recorded[i] - t, "resampled_remaining": lens}) + "\n")
  if not args.no_write:
    from bench_decode import write_section

    write_section(text + "\n", REPO_ROOT / "BENCHMARKS.md", SECTION)
  return 0


if __name__ == "__main__":
  sys.exit(main())
