#!/usr/bin/env python
"""The simulator: calibrate it on this CPU, check it against the real engine, run the paper's settings.

Four jobs, each writing JSON (and the paper's, a PNG) under --out:

  calibrate   time the engine's own decode and prefill executables of --model one call at a time
              and fit this CPU's roofline (s3jax.sim.calibrate) -> cpu_<model>.json
  validate    replay the traces and budgets of engine benchmark JSONs (scripts/benchmark.py) in the
              simulator on the fitted CPU and print simulated against measured tokens/s
  paper       the paper's experiments on the A100's data sheet: GPT-J 6B and GPT-NeoX 20B on one
              A100-80GB, GPT-3 175B in 6, 8 and 10 pipeline stages on as many A100s; max, s3 and
              oracle on one trace, all requests at once; then, on one A100, Poisson arrivals at
              rising rates and each policy's goodput under the paper's 0.1875 s-per-token SLO
  policies    every scheduling policy (the predictor-free peers on-demand and adaptive, max, the
              best constant, s3-reserve, s3 and the oracle) on one A100-80GB at the paper's budget
              for each --models shape: offline, then Poisson arrivals at multiples of max's
              offline rate, with goodput as vllm bench serve defines it (TTFT <= 2 s, TPOT <=
              0.1875 s)

Usage:
  python scripts/simulate.py calibrate
  python scripts/simulate.py validate results/benchmark/v14_n32.json results/benchmark/calib_alpaca7b_n32.json
  python scripts/simulate.py paper --generator llama-2-7b-chat-hf
  python scripts/simulate.py policies --generator Meta-Llama-3-8B-Instruct --models gpt-j-6b llama-2-7b
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys

from s3jax.assets import REPO_ROOT
from s3jax.bench.experiment import BENCH_MODEL

POLICIES = ("max", "s3", "oracle")
PAPER = (("gpt-j-6b", 1), ("gpt-neox-20b", 1), ("gpt3-175b", 6), ("gpt3-175b", 8), ("gpt3-175b", 10))
PAPER_SLO_S = 0.1875  # s per output token (S3_PAPER.md)
RATE_MULTIPLES = (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # of max's offline requests/s


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("job", choices=("calibrate", "validate", "paper", "policies"))
  p.add_argument("benchmarks", nargs="*", help="validate: engine benchmark JSONs to replay")
  p.add_argument("--model", default=BENCH_MODEL, help="calibrate: the model whose executables are timed")
  p.add_argument("--device-file", default=None, help="the fitted CPU (default: <out>/cpu_<model>.json)")
  p.add_argument("--generator", default="llama-2-7b-chat-hf", help="paper: whose answer lengths replay")
  p.add_argument("--num-requests", type=int, default=None, help="paper: requests (default: every prompt)")
  p.add_argument("--models", nargs="+", default=["gpt-j-6b"], help="policies: model shapes under configs/models/")
  p.add_argument(
    "--systems",
    default="max,constant@256,on-demand,adaptive,s3-reserve,s3,oracle,oracle+fcfs",
    help="policies: systems to simulate (as scripts/benchmark.py names them)",
  )
  p.add_argument("--rates", default="0.5,1,1.5,2,3", help="policies: arrival rates as multiples of max's offline rate")
  p.add_argument("--out", default=str(REPO_ROOT / "results" / "sim"))
  return p.parse_args(argv)


@functools.cache
def shipped_predictor():
  """Loaded once per process: validate reads several benchmarks with it."""
  from s3jax.predictor import LengthPredictor

  return LengthPredictor.load_default()


def predicted_lengths(prompts, generator: str | None = None):
  """The shipped predictor's reservation and calibrated distribution for each prompt (what the
  engine's s3 policies read), with the generator's own head."""
  from s3jax.scheduler import LengthDist

  predictor = shipped_predictor()
  predictor = predictor.with_options(predictor.head_for(generator))
  reserve, dists = predictor.predict_lengths(list(prompts))
  return [(int(t), LengthDist(float(m), float(s))) for t, (m, s) in zip(reserve, dists)]


def calibrate(args) -> int:
  from tqdm.auto import tqdm

  from s3jax.engine import EngineConfig
  from s3jax.executor.runner import DEFAULT_COMPILATION_CACHE, ModelRunner, set_compilation_cache
  from s3jax.executor.step_state import StepShapes
  from s3jax.sim import CostModel
  from s3jax.sim.calibrate import fit_device, fit_errors, save_device, time_decodes, time_prefills

  set_compilation_cache(DEFAULT_COMPILATION_CACHE)
  runner = ModelRunner.load(args.model, seed=0)
  max_len = runner.cfg.max_seq_len
  budget = 4 * max_len * runner.kv_bytes_per_token()  # the benchmark's pool
  layout = EngineConfig.create(memory_budget=budget).scheduler.layout(
    kv_bytes_per_token=runner.kv_bytes_per_token(), max_len=max_len
  )
  # Batches and cache lengths the benchmark's runs go through, within its pool (8,192 tokens).
  grid = [
    (4, 64),
    (4, 256),
    (4, 768),
    (4, 1536),
    (8, 64),
    (8, 256),
    (8, 768),
    (16, 64),
    (16, 256),
    (16, 400),
    (32, 64),
    (32, 160),
  ]
  lengths = (32, 128, 512, 2048)
  shapes = StepShapes.create(
    max_seq_len=max_len,
    num_pages=layout.num_pages,
    page_size=layout.page_size,
    batch_sizes=layout.batch_sizes,
    max_admissions=32,
  )
  bar = tqdm(total=len(grid) + len(lengths), desc="timing calls", unit="call")
  timings = time_decodes(runner, shapes, grid, progress=lambda: bar.update(1))
  timings += time_prefills(runner, shapes, lengths, progress=lambda: bar.update(1))
  bar.close()
  cost = CostModel(model=runner.cfg, device=None, dtype_bytes=4)
  device = fit_device(cost, timings, name="this CPU (2 cores, fitted)", memory_bytes=budget)
  cost = dataclasses.replace(cost, device=device)
  errors = fit_errors(cost, timings)
  path = pathlib.Path(args.device_file or pathlib.Path(args.out) / f"cpu_{args.model}.json")
  save_device(device, timings, path)
  print(
    f"fitted: overhead {device.call_overhead_s * 1e3:.1f} ms/call, F {device.flops_per_s / 1e9:.1f} GFLOP/s, "
    f"BW {device.bytes_per_s / 1e9:.1f} GB/s"
  )
  print("| call | rows | tokens | measured ms | fitted ms | error |\n|---|---:|---:|---:|---:|---:|")
  for t, e in zip(timings, errors):
    print(f"| {t.kind} | {t.rows} | {t.tokens} | {t.seconds * 1e3:.1f} | {t.seconds * (1 + e) * 1e3:.1f} | {e:+.1%} |")
  print(f"wrote {path}")
  return 0


def validate(args) -> int:
  from s3jax.bench.experiment import system_options
  from s3jax.bench.trace import held_out_ids, load_trace
  from s3jax.engine import EngineConfig
  from s3jax.models.config import load_model_config
  from s3jax.sim import CostModel, simulate
  from s3jax.sim.calibrate import load_device

  rows, out = [], []
  for path in args.benchmarks:
    bench = json.loads(pathlib.Path(path).read_text())
    s = bench["settings"]
    cfg = load_model_config(s["model"])
    device = load_device(args.device_file or pathlib.Path(args.out) / f"cpu_{s['model']}.json")
    cost = CostModel(model=cfg, device=device, dtype_bytes=4)
    ids = held_out_ids(s["generator"]) if s["split"] == "test" else None
    trace = load_trace(
      s["generator"],
      num_requests=s["requests"],
      seed=s["seed"],
      max_len=cfg.max_seq_len,
      max_output=s["max_output"],
      ids=ids,
    )
    predicted = predicted_lengths(trace.prompts, s["generator"])
    requests = sim_requests(trace, predicted)
    for budget in bench["budgets"]:
      runs = [("offline", name, measured, requests) for name, measured in budget["policies"].items()]
      for rate, by_policy in budget.get("online", {}).items():
        timed = arriving(requests, float(rate), s["seed"])
        runs += [(f"{rate} req/s", name, measured, timed) for name, measured in by_policy.items()]
      for scenario, policy, measured, reqs in runs:
        config = EngineConfig.create(memory_budget=budget["budget_bytes"], **system_options(policy))
        sim = simulate(reqs, config, cost).summary()
        row = {
          "benchmark": path,
          "generator": s["generator"],
          "budget_mib": budget["budget_bytes"] / 2**20,
          "scenario": scenario,
          "policy": policy,
          "measured_tokens_per_s": measured["tokens_per_s"],
          "simulated_tokens_per_s": sim["tokens_per_s"],
          "measured_steps": measured["steps"],
          "simulated_steps": sim["steps"],
          "measured_tpot_p90_s": measured.get("tpot_p90_s"),
          "simulated_tpot_p90_s": sim["tpot_p90_s"],
        }
        row["error"] = row["simulated_tokens_per_s"] / row["measured_tokens_per_s"] - 1
        rows.append(row)
        out.append({**row, "simulated": sim})
  print(
    "| trace | budget MiB | arrivals | system | measured tok/s | simulated tok/s | error | iterations "
    "(engine / sim) | TPOT p90 s (engine / sim) |"
  )
  print("|---|---:|---|---|---:|---:|---:|---|---|")
  for r in rows:
    tpot = (
      f"{r['measured_tpot_p90_s']:.3f} / {r['simulated_tpot_p90_s']:.3f}"
      if r["measured_tpot_p90_s"] is not None
      else ""
    )
    print(
      f"| {r['generator']} | {r['budget_mib']:.0f} | {r['scenario']} | {r['policy']} | "
      f"{r['measured_tokens_per_s']:.1f} | {r['simulated_tokens_per_s']:.1f} | {r['error']:+.1%} | "
      f"{r['measured_steps']} / {r['simulated_steps']} | {tpot} |"
    )
  worst = max(abs(r["error"]) for r in rows)
  print(f"\nlargest error {worst:.1%} over {len(rows)} runs")
  dest = pathlib.Path(args.out) / "validate.json"
  dest.parent.mkdir(parents=True, exist_ok=True)
  dest.write_text(json.dumps(out, indent=1))
  return 0


def paper(args) -> int:
  from s3jax.bench.trace import load_trace
  from s3jax.engine import EngineConfig
  from s3jax.models.config import load_model_config
  from s3jax.sim import A100_80GB, CostModel, simulate

  results = []
  predicted = None
  for name, devices in PAPER:
    cfg = load_model_config(name)
    cost = CostModel(model=cfg, device=A100_80GB, dtype_bytes=2, stages=devices)
    trace = load_trace(args.generator, num_requests=args.num_requests, seed=0, max_len=cfg.max_seq_len)
    if predicted is None:
      predicted = predicted_lengths(trace.prompts, args.generator)
    requests = sim_requests(trace, predicted)
    budget = cost.kv_budget_bytes()
    row = {
      "model": name,
      "devices": devices,
      "kv_budget_gb": budget / 1e9,
      "max_len_sequences": budget / (cfg.max_seq_len * cost.kv_bytes_per_token),
    }
    # Rows up to what the budget holds at 128 tokens each (the engine caps them at 256 by default).
    configs = {
      policy: EngineConfig.create(
        policy=policy, memory_budget=budget, max_slots=min(1024, budget // (128 * cost.kv_bytes_per_token))
      )
      for policy in POLICIES
    }
    for policy, config in configs.items():
      row[policy] = simulate(requests, config, cost).summary()
    if devices == 1:
      row["online"] = online_sweep(requests, configs, cost, len(requests) / row["max"]["wall_s"])
    row["s3/max"] = row["s3"]["tokens_per_s"] / row["max"]["tokens_per_s"]
    row["s3/oracle"] = row["s3"]["tokens_per_s"] / row["oracle"]["tokens_per_s"]
    results.append(row)
    print(
      f"{name} on {devices} x A100: budget {budget / 1e9:.0f} GB ({row['max_len_sequences']:.1f} max-length "
      f"sequences); max {row['max']['tokens_per_s']:.0f}, s3 {row['s3']['tokens_per_s']:.0f}, oracle "
      f"{row['oracle']['tokens_per_s']:.0f} tok/s; s3/max {row['s3/max']:.2f}, s3/oracle {row['s3/oracle']:.2f}; "
      f"mean batch {row['max']['mean_batch']:.0f} / {row['s3']['mean_batch']:.0f} / "
      f"{row['oracle']['mean_batch']:.0f}",
      flush=True,
    )
    if "online" in row:
      good = row["online"]["goodput_req_per_s"]
      print(
        "  online goodput, req/s (p90 TPOT / p90 normalized latency <= 0.1875 s): "
        + ", ".join(f"{p} {rate_text(g['tpot'])} / {rate_text(g['norm'])}" for p, g in good.items()),
        flush=True,
      )
  by = {(r["model"], r["devices"]): r for r in results}
  six_vs_ten = by[("gpt3-175b", 6)]["s3"]["tokens_per_s"] / by[("gpt3-175b", 10)]["max"]["tokens_per_s"]
  print(f"GPT-3 175B: s3 on 6 A100s / max on 10 A100s = {six_vs_ten:.2f}")
  dest = pathlib.Path(args.out) / f"paper_{args.generator}.json"
  dest.parent.mkdir(parents=True, exist_ok=True)
  dest.write_text(
    json.dumps(
      {
        "generator": args.generator,
        "requests": len(predicted),
        "device": dataclasses.asdict(A100_80GB),
        "rows": results,
        "gpt3_s3_6_over_max_10": six_vs_ten,
      },
      indent=1,
    )
  )
  plot_paper(results, dest.with_suffix(".png"), args.generator)
  print(f"wrote {dest} and {dest.with_suffix('.png')}")
  return 0


def policies(args) -> int:
  from s3jax.bench.experiment import system_options
  from s3jax.bench.trace import load_trace
  from s3jax.engine import EngineConfig
  from s3jax.models.config import load_model_config
  from s3jax.sim import A100_80GB, CostModel, simulate
  from s3jax.stats import goodput

  systems = [x.strip() for x in args.systems.split(",") if x.strip()]
  slo = {"ttft": 2.0, "tpot": PAPER_SLO_S}
  rows = []
  for name in args.models:
    cfg = load_model_config(name)
    cost = CostModel(model=cfg, device=A100_80GB, dtype_bytes=2)
    trace = load_trace(args.generator, num_requests=args.num_requests, seed=0, max_len=cfg.max_seq_len)
    requests = sim_requests(trace, predicted_lengths(trace.prompts, args.generator))
    budget = cost.kv_budget_bytes()
    rows_cap = min(1024, budget // (128 * cost.kv_bytes_per_token))  # rows up to the budget at 128 tokens each
    configs = {s: EngineConfig.create(memory_budget=budget, max_slots=rows_cap, **system_options(s)) for s in systems}
    row = {"model": name, "kv_budget_gb": budget / 1e9, "offline": {}, "online": {}}
    for s, config in configs.items():
      row["offline"][s] = simulate(requests, config, cost).summary()
    base = len(requests) / row["offline"]["max"]["wall_s"] if "max" in row["offline"] else 1.0
    for multiple in (float(m) for m in args.rates.split(",")):
      timed = arriving(requests, base * multiple)
      row["online"][f"{base * multiple:.2f}"] = runs = {}
      for s in ("on-demand", "adaptive", "s3", "oracle"):
        if s in configs:
          run = simulate(timed, configs[s], cost)
          runs[s] = run.summary() | {
            "goodput_req_per_s": goodput(
              [r.arrival_s for r in run.requests],
              [r.first_token_s for r in run.requests],
              [r.finished_s for r in run.requests],
              [r.generated for r in run.requests],
              run.wall_s,
              slo,
            )
          }
    rows.append(row)
    print(
      f"\n{name} on one A100-80GB (simulated), KV budget {budget / 1e9:.0f} GB, "
      f"{len(requests)} {args.generator} requests"
    )
    print(
      "| system | tok/s | mean batch | preemptions | recomputed tokens | e2e mean / p99 s |\n"
      "|---|---:|---:|---:|---:|---|"
    )
    for s, r in row["offline"].items():
      print(
        f"| {s} | {r['tokens_per_s']:.0f} | {r['mean_batch']:.0f} | {r['preemptions']} | {r['recomputed_tokens']} | "
        f"{r['e2e_mean_s']:.1f} / {r['e2e_p99_s']:.1f} |"
      )
    print("\n| rate req/s | system | goodput req/s | e2e mean / p99 s | TPOT p90 s |\n|---:|---|---:|---|---:|")
    for rate, runs in row["online"].items():
      for s, r in runs.items():
        print(
          f"| {rate} | {s} | {r['goodput_req_per_s']:.2f} | {r['e2e_mean_s']:.1f} / {r['e2e_p99_s']:.1f} | "
          f"{r['tpot_p90_s']:.3f} |"
        )
  dest = pathlib.Path(args.out) / f"policies_{args.generator}.json"
  dest.parent.mkdir(parents=True, exist_ok=True)
  dest.write_text(json.dumps({"generator": args.generator, "slo_s": slo, "rows": rows}, indent=1))
  print(f"wrote {dest}")
  return 0


def sim_requests(trace, predicted: list) -> list:
  """The simulator's requests of a trace with their ``predicted_lengths``."""
  from s3jax.sim import SimRequest

  return [
    SimRequest(prompt_len=int(p), output_len=int(n), predicted_output_len=q, predicted_length=d)
    for p, n, (q, d) in zip(trace.prompt_lens, trace.output_lens, predicted)
  ]


def arriving(requests, rate: float, seed: int = 0) -> list:
  """Copies of the simulator's requests arriving as a Poisson process (``poisson_arrivals``)."""
  from s3jax.bench.trace import poisson_arrivals

  arrivals = poisson_arrivals(len(requests), rate, seed)
  return [dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(requests, arrivals)]


def rate_text(rate: float | None) -> str:
  return "none" if rate is None else f"{rate:.2f}"


def online_sweep(requests, configs, cost, base_rate: float) -> dict:
  """Poisson arrivals at multiples of ``base_rate``; per policy, percentiles per rate and goodput:
  the highest rate whose p90 time per output token (TPOT), and whose p90 normalized latency
  (end-to-end over output tokens, queueing included), stay within the paper's SLO."""
  from s3jax.bench.report import max_rate_within_slo
  from s3jax.sim import simulate

  runs = {}
  for multiple in RATE_MULTIPLES:
    rate = base_rate * multiple
    timed = arriving(requests, rate)
    runs[f"{rate:.3f}"] = {p: simulate(timed, c, cost).summary() for p, c in configs.items()}
  by_metric = {metric: max_rate_within_slo(runs, PAPER_SLO_S, metric) for metric in ("tpot", "norm")}
  good = {p: {metric: by_metric[metric][p] for metric in by_metric} for p in configs}
  return {"runs": runs, "goodput_req_per_s": good, "slo_s": PAPER_SLO_S}


def plot_paper(results, path, generator) -> None:
  from s3jax.extras import missing_extra

  try:
    import matplotlib
  except ModuleNotFoundError as e:
    raise missing_extra(e, "bench", "the simulation's plot") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  labels = [f"{r['model']}\n{r['devices']} x A100" for r in results]
  x = np.arange(len(results))
  fig, ax = plt.subplots(figsize=(10, 4.5))
  for i, (policy, color) in enumerate((("max", "#999999"), ("s3", "#1f77b4"), ("oracle", "#2ca02c"))):
    ax.bar(x + (i - 1) * 0.27, [r[policy]["tokens_per_s"] for r in results], 0.27, label=policy, color=color)
  ax.set_xticks(x, labels)
  ax.set_yscale("log")
  ax.set_ylabel("output tokens / s (simulated)")
  ax.set_title(f"Simulated A100-80GB (data sheet x assumed efficiency), {generator} trace, all requests at once")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  args = parse_args(argv)
  return {"calibrate": calibrate, "validate": validate, "paper": paper, "policies": policies}[args.job](args)


if __name__ == "__main__":
  sys.exit(main())
