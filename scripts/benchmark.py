#!/usr/bin/env python
"""Engine benchmark: the max, s3 and oracle policies on one real trace, in one run.

Replays an alpaca_eval trace (prompts = instructions; answer lengths = the
generator's answers in GPT-2 tokens, clipped so prompt + answer <= the model's
maximum) through ``s3jax.LLM`` once per policy, all requests submitted at once,
with the same model, weights, memory budget and requests. Weights are random,
so answers end through ``eos_at`` (the trace length, invisible to every policy)
and greedy decoding makes every policy's tokens comparable request by request.

Every request asks for ``max_tokens=None`` (as much as the model holds), so the
max policy reserves the full maximum length, S3 the predicted bucket's upper
bound and the oracle the true length: the paper's comparison.

Compilation is kept out of the timed runs: each policy first replays the same
requests cut to ``--warmup-tokens`` answer tokens (same prompts, same
reservations, so the same prefill shapes, arena classes and slot counts are
compiled), then the timed run starts on a fresh engine over the same
``ModelRunner`` (its compiled executables are kept). Compiles that still happen
in the timed run (a shape the warm-up did not reach) are reported.

Usage:
  python scripts/benchmark.py                                  # the issue's full setting
  python scripts/benchmark.py --num-requests 64 --max-output 512 --split test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from s3jax import LLM, SamplingParams
from s3jax.bench.trace import DEFAULT_DATA_DIR, DEFAULT_GENERATOR, Trace, load_trace
from s3jax.engine import Engine
from s3jax.scheduler import parse_bytes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
POLICIES = ("max", "s3", "oracle")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSample:
  """Engine state after one iteration (for the batch-size-over-time plot)."""

  t_s: float
  running: int
  waiting: int
  reserved_bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyRun:
  """One timed run of one policy over the whole trace."""

  policy: str
  wall_s: float
  cpu_s: float
  outputs: list
  metrics: dict
  scheduler: dict
  compiles: int
  timeline: list[StepSample]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--generator", default=DEFAULT_GENERATOR, help="alpaca_eval file stem whose answer lengths replay")
  p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
  p.add_argument("--num-requests", type=int, default=256)
  p.add_argument("--seed", type=int, default=0, help="trace sampling seed")
  p.add_argument("--split", choices=("all", "test"), default="all",
                 help="'test': only instructions the shipped predictor never trained on (136 of 678)")
  p.add_argument("--model", default="gpt2-small-2k")
  p.add_argument("--budget-slots", type=int, default=4,
                 help="memory budget as this many sequences of the model's maximum length")
  p.add_argument("--memory-budget", default=None, help="KV bytes, e.g. 576MiB (overrides --budget-slots)")
  p.add_argument("--min-cache-len", type=int, default=128)
  p.add_argument("--max-output", type=int, default=None,
                 help="cap on replayed answer lengths (shorter runs; policies are not told)")
  p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of max,s3,oracle")
  p.add_argument("--repeats", type=int, default=1, help="timed runs per policy; the median is reported")
  p.add_argument("--warmup-tokens", type=int, default=8,
                 help="answer tokens per request in the untimed compile warm-up (0: none)")
  p.add_argument("--out", default=str(REPO_ROOT / "results" / "benchmark"), help="output directory")
  p.add_argument("--tag", default=None, help="file name stem of the outputs (default: derived from the settings)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  args.policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
  unknown = set(args.policies) - set(POLICIES)
  if unknown or not args.policies:
    p.error(f"--policies must be a subset of {POLICIES}, got {args.policies}")
  return args


def held_out_ids(data_dir: str) -> np.ndarray:
  """Instruction ids of the predictor's test split (the split train_predictor.py uses, seed 0)."""
  from s3jax.predictor.data import split_by_id
  from s3jax.bench.trace import read_records

  ids = np.asarray(sorted(r["id"] for r in read_records(DEFAULT_GENERATOR, data_dir)))
  return ids[split_by_id(ids, seed=0).test]


def make_llm(args, policy: str, budget: int, runner, predictor) -> LLM:
  """An ``LLM`` for ``policy`` over a shared runner (and predictor, for s3)."""
  llm = LLM(args.model, predictor=predictor if policy == "s3" else None, policy=policy,
            memory_budget=budget, min_cache_len=args.min_cache_len)
  if runner is not None:
    # Compiled executables are cached per ModelRunner: sharing one pays each
    # shape's compile once across policies and guarantees identical weights.
    llm.runner = runner
    llm.engine = Engine(runner, llm.config)
  return llm


def record_steps(llm: LLM, timeline: list[StepSample], t0: float) -> None:
  """Wraps the engine's ``step`` to sample batch size and reservation after each iteration."""
  engine = llm.engine
  step = engine.step

  def sampled_step() -> int:
    produced = step()
    sched = engine.scheduler
    timeline.append(StepSample(t_s=time.perf_counter() - t0, running=sched.num_running,
                               waiting=sched.num_waiting, reserved_bytes=sched.reserved_bytes))
    return produced

  engine.step = sampled_step


def run_policy(args, llm: LLM, trace: Trace, eos_at: np.ndarray, progress: bool = True) -> PolicyRun:
  """One timed run on a fresh engine (fresh scheduler and counters, same runner)."""
  llm.engine = Engine(llm.runner, llm.config)
  timeline: list[StepSample] = []
  params = [SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)] * len(trace)
  compiles0 = llm.runner.compilations
  t0 = time.perf_counter()
  record_steps(llm, timeline, t0)
  c0 = time.process_time()
  outputs = llm.generate(list(trace.prompts), params, true_output_lens=[int(x) for x in trace.output_lens],
                         eos_at=[int(x) for x in eos_at], progress=progress and not args.no_progress)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  metrics = llm.metrics()
  return PolicyRun(policy=llm.config.policy.value, wall_s=wall, cpu_s=cpu, outputs=outputs,
                   metrics=metrics.as_dict(), scheduler=dataclasses.asdict(llm.engine.scheduler.stats),
                   compiles=llm.runner.compilations - compiles0, timeline=timeline)


def summarize(run: PolicyRun, trace: Trace) -> dict:
  outs, m = run.outputs, run.metrics
  tokens = sum(o.stats.output_tokens for o in outs)
  return {
      "policy": run.policy, "wall_s": run.wall_s, "cpu_s": run.cpu_s,
      "output_tokens": tokens, "tokens_per_s": tokens / run.wall_s, "requests_per_s": len(outs) / run.wall_s,
      "tokens_per_cpu_s": tokens / run.cpu_s,
      "peak_reserved_bytes": m["peak_reserved_bytes"], "budget_bytes": m["budget_bytes"],
      "mean_batch": m["mean_batch_size"], "max_batch": m["max_batch_size"], "slot_occupancy": m["slot_occupancy"],
      "steps": m["steps"], "decode_calls": m["decode_calls"], "prefills": m["prefills"],
      "mispredictions": m["mispredictions"], "preemptions": m["preemptions"], "rebuckets": m["rebuckets"],
      "copied_bytes": m["copied_bytes"], "recomputed_tokens": m["recomputed_tokens"], "resizes": m["resizes"],
      "compiles_in_timed_run": run.compiles, "xla_compilations_in_timed_run": m["xla_compilations"],
      "ttft_p50_s": statistics.median(o.stats.ttft_s for o in outs),
      "tpot_p50_s": statistics.median(o.stats.tpot_s for o in outs),
      "e2e_p50_s": statistics.median(o.stats.e2e_s for o in outs),
      "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in {o.finish_reason for o in outs}},
      "length_mismatches": int(sum(len(o.token_ids) != n for o, n in zip(outs, trace.output_lens))),
      "scheduler": run.scheduler,
  }


def compare_tokens(runs: dict[str, PolicyRun]) -> dict:
  """Per request, whether every policy produced the same tokens (greedy decoding)."""
  names = list(runs)
  ref = runs[names[0]].outputs
  differing = []
  for i in range(len(ref)):
    seqs = {p: runs[p].outputs[i].token_ids for p in names}
    if any(s != seqs[names[0]] for s in seqs.values()):
      # The first position at which any policy diverges from the reference.
      first = min(next((j for j, (a, b) in enumerate(zip(s, seqs[names[0]])) if a != b), min(len(s), len(ref[i].token_ids)))
                  for p, s in seqs.items() if s != seqs[names[0]])
      differing.append({"request": i, "first_divergence": first,
                        "policies": [p for p in names if seqs[p] != seqs[names[0]]]})
  return {"reference": names[0], "requests": len(ref), "identical": len(ref) - len(differing),
          "differing": differing}


def plot(results: dict, runs: dict[str, PolicyRun], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(16, 4.5))
  names = list(runs)
  tps = [results["policies"][p]["tokens_per_s"] for p in names]
  bars = ax0.bar(names, tps, color=["#999999", "#1f77b4", "#2ca02c"][:len(names)])
  ax0.bar_label(bars, fmt="%.1f")
  ax0.set_ylabel("output tokens / s")
  ax0.set_title("throughput")
  for p in names:
    tl = runs[p].timeline
    t = [s.t_s for s in tl]
    ax1.plot(t, [s.running for s in tl], label=p)
    ax2.plot(t, [s.reserved_bytes / 2**20 for s in tl], label=p)
  ax1.set_xlabel("seconds")
  ax1.set_ylabel("running sequences (batch)")
  ax1.set_title("batch size over time")
  ax1.legend()
  ax2.axhline(results["budget_bytes"] / 2**20, color="k", ls="--", lw=0.8, label="budget")
  ax2.set_xlabel("seconds")
  ax2.set_ylabel("reserved KV MiB")
  ax2.set_title("reserved KV cache over time")
  ax2.legend()
  s = results["settings"]
  fig.suptitle(f"{s['model']} on CPU, {s['requests']} {s['generator']} requests, "
               f"budget {results['budget_bytes'] / 2**20:.0f} MiB")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from s3jax.models.runner import ModelRunner  # deferred: JAX import is slow; --help stays fast

  ids = held_out_ids(args.data_dir) if args.split == "test" else None
  runner = ModelRunner.load(args.model, seed=0)
  max_len = runner.cfg.max_seq_len
  trace = load_trace(args.generator, num_requests=args.num_requests, seed=args.seed, max_len=max_len,
                     max_output=args.max_output, ids=ids, data_dir=args.data_dir)
  budget = parse_bytes(args.memory_budget) if args.memory_budget else (
      args.budget_slots * max_len * runner.kv_bytes_per_token())
  print(f"trace: {json.dumps(trace.summary())}", flush=True)
  print(f"budget: {budget} bytes = {budget / (max_len * runner.kv_bytes_per_token()):.2f} slots of {max_len} "
        f"tokens ({runner.kv_bytes_per_token()} bytes/token)", flush=True)
  predictor = None
  if "s3" in args.policies:
    from s3jax.predictor import LengthPredictor
    predictor = LengthPredictor.load_default()

  eos_at = trace.output_lens
  warm_eos = np.minimum(eos_at, max(args.warmup_tokens, 1))
  runs: dict[str, PolicyRun] = {}
  all_runs: dict[str, list[PolicyRun]] = {}
  warmup_compiles: dict[str, int] = {}
  for policy in args.policies:
    llm = make_llm(args, policy, budget, runner, predictor)
    before = runner.compilations
    if args.warmup_tokens > 0:
      t = time.perf_counter()
      run_policy(args, llm, trace, warm_eos, progress=False)
      print(f"[{policy}] warm-up: {runner.compilations - before} compiles, {time.perf_counter() - t:.1f}s",
            flush=True)
    warmup_compiles[policy] = runner.compilations - before
    all_runs[policy] = []
    for r in range(args.repeats):
      run = run_policy(args, llm, trace, eos_at)
      all_runs[policy].append(run)
      toks = sum(o.stats.output_tokens for o in run.outputs)
      print(f"[{policy}] run {r}: {toks} tokens in {run.wall_s:.1f}s = {toks / run.wall_s:.2f} tok/s "
            f"(cpu {run.cpu_s:.1f}s), {run.compiles} compiles", flush=True)
    # The median-throughput run represents the policy.
    ordered = sorted(all_runs[policy], key=lambda x: x.wall_s)
    runs[policy] = ordered[len(ordered) // 2]
    del llm

  results = {
      "settings": {
          "command": "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
          "model": args.model, "generator": args.generator, "requests": len(trace), "seed": args.seed,
          "split": args.split, "max_output": args.max_output, "min_cache_len": args.min_cache_len,
          "repeats": args.repeats, "warmup_tokens": args.warmup_tokens, "platform": platform.platform(),
          "processor": platform.processor(),
      },
      "trace": trace.summary(),
      "budget_bytes": budget,
      "kv_bytes_per_token": runner.kv_bytes_per_token(),
      "warmup_compiles": warmup_compiles,
      "policies": {p: summarize(run, trace) for p, run in runs.items()},
      "all_wall_s": {p: [r.wall_s for r in rs] for p, rs in all_runs.items()},
  }
  pol = results["policies"]
  ratios = {}
  for a, b in (("s3", "max"), ("s3", "oracle"), ("oracle", "max")):
    if a in pol and b in pol:
      for key in ("tokens_per_s", "requests_per_s", "tokens_per_cpu_s"):
        ratios[f"{a}/{b} {key}"] = pol[a][key] / pol[b][key]
  results["ratios"] = ratios
  if len(runs) > 1:
    results["tokens_identical"] = compare_tokens(runs)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tag = args.tag or f"{args.model}_{args.generator}_n{len(trace)}_b{budget}" + (
      f"_cap{args.max_output}" if args.max_output else "")
  (out / f"{tag}.json").write_text(json.dumps(results, indent=2, default=str))
  (out / f"{tag}_timeline.json").write_text(json.dumps(
      {p: [dataclasses.asdict(s) for s in r.timeline] for p, r in runs.items()}))
  plot(results, runs, out / f"{tag}.png")
  print(render_table(results))
  print(f"wrote {out / tag}.json, .png", flush=True)
  return 0


def render_table(results: dict) -> str:
  """The markdown table that goes into BENCHMARKS.md."""
  pol = results["policies"]
  rows = [
      ("output tokens/s", "tokens_per_s", "{:.2f}"), ("requests/s", "requests_per_s", "{:.3f}"),
      ("output tokens / CPU-s", "tokens_per_cpu_s", "{:.2f}"), ("wall s", "wall_s", "{:.1f}"),
      ("peak reserved MiB", "peak_reserved_bytes", None), ("mean batch", "mean_batch", "{:.2f}"),
      ("max batch", "max_batch", "{}"), ("slot occupancy", "slot_occupancy", "{:.2f}"),
      ("steps", "steps", "{}"), ("decode calls", "decode_calls", "{}"),
      ("mispredictions", "mispredictions", "{}"), ("rebuckets (moves)", "rebuckets", "{}"),
      ("preemptions", "preemptions", "{}"), ("recomputed tokens", "recomputed_tokens", "{}"),
      ("TTFT p50 s", "ttft_p50_s", "{:.1f}"), ("TPOT p50 s", "tpot_p50_s", "{:.3f}"),
      ("e2e p50 s", "e2e_p50_s", "{:.1f}"), ("compiles in timed run", "compiles_in_timed_run", "{}"),
  ]
  names = list(pol)
  lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for label, key, fmt in rows:
    cells = [f"{pol[p][key] / 2**20:.0f}" if fmt is None else fmt.format(pol[p][key]) for p in names]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
