#!/usr/bin/env python
"""Engine benchmark: policies, ablations and peers on one real trace, in one run.

Replays an alpaca_eval trace (prompts = instructions; answer lengths = the generator's answers in
GPT-2 tokens, clipped so prompt + answer <= the model's maximum) through the engine, once per
system and budget: the same runner (weights and executables), the same requests, the same budget.
Greedy decoding of random weights, each answer ended by ``eos_at`` (invisible to every policy):
every system must produce the same tokens, and the run checks it. Systems (``--policies``):

  * the predictor-free peers as policies of this engine: on-demand (vLLM v1) and adaptive
    (SGLang); max (the paper's worst case); constant@N (every request reserves N answer tokens, N
    a quantile of the training split's lengths: S3 without a predictor);
  * s3 (v3: peak-aware admission, shortest predicted first, least-waste eviction) and oracle
    (the same with the true lengths); s3-reserve (the paper's S3: reserve the predicted quantile);
    POLICY+ORDER runs a policy with another admission order (s3+fcfs, oracle+fcfs);
  * peers (``--peers``; need torch): transformers' paged continuous batching (pages on demand:
    the vLLM design) and Hugging Face ``generate`` on static batches, same model shape, trace and
    KV byte budget.

Offline, all requests arrive at once. Online (``--online-rates``), requests arrive as a Poisson
process at each rate (and, with ``--bursty-rate``, once more as a gamma process of shape
``--burstiness``, vLLM's ``--burstiness``), and the run reports latency means and percentiles
and goodput as ``vllm bench serve --goodput`` defines it: requests per second meeting every SLO.
The SLOs are the paper's 0.1875 s per output token and a 2 s time to first token on an A100
serving GPT-J, scaled by this device's decode step against the simulated A100's (``s3jax.sim``),
stated in the output.

Each policy's engine is warmed up first (untimed), so the timed runs compile nothing; the run
counts XLA compilations to show it.

Usage:
  python scripts/benchmark.py --num-requests 32 --split test
  python scripts/benchmark.py --num-requests 32 --split test --budget-slots 2 4 --online-rates 0.1 0.2 0.4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

from s3jax.assets import REPO_ROOT

POLICIES = ("max", "on-demand", "adaptive", "s3", "oracle")
PEERS = ("transformers-cb", "hf-static")
PREDICTOR_FREE = ("on-demand", "adaptive")  # with the constants, what s3 is judged against
PAPER_SLO_S, PAPER_MODEL = 0.1875, "gpt-j-6b"  # time per output token, A100, GPT-J (S3_PAPER.md)
TTFT_SLO_S = 2.0  # an interactive time to first token on that A100, scaled like the TPOT SLO


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  from s3jax.bench.experiment import BENCH_MODEL, SYSTEM_HELP, add_engine_option_flag
  from s3jax.bench.trace import DEFAULT_GENERATOR

  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--generator", default=DEFAULT_GENERATOR, help="alpaca_eval file stem whose answer lengths replay")
  p.add_argument(
    "--max-under-rate",
    type=float,
    default=None,
    help="overflow rate the s3 reservations are calibrated to (default: the predictor's)",
  )
  p.add_argument(
    "--data-dir",
    default=None,
    help="directory of full answers (<generator>.jsonl) to count tokens from; default: the shipped "
    "lengths (data/alpaca_eval/lengths.jsonl)",
  )
  p.add_argument("--num-requests", type=int, default=32)
  p.add_argument("--seed", type=int, default=0, help="trace sampling and arrival seed")
  p.add_argument(
    "--split",
    choices=("all", "test"),
    default="all",
    help="'test': only instructions the shipped predictor never trained on (136 of 678)",
  )
  p.add_argument("--model", default=BENCH_MODEL, help="the model shape (random weights) or checkpoint replayed")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and KV-cache dtype")
  p.add_argument("--mesh", default=None, help="split the model over devices, e.g. model=2 or stage=2,model=2")
  p.add_argument(
    "--budget-slots",
    type=int,
    nargs="+",
    default=[4],
    help="memory budgets, each as this many sequences of the model's maximum length",
  )
  p.add_argument(
    "--max-output", type=int, default=None, help="cap on replayed answer lengths (shorter runs; policies are not told)"
  )

  p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated systems, each {SYSTEM_HELP}")
  p.add_argument(
    "--constant-quantiles",
    default="0.5,0.8,0.9,0.95",
    help="quantiles of the training split's answer lengths to reserve under 'constant' ('' for none)",
  )
  p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)} ('' for none)")
  p.add_argument("--online-rates", type=float, nargs="*", default=[], help="Poisson arrival rates, requests/s")
  p.add_argument("--bursty-rate", type=float, default=None, help="also one run at this rate with gamma arrivals")
  p.add_argument("--burstiness", type=float, default=0.5, help="the gamma shape of --bursty-rate (1 = Poisson)")
  p.add_argument("--online-policies", default="on-demand,adaptive,s3", help="systems run online")
  p.add_argument(
    "--slo-tpot",
    type=float,
    default=None,
    help="time-per-output-token SLO for goodput, s (default: the paper's, scaled to this device)",
  )
  p.add_argument(
    "--slo-ttft", type=float, default=None, help="time-to-first-token SLO for goodput, s (default: 2 s, scaled)"
  )
  add_engine_option_flag(p)
  p.add_argument(
    "--repeats", type=int, default=1, help="timed runs of each system; the median run is reported, every one is kept"
  )
  p.add_argument("--decode-steps", type=int, default=16, help="steps per repeat of the decode ceiling")
  p.add_argument("--out", default=str(REPO_ROOT / "results" / "benchmark"), help="output directory")
  p.add_argument("--tag", default=None, help="file name stem of the outputs (default: derived from the settings)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())
  args.policies, args.peers, args.online_policies = split(args.policies), split(args.peers), split(args.online_policies)
  args.quantiles = tuple(float(q) for q in split(args.constant_quantiles))
  from s3jax.bench.experiment import engine_options, system_options
  from s3jax.engine import EngineConfig

  args.engine_options = engine_options(args)
  if set(args.peers) - set(PEERS):
    p.error(f"peers come from {PEERS}")
  for name in set(args.policies + args.online_policies):
    try:
      EngineConfig.create(memory_budget=1 << 20, **system_options(name), **args.engine_options)
    except ValueError as e:
      p.error(f"system {name!r}: {e}")
  return args


def systems(args, constants: dict[float, int]) -> list[str]:
  """Names of the systems to run (``s3jax.bench.experiment.system_options`` reads them)."""
  return list(args.policies) + [f"constant@{tokens}" for tokens in sorted(set(constants.values()))]


def decode_ceiling(runner, run, steps: int) -> dict:
  """The engine's decode executable alone, at the run's mean live batch and cache length."""
  from s3jax.executor.decode_ceiling import decode_tokens_per_s
  from s3jax.executor.step_state import StepShapes

  m = run.metrics
  live = max(1, round(m.mean_batch_size))
  repeats = 3
  context = max(1, round(m.mean_context) - steps * (repeats + 1) // 2)  # centred on the mean
  shapes = StepShapes.create(
    max_seq_len=runner.cfg.max_seq_len,
    num_pages=run.shapes.num_pages,
    page_size=run.shapes.page_size,
    batch_sizes=run.shapes.batch_sizes,
    max_admissions=max(live, run.shapes.max_admissions),
  )
  batch = shapes.batch_size_for(live)
  rate = decode_tokens_per_s(runner, batch, context, steps=steps, repeats=repeats, live=live, shapes=shapes)
  return {"live_rows": live, "batch": batch, "mean_context": m.mean_context, "tokens_per_s": rate}


def scaled_slo(runner) -> dict:
  """The paper's SLOs times this device's decode step over the simulated A100's (batch 4, 256 tokens)."""
  from s3jax.executor.decode_ceiling import decode_tokens_per_s
  from s3jax.models.config import load_model_config
  from s3jax.sim import A100_80GB, CostModel

  here = 4 / decode_tokens_per_s(runner, 4, 256, steps=8)
  a100 = CostModel(model=load_model_config(PAPER_MODEL), device=A100_80GB, dtype_bytes=2).decode_s(4, 4 * 256)
  return {
    "slo_s": PAPER_SLO_S * here / a100,
    "ttft_slo_s": TTFT_SLO_S * here / a100,
    "step_here_s": here,
    "step_a100_gptj_s": a100,
    "rule": f"{PAPER_SLO_S} s per output token and {TTFT_SLO_S} s to the first token x (this device's decode step / "
    f"simulated A100 step of {PAPER_MODEL}), batch 4, 256 tokens each",
  }


def median_run(args, runner, config, trace, prompt_ids, predictor, arrivals=None):
  from s3jax.bench import replay
  from s3jax.bench.experiment import median_run as median

  runs = [
    replay(runner, config, trace, prompt_ids, predictor=predictor, arrivals_s=arrivals, progress=not args.no_progress)
    for _ in range(args.repeats)
  ]
  return median(runs), [r.wall_s for r in runs]


def interpolate(curve: list[dict], overflow: float) -> float | None:
  """The constant reservation's tokens/s at ``overflow`` (linear between sweep points)."""
  pts = sorted((c["overflow_rate"], c["tokens_per_s"]) for c in curve)
  for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
    if x0 <= overflow <= x1:
      return y0 if x1 == x0 else y0 + (y1 - y0) * (overflow - x0) / (x1 - x0)
  return None


def run_budget(args, runner, trace, prompt_ids, predictor, constants, slots: int, slo: dict | None) -> dict:
  from s3jax.bench import compare_tokens
  from s3jax.bench.experiment import system_options
  from s3jax.bench.trace import poisson_arrivals
  from s3jax.engine import EngineConfig

  max_len = runner.cfg.max_seq_len
  budget = slots * max_len * runner.kv_bytes_per_token()
  print(f"\n== budget {slots} x {max_len} tokens = {budget / 2**20:.0f} MiB ==", flush=True)
  runs, walls = {}, {}
  for name in systems(args, constants):
    config = EngineConfig.create(memory_budget=budget, **system_options(name), **args.engine_options)
    run, walls[name] = median_run(args, runner, config, trace, prompt_ids, predictor if name.startswith("s3") else None)
    runs[name] = run
    s = run.summary()
    print(
      f"[{name}] {s['output_tokens']} tokens in {s['wall_s']:.1f}s = {s['tokens_per_s']:.2f} tok/s, {s['steps']} "
      f"steps, mean batch {s['mean_batch']:.2f}, overflow rate {s['overflow_rate']:.2f}, "
      f"{s['xla_compilations_in_timed_run']} compiles in the timed run",
      flush=True,
    )
  result = {
    "budget_slots": slots,
    "budget_bytes": budget,
    "policies": {p: r.summary() for p, r in runs.items()},
    "all_wall_s": walls,
    "timeline": {p: [dataclasses.asdict(x) for x in r.timeline] for p, r in runs.items()},
  }
  result["tokens_identical"] = compare_tokens(runs)
  if constants:
    by_tokens = {n: q for q, n in constants.items()}
    result["constant_curve"] = [
      {
        "quantile": by_tokens[tokens],
        "tokens": tokens,
        "overflow_rate": s["overflow_rate"],
        "tokens_per_s": s["tokens_per_s"],
        "mean_batch": s["mean_batch"],
      }
      for name, s in result["policies"].items()
      if (tokens := system_options(name).get("constant_output_len")) is not None
    ]
  if "s3" in runs:
    result["decode_ceiling"] = decode_ceiling(runner, runs["s3"], args.decode_steps)
  peers = {}
  if args.peers:
    from s3jax.bench.peers import transformers_continuous_batching, transformers_model, transformers_static_batching

    model = transformers_model(runner.cfg)
    budget_tokens = budget // runner.kv_bytes_per_token()
    for name, fn in (
      ("transformers-cb", transformers_continuous_batching),
      ("hf-static", transformers_static_batching),
    ):
      if name in args.peers:
        repeats = sorted(
          (
            fn(model, prompt_ids, trace.output_lens, budget_tokens=budget_tokens, warmup=i == 0)
            for i in range(args.repeats)
          ),
          key=lambda r: r.wall_s,
        )
        peer = repeats[len(repeats) // 2]
        walls[name] = [r.wall_s for r in repeats]
        peers[name] = {"tokens_per_s": peer.tokens_per_s, "wall_s": peer.wall_s, **peer.settings}
        print(f"[{name}] {peer.output_tokens} tokens in {peer.wall_s:.1f}s = {peer.tokens_per_s:.2f} tok/s", flush=True)
  result["peers"] = peers
  if args.online_rates:
    result["online"] = {}
    scenarios = [(str(rate), rate, 1.0) for rate in args.online_rates]
    if args.bursty_rate:
      scenarios.append((f"{args.bursty_rate} bursty {args.burstiness}", args.bursty_rate, args.burstiness))
    slos = {"ttft": slo["ttft_slo_s"], "tpot": slo["slo_s"]}
    for label, rate, burstiness in scenarios:
      arrivals = poisson_arrivals(len(trace), rate, args.seed, burstiness)  # the same gaps at every rate, scaled
      result["online"][label] = {}
      for name in args.online_policies:
        config = EngineConfig.create(memory_budget=budget, **system_options(name), **args.engine_options)
        run, _ = median_run(
          args, runner, config, trace, prompt_ids, predictor if name.startswith("s3") else None, arrivals
        )
        s = result["online"][label][name] = run.summary()
        s["goodput_req_per_s"] = run.goodput(slos)
        print(
          f"[online {label}/s {name}] {s['tokens_per_s']:.1f} tok/s, goodput {s['goodput_req_per_s']:.3f} req/s, "
          f"e2e mean {s['e2e_mean_s']:.1f} s, p99 {s['e2e_p99_s']:.1f} s, TPOT p90 {s['tpot_p90_s']:.3f} s",
          flush=True,
        )
    result["slo"] = slo
  result["ratios"] = ratios(result)
  return result


def ratios(result: dict) -> dict:
  """s3 against the best predictor-free system, the oracle and max; recomputed tokens against on-demand's."""
  runs = result["policies"]
  pol = {p: s["tokens_per_s"] for p, s in runs.items()}
  out = {
    f"{a}/{b}": pol[a] / pol[b]
    for a, b in (("s3", "max"), ("s3", "oracle"), ("s3", "oracle+fcfs"), ("oracle", "max"))
    if a in pol and b in pol
  }
  free = {p: v for p, v in pol.items() if p in PREDICTOR_FREE or p.startswith("constant@")}
  if "s3" in pol and free:
    best = max(free, key=free.get)
    out[f"s3/best predictor-free ({best})"] = pol["s3"] / free[best]
  if "s3" in runs and "on-demand" in runs:
    out["s3/on-demand recomputed tokens"] = runs["s3"]["recomputed_tokens"] / max(
      runs["on-demand"]["recomputed_tokens"], 1
    )
  for peer, s in result.get("peers", {}).items():
    if "s3" in pol:
      out[f"s3/{peer}"] = pol["s3"] / s["tokens_per_s"]
  curve = result.get("constant_curve")
  if curve and "s3-reserve" in pol:
    same = interpolate(curve, runs["s3-reserve"]["overflow_rate"])
    if same is not None:
      out["s3-reserve/constant at its overflow rate"] = pol["s3-reserve"] / same
  if "s3" in pol and "decode_ceiling" in result:
    out["engine efficiency (s3 / decode ceiling)"] = pol["s3"] / result["decode_ceiling"]["tokens_per_s"]
  for label, online in result.get("online", {}).items():
    if "s3" in online and "on-demand" in online:
      s, v = online["s3"], online["on-demand"]
      out[f"online {label}: s3/on-demand goodput"] = s["goodput_req_per_s"] / max(v["goodput_req_per_s"], 1e-9)
      out[f"online {label}: on-demand/s3 mean e2e"] = v["e2e_mean_s"] / s["e2e_mean_s"]
      out[f"online {label}: s3/on-demand p99 e2e"] = s["e2e_p99_s"] / v["e2e_p99_s"]
  return out


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np

  from s3jax.bench.report import plot_budget, render_online, render_table
  from s3jax.bench.trace import held_out_ids, load_trace, read_records
  from s3jax.executor.runner import DEFAULT_COMPILATION_CACHE, ModelRunner, set_compilation_cache
  from s3jax.tokenizer import load_tokenizer

  set_compilation_cache(DEFAULT_COMPILATION_CACHE)
  test_ids = held_out_ids(args.generator, args.data_dir)
  runner = ModelRunner.load(args.model, dtype=args.dtype, seed=0, mesh=args.mesh)
  max_len = runner.cfg.max_seq_len
  trace = load_trace(
    args.generator,
    num_requests=args.num_requests,
    seed=args.seed,
    max_len=max_len,
    max_output=args.max_output,
    ids=test_ids if args.split == "test" else None,
    data_dir=args.data_dir,
  )
  train_ids = sorted({r["id"] for r in read_records(args.generator, args.data_dir)} - set(test_ids.tolist()))
  train = load_trace(args.generator, ids=train_ids, max_len=max_len, data_dir=args.data_dir).output_lens
  constants = {q: int(np.quantile(train, q)) for q in args.quantiles}
  tokenizer = load_tokenizer()
  prompt_ids = [tokenizer.encode(p) for p in trace.prompts]
  print(
    f"trace: {json.dumps(trace.summary())}\nconstant reservations (training quantile: tokens): {constants}", flush=True
  )
  predictor = None
  if any(p.startswith("s3") for p in args.policies + args.online_policies):
    from s3jax.bench.experiment import shipped_predictor

    # The replayed generator's own head (the cold-start head for a generator it has none for).
    predictor = shipped_predictor(args.generator, args.max_under_rate)
    print(
      f"predictor: head {predictor.generator}, overflow target {predictor.max_under_rate}, rule {predictor.rule.value}",
      flush=True,
    )
  slo = None
  if args.online_rates:
    slo = scaled_slo(runner)
    if args.slo_tpot is not None or args.slo_ttft is not None:
      slo = {
        "slo_s": args.slo_tpot or slo["slo_s"],
        "ttft_slo_s": args.slo_ttft or slo["ttft_slo_s"],
        "rule": "--slo-tpot / --slo-ttft",
      }
    print(
      f"SLOs: time per output token <= {slo['slo_s']:.3f} s, time to first token <= {slo['ttft_slo_s']:.2f} s "
      f"({slo['rule']})",
      flush=True,
    )
  device = str(jax.devices()[0].device_kind)
  settings = {
    "command": "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
    "date": time.strftime("%Y-%m-%d"),
    "model": args.model,
    "generator": args.generator,
    "requests": len(trace),
    "seed": args.seed,
    "split": args.split,
    "max_output": args.max_output,
    "device": device,
    "platform": platform.platform(),
    "jax": jax.__version__,
    "constants": {str(q): n for q, n in constants.items()},
  }
  results = {
    "settings": settings,
    "trace": trace.summary(),
    "kv_bytes_per_token": runner.kv_bytes_per_token(),
    "budgets": [
      run_budget(args, runner, trace, prompt_ids, predictor, constants, slots, slo) for slots in args.budget_slots
    ],
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cap = f"_cap{args.max_output}" if args.max_output else ""
  tag = args.tag or f"{args.model}_{args.generator}_n{len(trace)}{cap}"
  (out / f"{tag}.json").write_text(json.dumps(results, indent=1, default=str))
  for result in results["budgets"]:
    title = (
      f"{settings['model']} on {device}, {len(trace)} {args.generator} requests, budget "
      f"{result['budget_slots']} max-length sequences ({result['budget_bytes'] / 2**20:.0f} MiB)"
    )
    plot_budget(result, title, str(out / f"{tag}_b{result['budget_slots']}"))
    print(f"\n### budget {result['budget_slots']} max-length sequences ({result['budget_bytes'] / 2**20:.0f} MiB)\n")
    print(render_table(result))
    if result["peers"]:
      print("\n" + "\n".join(f"- peer {k}: {v['tokens_per_s']:.1f} tok/s" for k, v in result["peers"].items()))
    print("\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in result["ratios"].items()))
    same = result["tokens_identical"]
    print(f"- tokens identical across systems: {same['identical']} of {same['requests']} requests")
    if "online" in result:
      print("\n" + render_online(result["online"], result["slo"]))
  print(f"\nwrote {out / tag}.json and the PNGs", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
