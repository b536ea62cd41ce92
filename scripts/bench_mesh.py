#!/usr/bin/env python
"""Multi-device benchmark: the same trace, max and s3, on 1, 2, 4 and 8 devices of one process.

Each device count runs in its own process (on CPU, ``XLA_FLAGS`` forces that many host devices
before JAX starts); each mesh replays the trace once per policy after an untimed warm-up, and
the tokens of every mesh are checked against one device's. On CPU the forced devices share the
machine's cores, so the figures measure what splitting costs (collectives, the pipeline's
bubble, smaller matrices), not a speed-up; on accelerators the same command measures scaling.

Usage:
  python scripts/bench_mesh.py                      # forced CPU devices: 1, 2, 4, 8
  python scripts/bench_mesh.py --meshes "" model=2 stage=2  --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from s3jax.assets import REPO_ROOT

DEFAULT_MESHES = (
  "",
  "model=2",
  "stage=2",
  "stage=2,model=2",
  "model=4",
  "stage=4",
  "stage=2,model=4",
  "stage=4,model=2",
  "model=8",
)


def parse_args(argv=None) -> argparse.Namespace:
  from s3jax.bench.experiment import add_engine_option_flag

  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--meshes", nargs="+", default=list(DEFAULT_MESHES), help='meshes to run ("" = one device)')
  p.add_argument("--model", default="gpt2-mesh-8x8")
  p.add_argument("--num-requests", type=int, default=32)
  p.add_argument("--max-output", type=int, default=128, help="cap on the trace's answer lengths")
  p.add_argument("--budget-slots", type=int, default=4, help="KV budget in max-length sequences")
  p.add_argument("--policies", default="max,s3")
  p.add_argument("--repeats", type=int, default=2, help="timed runs per policy and mesh; the median is reported")
  add_engine_option_flag(p, {"min_prefill_len": 128})
  p.add_argument(
    "--cpu-devices",
    type=int,
    default=None,
    help="CPU host devices to force per process (default: the mesh's device count)",
  )
  p.add_argument("--out", default=str(REPO_ROOT / "results" / "mesh"))
  p.add_argument(
    "--from-json",
    default=None,
    metavar="FILE",
    help="re-render the table and plot of an earlier run's mesh.json instead of running",
  )
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one mesh, in this process
  return p.parse_args(argv)


def worker(args) -> dict:
  """Runs every policy on one mesh in this process; returns the summaries and a hash of the tokens."""
  import jax

  from s3jax.bench.experiment import engine_options, median_run, replay_inputs, shipped_predictor
  from s3jax.bench.replay import replay
  from s3jax.bench.trace import held_out_ids
  from s3jax.engine import EngineConfig
  from s3jax.executor.runner import ModelRunner

  runner = ModelRunner.load(args.model, seed=0, mesh=args.worker or None)
  trace, prompt_ids = replay_inputs(
    runner, num_requests=args.num_requests, max_output=args.max_output, ids=held_out_ids()
  )
  predictor = shipped_predictor(trace.generator)
  budget = args.budget_slots * runner.cfg.max_seq_len * runner.kv_bytes_per_token()
  out = {
    "mesh": args.worker or "one device",
    "devices": runner.mesh_shape.num_devices,
    "visible_devices": len(jax.devices()),
    "device_kind": jax.devices()[0].device_kind,
    "policies": {},
  }
  for policy in args.policies.split(","):
    config = EngineConfig.create(policy=policy, memory_budget=budget, **engine_options(args))
    runs = [
      replay(runner, config, trace, prompt_ids, predictor=predictor if policy == "s3" else None)
      for _ in range(args.repeats)
    ]
    run = median_run(runs)
    speeds = [r.output_tokens / r.wall_s for r in runs]
    tokens = json.dumps([r.output_ids for r in run.requests]).encode()
    memory = runner.device_memory(run.shapes)
    out["policies"][policy] = {
      **{k: run.summary()[k] for k in ("wall_s", "steps", "mean_batch", "xla_compilations_in_timed_run")},
      "tokens_per_s": statistics.median(speeds),
      "all_tokens_per_s": speeds,
      "tokens_sha": hashlib.sha256(tokens).hexdigest()[:16],
      "per_device_mib": {
        "params": memory.params / 2**20,
        "kv": memory.kv / 2**20,
        "workspace": memory.workspace / 2**20,
      },
    }
  return out


def run_mesh(args, mesh: str) -> dict:
  from s3jax.parallel import MeshShape

  devices = args.cpu_devices or MeshShape.parse(mesh).num_devices
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  argv = [a for a in sys.argv[1:]]
  if "--meshes" in argv:  # the worker takes everything but the list of meshes
    i = argv.index("--meshes")
    j = next((k for k in range(i + 1, len(argv)) if argv[k].startswith("--")), len(argv))
    del argv[i:j]
  done = subprocess.run(
    [sys.executable, __file__, *argv, "--worker", mesh], env=env, capture_output=True, text=True, timeout=3600
  )
  if done.returncode:
    raise RuntimeError(f"mesh {mesh!r} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def render(rows: list[dict], policies: list[str]) -> str:
  base = rows[0]["policies"]
  head = "| mesh | devices | " + " | ".join(f"{p} tok/s (vs 1 device)" for p in policies)
  head += " | s3/max | params + KV per device, MiB | tokens as 1 device |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    speed = lambda p, r=r: r["policies"][p]["tokens_per_s"]
    cells = [f"{speed(p):.1f} ({speed(p) / base[p]['tokens_per_s']:.2f})" for p in policies]
    ratio = (
      r["policies"]["s3"]["tokens_per_s"] / r["policies"]["max"]["tokens_per_s"]
      if {"s3", "max"} <= set(policies)
      else float("nan")
    )
    mem = r["policies"][policies[0]]["per_device_mib"]
    same = all(r["policies"][p]["tokens_sha"] == base[p]["tokens_sha"] for p in policies)
    lines.append(
      f"| {r['mesh']} | {r['devices']} | "
      + " | ".join(cells)
      + f" | {ratio:.2f} | {mem['params']:.1f} + {mem['kv']:.1f} | {'yes' if same else 'NO'} |"
    )
  return "\n".join(lines)


def plot(rows: list[dict], policies: list[str], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 4))
  width = 0.8 / len(policies)
  for k, p in enumerate(policies):
    ax.bar([i + k * width for i in range(len(rows))], [r["policies"][p]["tokens_per_s"] for r in rows], width, label=p)
  ax.set_xticks(
    [i + width * (len(policies) - 1) / 2 for i in range(len(rows))],
    [f"{r['mesh']}\n({r['devices']})" for r in rows],
    fontsize=7,
  )
  ax.set_ylabel("tokens/s")
  ax.set_title("one model split over forced CPU devices (shared cores: overhead, not speed-up)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker is not None:
    print(json.dumps(worker(args)))
    return 0
  policies = args.policies.split(",")
  if args.from_json:
    saved = json.loads(pathlib.Path(args.from_json).read_text())
    for row in saved["rows"]:  # the median of every timed run (files written before it was the rule)
      for result in row["policies"].values():
        result["tokens_per_s"] = statistics.median(result["all_tokens_per_s"])
    plot(saved["rows"], policies, pathlib.Path(args.from_json).with_suffix(".png"))
    print(f"{saved['command']}\n\n{render(saved['rows'], policies)}")
    return 0
  from tqdm.auto import tqdm

  rows = []
  for mesh in tqdm(args.meshes, desc="meshes", unit="mesh"):
    t0 = time.perf_counter()
    rows.append(run_mesh(args, mesh))
    tqdm.write(
      f"{rows[-1]['mesh']}: "
      + ", ".join(f"{p} {rows[-1]['policies'][p]['tokens_per_s']:.1f} tok/s" for p in policies)
      + f" ({time.perf_counter() - t0:.0f} s)"
    )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  command = "python scripts/bench_mesh.py " + " ".join(sys.argv[1:] if argv is None else argv)
  (out / "mesh.json").write_text(
    json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1)
  )
  plot(rows, policies, out / "mesh.png")
  print(f"\n{command}\n\n{render(rows, policies)}\n\nmedian of {args.repeats}; wrote {out}/mesh.json and mesh.png")
  print("median tokens/s of each mesh:", statistics.median(r["policies"][policies[0]]["tokens_per_s"] for r in rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
