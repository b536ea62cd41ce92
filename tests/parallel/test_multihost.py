"""Two processes joined by ``jax.distributed`` over loopback, each with 2 forced CPU devices, run
one model split stage=2 x model=2 across both (scripts/multihost.py) and give one device's tokens.

The three runs (one device, then the two processes) are other processes: they happen in the
background lane (tests/background.py) from the start of the session."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from background import Job

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "multihost.py"
ARGS = [
  "--model",
  "tiny",
  "--policy",
  "max",
  "--num-requests",
  "6",
  "--max-output",
  "12",
  "--engine-option",
  "max_slots=8",
  "--engine-option",
  "min_prefill_len=128",
]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _runs() -> tuple[Path, list[subprocess.CompletedProcess]]:
  tmp = Path(tempfile.mkdtemp(prefix="s3jax-test-multihost-"))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, then 2 per process
  one = subprocess.run(
    [sys.executable, str(SCRIPT), *ARGS, "--mesh", "", "--out", str(tmp / "one.json")],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  spawn = ["--spawn", "2", "--local-devices", "2", "--coordinator", f"127.0.0.1:{_free_port()}"]
  two = subprocess.run(
    [sys.executable, str(SCRIPT), *ARGS, *spawn, "--mesh", "stage=2,model=2", "--out", str(tmp / "two.json")],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  return tmp, [one, two]


RUNS = Job(_runs, cleanup=lambda runs: shutil.rmtree(runs[0], ignore_errors=True))


@pytest.mark.slow
def test_two_processes_give_the_tokens_of_one_device():
  tmp, done = RUNS.result()
  for run in done:
    assert run.returncode == 0, run.stderr[-3000:]
  one = json.loads((tmp / "one.json").read_text())
  assert (one["processes"], one["devices"]) == (1, 1)
  for name in ("two.json", "two.process1.json"):
    run = json.loads((tmp / name).read_text())
    assert (run["processes"], run["devices"], run["local_devices"], run["mesh"]) == (2, 4, 2, "stage=2,model=2")
    assert run["output_ids"] == one["output_ids"]
    assert run["timed_compilations"] == 0
