#!/usr/bin/env python
"""Start-up of ``python scripts/serve.py``: seconds until ``/health`` answers, and host memory.

Starts the server with the given flags (none: the embedded default) against a fresh, empty
compilation cache (cold), then again against the cache the first start filled (warm), several
times each; reports seconds to a 200 from ``/health``, the process's resident memory then (after
warm-up) and its peak while starting, and checks that a completion then works.

Usage:
  python scripts/bench_startup.py                      # the default server, 1 cold + 2 warm starts
  python scripts/bench_startup.py --warm 3 -- --model tiny --policy max --predictor none
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3jax.assets import REPO_ROOT
from s3jax.extras import missing_extra

try:
  import httpx
  import psutil
except ModuleNotFoundError as e:
  raise missing_extra(e, "bench", "bench_startup.py") from e


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_once(flags: list[str], cache: str, timeout_s: float) -> dict:
  port = free_port()
  env = {**os.environ, "S3JAX_COMPILATION_CACHE": cache}
  log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
  t0 = time.perf_counter()
  proc = subprocess.Popen(
    [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), "--port", str(port), *flags],
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
    cwd=REPO_ROOT,
  )
  peak = 0
  try:
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"server exited during start-up:\n{Path(log.name).read_text()[-3000:]}")
      peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
      try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.perf_counter() - t0 > timeout_s:
        raise TimeoutError(f"not healthy after {timeout_s} s")
      time.sleep(0.2)
    ready = time.perf_counter() - t0
    rss = psutil.Process(proc.pid).memory_info().rss
    reply = httpx.post(
      f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=120
    )
    return {
      "health_s": ready,
      "rss_gib": rss / 2**30,
      "peak_rss_gib": max(peak, rss) / 2**30,
      "completion_status": reply.status_code,
    }
  finally:
    proc.terminate()
    try:
      proc.wait(60)
    except subprocess.TimeoutExpired:
      proc.kill()
    os.unlink(log.name)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--cold", type=int, default=1, help="starts with an empty compilation cache")
  p.add_argument("--warm", type=int, default=2, help="starts with the cache the cold starts filled")
  p.add_argument("--timeout", type=float, default=600)
  p.add_argument("flags", nargs="*", help="serve.py flags (after --)")
  args = p.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory(prefix="s3jax-startup-") as root:
    for i in range(args.cold):
      rows.append(("cold", start_once(args.flags, f"{root}/cold{i}", args.timeout)))
      print(rows[-1], flush=True)
    cache = f"{root}/cold0" if args.cold else f"{root}/warm"
    for _ in range(args.warm):
      rows.append(("warm", start_once(args.flags, cache, args.timeout)))
      print(rows[-1], flush=True)
  print(f"\ncommand: python scripts/serve.py {' '.join(args.flags)}")
  print("| start | /health after (s) | RSS after warm-up (GiB) | peak RSS (GiB) | completion |")
  print("|---|---:|---:|---:|---:|")
  for kind, r in rows:
    print(f"| {kind} | {r['health_s']:.1f} | {r['rss_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['completion_status']} |")
  for kind in ("cold", "warm"):
    times = [r["health_s"] for k, r in rows if k == kind]
    if times:
      print(f"{kind}: median {statistics.median(times):.1f} s over {len(times)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
