#!/usr/bin/env python
"""Prefix caching: a chat trace whose every request starts with the same long system prompt.

Each request is one held-out AlpacaEval instruction (as in ``bench_real_model.py``) after a system
prompt of about ``--system-tokens`` tokens (an assistant's instructions followed by example
requests, other AlpacaEval instructions), rendered by the served model's chat template. The
served model (default: the embedded SmolLM2-135M-Instruct) answers it (temperature 0.7, top-p 0.9,
seed = instruction id, at most ``--max-tokens`` tokens), all requests at once, under one KV budget
(``--budget-slots`` sequences of the longest prompt plus ``--max-tokens`` without sharing). Every
policy runs with prefix caching off, then on: s3 (the served model's shipped length head, reading
the instruction), on-demand (vLLM v1) and adaptive (SGLang). Reported per run: throughput (output
tokens per second of wall time), its ratio to the same policy without caching, TTFT p50/p90, the
tokens prefilled and read from the cache, the mean decode batch and the preemptions. A request
samples with its own seed, so every run should give the same tokens (counted).

  python scripts/bench_prefix_cache.py
  python scripts/bench_prefix_cache.py --num-requests 8 --max-tokens 32 --systems on-demand --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from bench_decode import write_section
from bench_real_model import DATA, test_trace

from s3jax.assets import REPO_ROOT

SECTION = "## Prefix caching: a chat trace with a shared system prompt (issue 29)"
SYSTEMS = ("s3", "on-demand", "adaptive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default=None, help="the served model (default: the embedded SmolLM2-135M-Instruct)")
  p.add_argument("--data", type=pathlib.Path, default=DATA, help="the model's length data (generate_length_data.py)")
  p.add_argument("--num-requests", type=int, default=21, help="held-out instructions (21 are held out by s3's head)")
  p.add_argument("--system-tokens", type=int, default=1000, help="the shared system prompt's length, about")
  p.add_argument("--max-tokens", type=int, default=128)
  p.add_argument("--budget-slots", type=int, default=6, help="KV budget: sequences it holds without sharing")
  p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {','.join(SYSTEMS)}")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "results" / "prefix_cache.json")
  p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  args.systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
  if unknown := set(args.systems) - set(SYSTEMS):
    p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
  return args


def system_prompt(llm, records: list[dict], exclude: set[int], tokens: int) -> str:
  """An assistant's instructions and then example requests (instructions not in the trace) until
  the chat prompt of an empty question reaches ``tokens`` tokens."""
  lines = [
    "You are a helpful, careful assistant. Answer the user's request directly and accurately, in plain "
    "language, and stop when the request is answered. Requests like these come to you:"
  ]
  for i, record in enumerate(records):
    if i in exclude:
      continue
    lines.append(f"{len(lines)}. {record['instruction'].strip()}")
    if len(llm.chat_prompt_ids([{"role": "system", "content": "\n".join(lines)}])) >= tokens:
      break
  return "\n".join(lines)


def render(result: dict) -> str:
  s = result["settings"]
  runs = result["runs"]
  rows = []
  for name, r in runs.items():
    policy, caching = name.split("/")
    base = runs[f"{policy}/off"]["tokens_per_s"]
    rows.append(
      f"| {policy} | {caching} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {r['ttft_p50_s']:.1f} | "
      f"{r['ttft_p90_s']:.1f} | {r['prefill_tokens']} | {r['prefix_cached_tokens']} | {r['mean_batch']:.1f} | "
      f"{r['preemptions']} | {r['wall_s']:.0f} |"
    )
  same = result["tokens_identical"]
  return (
    f"{SECTION}\n\n"
    f"`{s['command']}` on {s['device']} ({s['date']}): {s['requests']} held-out AlpacaEval instructions, each after "
    f"the same {s['system_tokens']}-token system prompt (prompts of {s['prompt_tokens_min']}-{s['prompt_tokens_max']} "
    f"tokens through the chat template), answered by {s['model']} ({s['decoding']}), all at once, under a KV budget "
    f"of {s['budget_bytes'] / 2**20:.0f} MiB ({s['budget_slots']} sequences of {s['max_model_len']} tokens without "
    f"sharing), pages of {s['page_size']}. Ratio: to the same policy with prefix caching off. Tokens identical to "
    f"{same['reference']}'s in {same['identical']} of {same['requests']} requests.\n\n"
    "| policy | prefix caching | tokens/s | ratio | TTFT p50 (s) | TTFT p90 (s) | tokens prefilled | tokens read "
    "from the cache | mean batch | preemptions | wall (s) |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
  )


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np

  from s3jax import LLM
  from s3jax.bench import ModelAnswers, compare_tokens, replay
  from s3jax.bench.experiment import shipped_predictor
  from s3jax.engine import EngineConfig
  from s3jax.executor.runner import ModelRunner

  lines = args.data.read_text().splitlines()
  records = sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["id"])
  llm = LLM(args.model, predictor=None, policy="on-demand", memory_budget="16MiB")  # its tokenizer and chat template
  served = llm.model_name
  trace, order = test_trace(records, [0] * len(records), args.num_requests, args.seed, 0, args.data, "held-out")
  system = system_prompt(llm, records, set(order.tolist()), args.system_tokens)
  system_tokens = len(llm.chat_prompt_ids([{"role": "system", "content": system}]))
  prompt_ids = [
    llm.chat_prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": records[i]["instruction"]}])
    for i in order
  ]
  page = 16
  max_len = -(-(max(map(len, prompt_ids)) + args.max_tokens) // page) * page
  runner = ModelRunner.load(args.model, max_model_len=max_len)
  trace = dataclasses.replace(trace, prompt_lens=np.asarray([len(p) for p in prompt_ids]), max_len=max_len)
  del llm
  answers = ModelAnswers(max_tokens=args.max_tokens, temperature=0.7, top_p=0.9, seeds=[int(i) for i in trace.ids])
  budget = args.budget_slots * max_len * runner.kv_bytes_per_token()
  print(f"{served}: {len(trace)} requests, system prompt {system_tokens} tokens, budget {budget / 2**20:.0f} MiB")
  runs, summaries = {}, {}
  for policy in args.systems:
    predictor = shipped_predictor(served) if policy == "s3" else None
    for caching in (False, True):
      name = f"{policy}/{'on' if caching else 'off'}"
      config = EngineConfig.create(
        policy=policy, memory_budget=budget, page_size=page, min_cache_len=page, prefix_caching=caching
      )
      runs[name] = run = replay(
        runner, config, trace, prompt_ids, predictor=predictor, answers=answers, progress=not args.no_progress
      )
      summaries[name] = s = run.summary() | {"prefix_cached_tokens": run.metrics.prefix_cached_tokens}
      print(
        f"[{name}] {s['output_tokens']} tokens in {s['wall_s']:.1f}s = {s['tokens_per_s']:.2f} tok/s, TTFT p50 "
        f"{s['ttft_p50_s']:.1f}s, {s['prefill_tokens']} prefilled, {s['prefix_cached_tokens']} from the cache",
        flush=True,
      )
  result = {
    "settings": {
      "command": "python scripts/bench_prefix_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
      "date": time.strftime("%Y-%m-%d"),
      "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s))",
      "model": served,
      "decoding": f"T=0.7, top_p=0.9, seed=id, max_tokens={args.max_tokens}",
      "requests": len(trace),
      "system_tokens": system_tokens,
      "prompt_tokens_min": int(min(map(len, prompt_ids))),
      "prompt_tokens_max": int(max(map(len, prompt_ids))),
      "budget_bytes": budget,
      "budget_slots": args.budget_slots,
      "max_model_len": max_len,
      "page_size": page,
    },
    "runs": summaries,
    "tokens_identical": compare_tokens(runs),
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1, default=str))
  text = render(result)
  print(text)
  if not args.no_write:
    write_section(text, REPO_ROOT / "BENCHMARKS.md", SECTION)
    print(f"wrote {SECTION} of BENCHMARKS.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
