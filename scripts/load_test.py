#!/usr/bin/env python
"""Load test of a running s3jax server with a real trace (like vLLM's benchmark_serving).

Replays prompts from ``alpaca_eval/<generator>.jsonl``: each instruction is a
prompt, and its answer ends after that generator's answer length in GPT-2 tokens
(capped by ``--max-output-tokens`` and the model's context) through the
``replay_output_len`` extension (the server needs ``--trace-replay``), with
``ignore_eos`` so that random-weight models produce exactly the trace's lengths.
``max_tokens`` is left unset, so no policy but oracle learns the length: max
reserves the model maximum and s3 its prediction, as with real clients.
Requests arrive as a Poisson process at ``--request-rate`` (``inf``: all at
once) with at most ``--max-concurrency`` in flight, and stream over SSE so
that time to first token is measured at the client. ``--n`` asks for that many
choices per request (choice j samples with ``seed + j`` at ``--temperature``),
each as long as the trace says: with prefix caching the choices share their
prompt's pages.

    python scripts/serve.py --policy s3 --trace-replay --port 8000 &
    python scripts/load_test.py --url http://127.0.0.1:8000 --generator alpaca-7b \\
        --num-requests 64 --request-rate 4 --max-concurrency 32 --benchmarks-md BENCHMARKS.md

Reports TTFT, TPOT (mean time per output token after the first), end-to-end
latency (mean, p50, p90, p99), request and token throughput and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from s3jax.bench.trace import poisson_arrivals
from s3jax.extras import missing_extra

try:
  import httpx
except ModuleNotFoundError as e:
  raise missing_extra(e, "bench", "load_test.py") from e

SECTION = "## Serving (load test)"
TABLE_HEADER = (
  "| date | model | policy | budget | trace | requests | rate (req/s) | concurrency | TTFT p50 / p99 (s) "
  "| TPOT p50 / p99 (ms) | E2E p50 / p99 (s) | throughput (req/s) | output tok/s | errors |\n"
  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceRequest:
  prompt: str
  prompt_tokens: int
  output_tokens: int


@dataclasses.dataclass(kw_only=True)
class Result:
  ok: bool = False
  error: str = ""
  ttft_s: float = 0.0
  e2e_s: float = 0.0
  output_tokens: int = 0  # over every choice
  prompt_tokens: int = 0
  choices: int = 1

  @property
  def tpot_s(self) -> float | None:
    """Time per output token of one choice (the choices decode side by side)."""
    per_choice = self.output_tokens / self.choices
    if per_choice < 2:
      return None
    return (self.e2e_s - self.ttft_s) / (per_choice - 1)


def load_requests(
  generator: str,
  num_requests: int,
  max_output_tokens: int,
  max_model_len: int,
  seed: int = 0,
  data_dir: Path | None = None,
) -> list[TraceRequest]:
  """``num_requests`` (prompt, true output length) pairs from one generator's answers
  (``s3jax.bench.load_trace``: GPT-2 tokens, capped so that prompt + answer fits the model)."""
  from s3jax.bench import load_trace

  trace = load_trace(
    generator,
    num_requests=num_requests,
    seed=seed,
    max_len=max_model_len,
    max_output=max_output_tokens,
    data_dir=data_dir,
  )
  return [
    TraceRequest(prompt=prompt, prompt_tokens=int(n), output_tokens=int(out))
    for prompt, n, out in zip(trace.prompts, trace.prompt_lens, trace.output_lens)
  ]


async def send(
  client: httpx.AsyncClient, model: str, req: TraceRequest, n: int = 1, temperature: float = 0.0, seed: int = 0
) -> Result:
  body = {
    "model": model,
    "prompt": req.prompt,
    "max_tokens": None,
    "replay_output_len": req.output_tokens,
    "n": n,
    "seed": seed,
    "temperature": temperature,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
  }
  res = Result(prompt_tokens=req.prompt_tokens, choices=n)
  start = time.perf_counter()
  try:
    async with client.stream("POST", "/v1/completions", json=body) as r:
      if r.status_code != 200:
        await r.aread()
        res.error = f"HTTP {r.status_code}"
        return res
      async for line in r.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
          res.error = chunk["error"].get("type", "stream error")
          return res
        if chunk["choices"] and chunk["choices"][0]["text"] and not res.ttft_s:
          res.ttft_s = time.perf_counter() - start
        if chunk.get("usage"):
          res.output_tokens = chunk["usage"]["completion_tokens"]
          res.prompt_tokens = chunk["usage"]["prompt_tokens"]
  except httpx.HTTPError as exc:
    res.error = type(exc).__name__
    return res
  res.e2e_s = time.perf_counter() - start
  res.ttft_s = res.ttft_s or res.e2e_s
  res.ok = True
  return res


async def run(
  url: str,
  model: str,
  trace: list[TraceRequest],
  rate: float,
  concurrency: int,
  seed: int,
  n: int = 1,
  temperature: float = 0.0,
) -> tuple[list[Result], float]:
  limit = asyncio.Semaphore(concurrency)
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  bar = tqdm(total=len(trace), desc="requests", unit="req")
  async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
    start = time.perf_counter()

    async def one(at: float, req: TraceRequest) -> Result:
      await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
      async with limit:
        result = await send(client, model, req, n, temperature, seed)
      bar.update(1)
      return result

    results = await asyncio.gather(*[one(at, req) for at, req in zip(poisson_arrivals(len(trace), rate, seed), trace)])
    duration = time.perf_counter() - start
  bar.close()
  return list(results), duration


def summarize(results: list[Result], duration_s: float) -> dict:
  ok = [r for r in results if r.ok]

  def stats(values: list[float]) -> dict[str, float]:
    if not values:
      return {k: float("nan") for k in ("mean", "p50", "p90", "p99")}
    a = np.asarray(values)
    return {
      "mean": float(a.mean()),
      "p50": float(np.percentile(a, 50)),
      "p90": float(np.percentile(a, 90)),
      "p99": float(np.percentile(a, 99)),
    }

  out_tokens = sum(r.output_tokens for r in ok)
  return {
    "completed": len(ok),
    "failed": len(results) - len(ok),
    "errors": dict(Counter(r.error for r in results if not r.ok)),
    "duration_s": duration_s,
    "request_throughput": len(ok) / duration_s,
    "output_token_throughput": out_tokens / duration_s,
    "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration_s,
    "output_tokens": out_tokens,
    "ttft_s": stats([r.ttft_s for r in ok]),
    "tpot_s": stats([r.tpot_s for r in ok if r.tpot_s is not None]),
    "e2e_s": stats([r.e2e_s for r in ok]),
  }


def format_table(s: dict) -> str:
  lines = [
    f"{'completed / failed':<28}{s['completed']} / {s['failed']}  {s['errors'] or ''}",
    f"{'duration (s)':<28}{s['duration_s']:.2f}",
    f"{'request throughput (req/s)':<28}{s['request_throughput']:.3f}",
    f"{'output tokens/s':<28}{s['output_token_throughput']:.1f}",
    f"{'total tokens/s':<28}{s['total_token_throughput']:.1f}",
    f"{'':<28}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
  ]
  for key, label, scale in (("ttft_s", "TTFT (ms)", 1e3), ("tpot_s", "TPOT (ms)", 1e3), ("e2e_s", "E2E (s)", 1)):
    row = "".join(f"{s[key][q] * scale:>10.1f}" for q in ("mean", "p50", "p90", "p99"))
    lines.append(f"{label:<28}{row}")
  return "\n".join(lines)


def server_info(url: str) -> dict[str, str]:
  """Model id and context length from /v1/models, policy and budget from /metrics' info series."""
  models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
  info = {"model": models["id"], "max_model_len": str(models.get("max_model_len", 1024))}
  from prometheus_client.parser import text_string_to_metric_families

  for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
    if family.name == "s3jax_server_info":
      info.update(family.samples[0].labels)
  return info


def markdown_row(s: dict, info: dict[str, str], args: argparse.Namespace) -> str:
  t, p, e = s["ttft_s"], s["tpot_s"], s["e2e_s"]
  errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
  choices = f", n={args.n}" if args.n > 1 else ""
  return (
    f"| {datetime.date.today()} | {info.get('model', '?')} | {info.get('policy', '?')} "
    f"| {info.get('memory_budget', '?')} | {args.generator} (≤{args.max_output_tokens} tok{choices}) "
    f"| {s['completed']}/{s['completed'] + s['failed']} | {args.request_rate:g} | {args.max_concurrency} "
    f"| {t['p50']:.2f} / {t['p99']:.2f} | {p['p50'] * 1e3:.0f} / {p['p99'] * 1e3:.0f} "
    f"| {e['p50']:.1f} / {e['p99']:.1f} | {s['request_throughput']:.2f} "
    f"| {s['output_token_throughput']:.1f} | {errors} |\n"
  )


def append_row(path: Path, row: str) -> None:
  """Adds ``row`` to the table of the ``## Serving (load test)`` section (created if absent)."""
  text = path.read_text() if path.exists() else ""
  start = text.find(SECTION)
  if start < 0:
    text = text.rstrip("\n") + ("\n\n" if text else "") + f"{SECTION}\n\n{TABLE_HEADER}{row}"
  else:
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end + 1
    section = text[start:end]
    last_row = section.rfind("\n|")
    if last_row < 0:
      section = section.rstrip("\n") + f"\n\n{TABLE_HEADER}{row}\n"
    else:
      line_end = section.find("\n", last_row + 1)
      line_end = len(section) if line_end < 0 else line_end + 1
      section = section[:line_end] + row + section[line_end:]
    text = text[:start] + section + text[end:]
  path.write_text(text)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument("--url", default="http://127.0.0.1:8000")
  p.add_argument("--generator", default="alpaca-7b", help="whose AlpacaEval answer lengths to replay")
  p.add_argument(
    "--data-dir",
    type=Path,
    default=None,
    help="directory of full answers (<generator>.jsonl); default: the shipped lengths",
  )
  p.add_argument("--num-requests", type=int, default=64)
  p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate in req/s; inf = all at once")
  p.add_argument("--max-concurrency", type=int, default=64)
  p.add_argument("--max-output-tokens", type=int, default=256, help="cap on each request's trace length")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--n", type=int, default=1, help="choices per request (they share the prompt)")
  p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
  p.add_argument(
    "--warmup-requests",
    type=int,
    default=0,
    help="requests sent (and not measured) first, e.g. so the server compiles its shapes",
  )
  p.add_argument("--benchmarks-md", type=Path, default=None, help="append a markdown row to this file")
  p.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
  args = p.parse_args(argv)

  info = server_info(args.url)
  trace = load_requests(
    args.generator,
    args.num_requests + args.warmup_requests,
    args.max_output_tokens,
    int(info["max_model_len"]),
    args.seed,
    args.data_dir,
  )
  warm, trace = trace[: args.warmup_requests], trace[args.warmup_requests :]
  if warm:
    asyncio.run(
      run(args.url, info["model"], warm, float("inf"), args.max_concurrency, args.seed, args.n, args.temperature)
    )
  results, duration = asyncio.run(
    run(args.url, info["model"], trace, args.request_rate, args.max_concurrency, args.seed, args.n, args.temperature)
  )
  summary = summarize(results, duration)
  print(
    f"\n{info.get('model')} policy={info.get('policy', '?')} budget={info.get('memory_budget', '?')} "
    f"trace={args.generator} requests={len(trace)} rate={args.request_rate:g} "
    f"concurrency={args.max_concurrency} n={args.n}"
  )
  print(format_table(summary))
  if args.json is not None:
    args.json.write_text(
      json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "server": info, **summary}, indent=2)
    )
  if args.benchmarks_md is not None:
    append_row(args.benchmarks_md, markdown_row(summary, info, args))
  return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
