"""Two processes joined by ``jax.distributed`` over loopback, each with 2 forced CPU devices, run
one model split stage=2 x model=2 across both (scripts/multihost.py) and give one process's tokens."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "multihost.py"
ARGS = ["--model", "tiny", "--policy", "max", "--num-requests", "6", "--max-output", "12",
        "--engine-option", "max_slots=8", "--engine-option", "min_prefill_len=128"]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_tokens_of_one_device(tmp_path):
  spec = importlib.util.spec_from_file_location("multihost", SCRIPT)
  multihost = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(multihost)
  assert multihost.main([*ARGS, "--mesh", "", "--out", str(tmp_path / "one.json")]) == 0  # here, one device
  done = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--spawn", "2", "--local-devices", "2", "--mesh",
                         "stage=2,model=2", "--coordinator", f"127.0.0.1:{_free_port()}",
                         "--out", str(tmp_path / "two.json")], capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  one = json.loads((tmp_path / "one.json").read_text())
  for name in ("two.json", "two.process1.json"):
    run = json.loads((tmp_path / name).read_text())
    assert (run["processes"], run["devices"], run["local_devices"], run["mesh"]) == (2, 4, 2, "stage=2,model=2")
    assert run["output_ids"] == one["output_ids"]
    assert run["timed_compilations"] == 0
