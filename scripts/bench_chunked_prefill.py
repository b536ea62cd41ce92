"""Chunked prefill: the inter-token latency that long prompts cause the streams already decoding.

A few streams decode long answers; long prompts arrive among them, one every ``--gap-steps``
engine steps. The same workload runs

  * with the streams alone (the reference inter-token latency),
  * with the long prompts prefilled at once (each stalls every stream for a whole prefill),
  * and with ``max_prefill_tokens`` at each of ``--chunks`` (a chunk per iteration, the streams'
    decode in every one),

on one runner (every run uses the same executables, compiled once) under policy on-demand with a
budget that holds everything, so no preemption blurs the comparison. Token ids are random (the
timing depends on lengths, not on text); answers are greedy and must be identical in every run.
Reported per run: the streams' inter-token latency p50/p90/p99 (wall time between consecutive
tokens of a stream, as the engine hands them out) and its ratio to the streams-alone p99, the long
prompts' time to first token, and the wall time.

Usage:
  python scripts/bench_chunked_prefill.py                      # SmolLM2-135M-Instruct, 1,600-token prompts
  python scripts/bench_chunked_prefill.py --chunks 64 --no-write
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_decode import write_section
from tqdm.auto import tqdm

from s3jax.engine import Engine, EngineConfig, EngineRequest
from s3jax.executor.runner import ModelRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Chunked prefill: long prompts among running streams (issue 29)"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default=None, help="any model source (default: the embedded default)")
  p.add_argument("--streams", type=int, default=4, help="requests decoding when the long prompts arrive")
  p.add_argument("--stream-prompt", type=int, default=32, help="tokens of each stream's prompt")
  p.add_argument("--stream-tokens", type=int, default=160, help="answer tokens of each stream")
  p.add_argument("--long-prompts", type=int, default=3)
  p.add_argument("--long-len", type=int, default=1600, help="tokens of each long prompt")
  p.add_argument("--long-tokens", type=int, default=8, help="answer tokens of each long prompt")
  p.add_argument("--gap-steps", type=int, default=30, help="engine steps between long-prompt arrivals")
  p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128], help="max_prefill_tokens to run")
  p.add_argument("--memory-budget", default="512MiB")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "chunked_prefill.json")
  p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
  return p.parse_args(argv)


def workload(args, vocab: int):
  rng = np.random.default_rng(args.seed)
  streams = [rng.integers(0, vocab, args.stream_prompt).tolist() for _ in range(args.streams)]
  longs = [rng.integers(0, vocab, args.long_len).tolist() for _ in range(args.long_prompts)]
  return streams, longs


def run(runner: ModelRunner, args, streams, longs, max_prefill_tokens: int | None, bar) -> dict:
  config = EngineConfig.create(
    policy="on-demand",
    memory_budget=args.memory_budget,
    page_size=args.page_size,
    min_cache_len=args.page_size,
    max_prefill_tokens=max_prefill_tokens,
  )
  engine = Engine(runner, config)
  engine.warmup()
  request = lambda i, prompt, n: EngineRequest(
    request_id=i, prompt_ids=prompt, max_tokens=n, temperature=0.0, ignore_eos=True
  )
  requests = [request(i, p, args.stream_tokens) for i, p in enumerate(streams)]
  arrivals = {args.gap_steps * (j + 1): request(len(streams) + j, p, args.long_tokens) for j, p in enumerate(longs)}
  for r in requests:
    engine.submit(r)
  times: dict[int, list[float]] = {r.request_id: [] for r in requests}
  step, start = 0, time.perf_counter()
  while engine.has_work or any(s >= step for s in arrivals):
    if step in arrivals:
      engine.submit(arrivals[step])
      requests.append(arrivals[step])
      times[arrivals[step].request_id] = []
    outputs = engine.step()
    now = time.perf_counter()
    for out in outputs:
      times[out.request_id] += [now] * len(out.token_ids)
    step += 1
    bar.update(1)
  wall = time.perf_counter() - start
  gaps = np.concatenate([np.diff(times[i]) for i in range(len(streams))])
  ttft = [times[r.request_id][0] - r.submitted_at for r in requests[len(streams) :]]
  return {
    "max_prefill_tokens": max_prefill_tokens,
    "long_prompts": len(requests) - len(streams),
    "itl_s": {q: float(np.percentile(gaps, q)) for q in (50, 90, 99)},
    "itl_max_s": float(gaps.max()),
    "long_ttft_s": [float(t) for t in ttft],
    "wall_s": wall,
    "steps": step,
    "prefill_chunks": engine.scheduler.stats.prefill_chunks,
    "tokens": {r.request_id: list(r.output_ids) for r in requests},
  }


def render(results: list[dict], args, device: str) -> str:
  alone = results[0]["itl_s"][99]
  rows = []
  for r in results:
    name = (
      "streams alone"
      if not r["long_prompts"]
      else (
        "long prompts, prefilled at once" if r["max_prefill_tokens"] is None else f"chunks of {r['max_prefill_tokens']}"
      )
    )
    ttft = f"{np.median(r['long_ttft_s']):.1f}" if r["long_ttft_s"] else "-"
    itl = r["itl_s"]
    rows.append(
      f"| {name} | {itl[50] * 1e3:.0f} | {itl[90] * 1e3:.0f} | {itl[99] * 1e3:.0f} | {itl[99] / alone:.2f}x | "
      f"{r['itl_max_s']:.2f} | {ttft} | {r['prefill_chunks']} | {r['wall_s']:.0f} |"
    )
  command = "python scripts/bench_chunked_prefill.py" + (f" --chunks {' '.join(map(str, args.chunks))}")
  return (
    f"{SECTION}\n\n"
    f"`{command}` on {device}: {args.streams} streams ({args.stream_prompt}-token prompts, {args.stream_tokens} "
    f"greedy answer tokens each) decoding while {args.long_prompts} prompts of {args.long_len} tokens "
    f"({args.long_tokens} answer tokens) arrive, one every {args.gap_steps} engine steps; policy on-demand, "
    f"budget {args.memory_budget} (no preemption), pages of {args.page_size}. Inter-token latency (ITL) is "
    "the wall time between consecutive tokens of a stream as the engine hands them out; its ratio is to the "
    "streams-alone p99. Every run's answers are identical token for token (checked by the script).\n\n"
    "| run | ITL p50 (ms) | p90 (ms) | p99 (ms) | p99 / alone | ITL max (s) | long prompts' TTFT, median (s) "
    "| prefill chunks | wall (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  runner = ModelRunner.load(args.model)
  streams, longs = workload(args, runner.cfg.vocab_size)
  configs = [(streams, [], None), (streams, longs, None)] + [(streams, longs, c) for c in args.chunks]
  results = []
  with tqdm(desc=f"engine steps of {len(configs)} runs", unit="step") as bar:  # a run's steps depend on its chunks
    for prompts, long_prompts, chunk in configs:
      results.append(run(runner, args, prompts, long_prompts, chunk, bar))
  reference = results[1]["tokens"]
  for r in results:
    for rid, tokens in r["tokens"].items():
      expected = reference[rid] if rid in reference else None
      if expected is not None and tokens != expected:
        raise SystemExit(f"run {r['max_prefill_tokens']}: request {rid}'s tokens differ from the unchunked run's")
  import jax

  device = f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s)), {runner.cfg.name}"
  text = render(results, args, device)
  print(text)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=1))
  if not args.no_write:
    write_section(text, REPO_ROOT / "BENCHMARKS.md", SECTION)
    print(f"wrote {SECTION} of BENCHMARKS.md")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
