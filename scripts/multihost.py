#!/usr/bin/env python
"""Runs a trace through s3jax with one model split over the devices of several processes (hosts).

Every process runs this script with the same arguments and its own ``--process-id``;
``jax.distributed.initialize`` joins them through the coordinator (process 0's address), after
which ``jax.devices()`` lists every process's devices and the mesh spans them. Each process runs
the same host code (scheduler, predictor) on the same requests, so all of them drive the same
sequence of executables (JAX's multi-controller model); each reads the tokens from its own
devices. Process 0 writes the result.

On two GPU hosts with 4 GPUs each (8 devices: 2 pipeline stages of 4-way tensor parallelism):

  host0$ python scripts/multihost.py --coordinator host0:1234 --num-processes 2 --process-id 0 --mesh stage=2,model=4
  host1$ python scripts/multihost.py --coordinator host0:1234 --num-processes 2 --process-id 1 --mesh stage=2,model=4

On one machine, over loopback, with forced CPU devices (what the tests run):

  python scripts/multihost.py --spawn 2 --local-devices 2 --mesh stage=2,model=2 --model tiny

Serving HTTP from several hosts needs every request broadcast to every process first; the
server (``scripts/serve.py``) is one process, so its mesh spans one host's devices.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  from s3jax.bench.experiment import add_engine_option_flag

  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--coordinator", default="127.0.0.1:12355", help="host:port of process 0")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument(
    "--spawn",
    type=int,
    default=0,
    metavar="N",
    help="start N processes on this machine (loopback) running this script, and wait for them",
  )
  p.add_argument(
    "--local-devices", type=int, default=0, metavar="N", help="CPU only: force N host devices per process (XLA_FLAGS)"
  )
  p.add_argument("--mesh", default="stage=2,model=2")
  p.add_argument("--model", default="tiny")
  p.add_argument("--policy", default="s3", choices=("max", "s3", "oracle"))
  p.add_argument("--num-requests", type=int, default=16)
  p.add_argument("--max-output", type=int, default=48, help="cap on the trace's answer lengths")
  p.add_argument("--memory-budget", default="2MiB", help="KV-cache budget of the whole model")
  add_engine_option_flag(p)
  p.add_argument("--out", default="results/multihost/run.json")
  return p.parse_args(argv)


def spawn(args: argparse.Namespace) -> int:
  """Starts ``args.spawn`` copies of this script, one per process id, and waits for all."""
  argv = [a for a in sys.argv[1:]]
  i = argv.index("--spawn")
  del argv[i : i + 2]
  procs = [
    subprocess.Popen([sys.executable, __file__, *argv, "--num-processes", str(args.spawn), "--process-id", str(pid)])
    for pid in range(args.spawn)
  ]
  codes = [p.wait(timeout=900) for p in procs]
  return max(codes, key=abs)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.spawn:
    return spawn(args)
  if args.local_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  import jax  # after XLA_FLAGS

  if args.num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )
  from s3jax.bench.experiment import engine_options, replay_inputs, shipped_predictor
  from s3jax.bench.replay import replay
  from s3jax.engine import EngineConfig
  from s3jax.executor.runner import ModelRunner

  runner = ModelRunner.load(args.model, mesh=args.mesh)
  trace, prompt_ids = replay_inputs(runner, num_requests=args.num_requests, max_output=args.max_output)
  # The tiny model's window is short: cut each prompt so that its answer fits after it.
  prompt_ids = [ids[: runner.cfg.max_seq_len - 1 - int(n)] or [0] for ids, n in zip(prompt_ids, trace.output_lens)]
  predictor = shipped_predictor(trace.generator) if args.policy == "s3" else None
  t0 = time.perf_counter()
  config = EngineConfig.create(policy=args.policy, memory_budget=args.memory_budget, **engine_options(args))
  run = replay(runner, config, trace, prompt_ids, predictor=predictor)
  result = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": len(jax.devices()),
    "local_devices": len(jax.local_devices()),
    "mesh": str(runner.mesh_shape),
    "policy": args.policy,
    "model": args.model,
    "tokens_per_s": run.output_tokens / run.wall_s,
    "wall_s": run.wall_s,
    "total_s": time.perf_counter() - t0,
    "timed_compilations": run.xla_compilations,
    "output_ids": [r.output_ids for r in run.requests],
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  path = out if jax.process_index() == 0 else out.with_name(f"{out.stem}.process{jax.process_index()}{out.suffix}")
  path.write_text(json.dumps(result))
  print(
    f"process {result['process']}/{result['processes']}: {result['devices']} devices ({result['local_devices']} "
    f"here), mesh {result['mesh']}, {args.policy}: {result['tokens_per_s']:.1f} tok/s, "
    f"{result['timed_compilations']} compilations in the timed run -> {path}",
    flush=True,
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
