#!/usr/bin/env python
"""Engine benchmark: max, s3 and oracle on one real trace, with a peer, in one run.

Replays an alpaca_eval trace (prompts = instructions; answer lengths = the generator's answers in
GPT-2 tokens, clipped so prompt + answer <= the model's maximum) through the engine once per policy
and per budget, all requests submitted at once: the same runner (weights and executables), the
same requests, the same budget. Greedy decoding of random weights, each answer ended by ``eos_at``
(invisible to every policy): every policy must produce the same tokens, and the run checks it.

Each policy's engine is warmed up first (every executable it can reach, untimed), so the timed
run compiles nothing, and the run counts XLA compilations to show it. In the same run:

  * the decode ceiling: the engine's own decode executable alone at s3's mean batch and cache
    length (``s3jax.bench.decode``); engine efficiency = s3 tokens/s / that;
  * transformers' paged continuous batching on the same trace, model shape and KV byte budget
    (``--peers``; needs torch).

Usage:
  python scripts/benchmark.py --num-requests 32 --split test             # wave 1's command
  python scripts/benchmark.py --num-requests 128 --budget-slots 2 4      # two budgets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
POLICIES = ("max", "s3", "oracle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  from s3jax.bench.trace import DEFAULT_GENERATOR
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--generator", default=DEFAULT_GENERATOR, help="alpaca_eval file stem whose answer lengths replay")
  p.add_argument("--data-dir", default=None,
                 help="directory of full answers (<generator>.jsonl) to count tokens from; default: the shipped "
                      "lengths (data/alpaca_eval/lengths.jsonl)")
  p.add_argument("--num-requests", type=int, default=32)
  p.add_argument("--seed", type=int, default=0, help="trace sampling seed")
  p.add_argument("--split", choices=("all", "test"), default="all",
                 help="'test': only instructions the shipped predictor never trained on (136 of 678)")
  p.add_argument("--model", default="gpt2-small-2k")
  p.add_argument("--budget-slots", type=int, nargs="+", default=[4],
                 help="memory budgets, each as this many sequences of the model's maximum length")
  p.add_argument("--max-output", type=int, default=None,
                 help="cap on replayed answer lengths (shorter runs; policies are not told)")
  p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of max,s3,oracle")
  p.add_argument("--peers", choices=("transformers", "none"), default="transformers")
  p.add_argument("--engine-option", action="append", default=[], metavar="NAME=VALUE",
                 help="an EngineConfig or SchedulerConfig field for every policy, e.g. scan_chunk_pages=4 or "
                      "batch_sizes=4,8,12,16 (repeatable)")
  p.add_argument("--repeats", type=int, default=1,
                 help="timed runs of each policy and peer; the median run is reported, every one is kept")
  p.add_argument("--decode-steps", type=int, default=16, help="steps per repeat of the decode ceiling")
  p.add_argument("--out", default=str(REPO_ROOT / "results" / "benchmark"), help="output directory")
  p.add_argument("--tag", default=None, help="file name stem of the outputs (default: derived from the settings)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  args.policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
  args.engine_options = {}
  for item in args.engine_option:
    name, _, value = item.partition("=")
    numbers = tuple(int(v) for v in value.split(","))
    args.engine_options[name.strip()] = numbers if "," in value else numbers[0]
  if set(args.policies) - set(POLICIES) or not args.policies:
    p.error(f"--policies must be a subset of {POLICIES}, got {args.policies}")
  return args


def decode_ceiling(runner, run, steps: int) -> dict:
  """The engine's decode executable alone, at the run's mean live batch and cache length."""
  from s3jax.bench.decode import decode_tokens_per_s
  from s3jax.models.step_state import StepShapes
  m = run.metrics
  live = max(1, round(m.mean_batch_size))
  repeats = 3
  context = max(1, round(m.mean_context) - steps * (repeats + 1) // 2)  # centred on the mean
  shapes = StepShapes.create(max_seq_len=runner.cfg.max_seq_len, num_pages=run.shapes.num_pages,
                             page_size=run.shapes.page_size, batch_sizes=run.shapes.batch_sizes,
                             max_admissions=max(live, run.shapes.max_admissions))
  batch = shapes.batch_size_for(live)
  rate = decode_tokens_per_s(runner, batch, context, steps=steps, repeats=repeats, live=live, shapes=shapes)
  return {"live_rows": live, "batch": batch, "mean_context": m.mean_context, "tokens_per_s": rate}


def run_budget(args, runner, trace, prompt_ids, predictor, slots: int) -> dict:
  from s3jax.bench import compare_tokens, replay
  from s3jax.engine import EngineConfig
  max_len = runner.cfg.max_seq_len
  budget = slots * max_len * runner.kv_bytes_per_token()
  print(f"\n== budget {slots} x {max_len} tokens = {budget / 2**20:.0f} MiB ==", flush=True)
  runs, walls = {}, {}
  for policy in args.policies:
    config = EngineConfig.create(policy=policy, memory_budget=budget, **args.engine_options)
    repeats = [replay(runner, config, trace, prompt_ids, predictor=predictor if policy == "s3" else None,
                      progress=not args.no_progress) for _ in range(args.repeats)]
    walls[policy] = [r.wall_s for r in repeats]
    run = runs[policy] = sorted(repeats, key=lambda r: r.wall_s)[len(repeats) // 2]
    s = run.summary()
    print(f"[{policy}] {s['output_tokens']} tokens in {s['wall_s']:.1f}s = {s['tokens_per_s']:.2f} tok/s (median of "
          f"{', '.join(f'{w:.1f}' for w in walls[policy])} s), {s['steps']} steps, "
          f"{s['decode_calls_per_step']:.2f} decode calls/step, mean batch {s['mean_batch']:.2f}, "
          f"{s['xla_compilations_in_timed_run']} compiles in the timed run", flush=True)
  result = {"budget_slots": slots, "budget_bytes": budget, "policies": {p: r.summary() for p, r in runs.items()},
            "all_wall_s": walls,
            "timeline": {p: [dataclasses.asdict(x) for x in r.timeline] for p, r in runs.items()}}
  if len(runs) > 1:
    result["tokens_identical"] = compare_tokens(runs)
  if "s3" in runs:
    result["decode_ceiling"] = decode_ceiling(runner, runs["s3"], args.decode_steps)
    print(f"decode ceiling at s3's mean batch and cache length: {result['decode_ceiling']}", flush=True)
  if args.peers == "transformers":
    from s3jax.bench.peers import transformers_continuous_batching, transformers_model
    model = transformers_model(runner.cfg)
    peers = sorted((transformers_continuous_batching(model, prompt_ids, trace.output_lens,
                                                     budget_tokens=budget // runner.kv_bytes_per_token(),
                                                     warmup=i == 0)
                    for i in range(args.repeats)), key=lambda r: r.wall_s)
    peer = peers[len(peers) // 2]
    walls["transformers_cb"] = [r.wall_s for r in peers]
    result["peers"] = {"transformers_cb": {"tokens_per_s": peer.tokens_per_s, "wall_s": peer.wall_s,
                                           "output_tokens": peer.output_tokens, **peer.settings}}
    print(f"[transformers CB] {peer.output_tokens} tokens in {peer.wall_s:.1f}s = {peer.tokens_per_s:.2f} tok/s "
          f"(median of {', '.join(f'{w:.1f}' for w in walls['transformers_cb'])} s)", flush=True)
  result["ratios"] = ratios(result)
  return result


def ratios(result: dict) -> dict:
  pol = {p: s["tokens_per_s"] for p, s in result["policies"].items()}
  out = {f"{a}/{b}": pol[a] / pol[b] for a, b in (("s3", "max"), ("s3", "oracle"), ("oracle", "max"))
         if a in pol and b in pol}
  if "s3" in pol and "decode_ceiling" in result:
    out["engine efficiency (s3 / decode ceiling)"] = pol["s3"] / result["decode_ceiling"]["tokens_per_s"]
  if "s3" in pol and "peers" in result:
    out["s3/transformers CB"] = pol["s3"] / result["peers"]["transformers_cb"]["tokens_per_s"]
  return out


def plot(result: dict, settings: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(17, 4.5))
  names = list(result["policies"])
  tps = [result["policies"][p]["tokens_per_s"] for p in names]
  colors = {"max": "#999999", "s3": "#1f77b4", "oracle": "#2ca02c"}
  if "peers" in result:
    names.append("transformers\nCB")
    tps.append(result["peers"]["transformers_cb"]["tokens_per_s"])
  bars = ax0.bar(names, tps, color=[colors.get(n, "#ff7f0e") for n in names])
  ax0.bar_label(bars, fmt="%.1f")
  ax0.set_ylabel("output tokens / s")
  ax0.set_title("throughput (same trace, model shape and KV budget)")
  for p, tl in result["timeline"].items():
    t = [s["t_s"] for s in tl]
    ax1.plot(t, [s["running"] for s in tl], label=p, color=colors.get(p))
    ax2.plot(t, [s["reserved_bytes"] / 2**20 for s in tl], label=f"{p} reserved", color=colors.get(p))
    ax2.plot(t, [s["used_bytes"] / 2**20 for s in tl], ls=":", color=colors.get(p), label=f"{p} used")
  ax1.set_xlabel("seconds")
  ax1.set_ylabel("running sequences (decode batch)")
  ax1.set_title("batch size over time")
  ax1.legend()
  ax2.axhline(result["budget_bytes"] / 2**20, color="k", ls="--", lw=0.8, label="budget")
  ax2.set_xlabel("seconds")
  ax2.set_ylabel("KV MiB")
  ax2.set_title("reserved and used KV cache over time")
  ax2.legend(fontsize=7)
  fig.suptitle(f"{settings['model']} on {settings['device']}, {settings['requests']} {settings['generator']} "
               f"requests, budget {result['budget_slots']} max-length sequences "
               f"({result['budget_bytes'] / 2**20:.0f} MiB)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render_table(result: dict) -> str:
  """The markdown table that goes into BENCHMARKS.md."""
  pol = result["policies"]
  rows = [
      ("output tokens/s", "tokens_per_s", "{:.2f}"), ("wall s", "wall_s", "{:.1f}"), ("steps", "steps", "{}"),
      ("decode calls / step", "decode_calls_per_step", "{:.2f}"), ("mean / max batch", None, None),
      ("mean cache length (attended tokens)", "mean_context", "{:.0f}"),
      ("peak reserved / used MiB", None, None),
      ("mispredictions / grows / preemptions", None, None), ("recomputed tokens", "recomputed_tokens", "{}"),
      ("TTFT p50 / TPOT p50 / e2e p50 s", None, None), ("host waited for the device, s", "host_wait_s", "{:.1f}"),
      ("XLA compiles in the timed run", "xla_compilations_in_timed_run", "{}"),
  ]
  derived = {
      "mean / max batch": lambda s: f"{s['mean_batch']:.2f} / {s['max_batch']}",
      "peak reserved / used MiB":
          lambda s: f"{s['peak_reserved_bytes'] / 2**20:.0f} / {s['peak_used_bytes'] / 2**20:.0f}",
      "mispredictions / grows / preemptions":
          lambda s: f"{s['mispredictions']} / {s['rebuckets']} / {s['preemptions']}",
      "TTFT p50 / TPOT p50 / e2e p50 s":
          lambda s: f"{s['ttft_p50_s']:.1f} / {s['tpot_p50_s']:.3f} / {s['e2e_p50_s']:.1f}",
  }
  names = list(pol)
  lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for label, key, fmt in rows:
    cells = [derived[label](pol[p]) if key is None else fmt.format(pol[p][key]) for p in names]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import jax

  from s3jax.bench.trace import held_out_ids, load_trace
  from s3jax.models.runner import DEFAULT_COMPILATION_CACHE, ModelRunner, set_compilation_cache
  from s3jax.tokenizer import load_tokenizer

  set_compilation_cache(DEFAULT_COMPILATION_CACHE)
  ids = held_out_ids(args.generator, args.data_dir) if args.split == "test" else None
  runner = ModelRunner.load(args.model, seed=0)
  trace = load_trace(args.generator, num_requests=args.num_requests, seed=args.seed, max_len=runner.cfg.max_seq_len,
                     max_output=args.max_output, ids=ids, data_dir=args.data_dir)
  tokenizer = load_tokenizer()
  prompt_ids = [tokenizer.encode(p) for p in trace.prompts]
  print(f"trace: {json.dumps(trace.summary())}", flush=True)
  predictor = None
  if "s3" in args.policies:
    from s3jax.predictor import LengthPredictor
    predictor = LengthPredictor.load_default()
  device = str(jax.devices()[0].device_kind)
  settings = {"command": "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d"), "model": args.model, "generator": args.generator,
              "requests": len(trace), "seed": args.seed, "split": args.split, "max_output": args.max_output,
              "device": device, "platform": platform.platform(), "jax": jax.__version__}
  results = {"settings": settings, "trace": trace.summary(), "kv_bytes_per_token": runner.kv_bytes_per_token(),
             "budgets": [run_budget(args, runner, trace, prompt_ids, predictor, slots) for slots in args.budget_slots]}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cap = f"_cap{args.max_output}" if args.max_output else ""
  tag = args.tag or f"{args.model}_{args.generator}_n{len(trace)}{cap}"
  (out / f"{tag}.json").write_text(json.dumps(results, indent=1, default=str))
  for result in results["budgets"]:
    plot(result, settings, out / f"{tag}_b{result['budget_slots']}.png")
    print(f"\n### budget {result['budget_slots']} max-length sequences ({result['budget_bytes'] / 2**20:.0f} MiB)\n")
    print(render_table(result))
    print("\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in result["ratios"].items()))
    if "tokens_identical" in result:
      same = result["tokens_identical"]
      print(f"- tokens identical across policies: {same['identical']} of {same['requests']} requests")
  print(f"\nwrote {out / tag}.json and the PNGs", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
