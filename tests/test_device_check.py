"""``scripts/device_check.sh`` is valid bash, and each script it runs accepts the flags it passes."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_check.sh"


def _script_module(name: str):
  spec = importlib.util.spec_from_file_location(f"device_check_{name}", REPO / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _invocations() -> dict[str, list[str]]:
  """``{script: argv}`` of each ``"$PY" scripts/NAME.py ...`` stage, with the variables filled in."""
  text = SCRIPT.read_text().replace("\\\n", " ")
  found = {}
  for line in text.splitlines():
    match = re.search(r'"\$PY" scripts/(\w+)\.py (.*)$', line)
    if match:
      args = match.group(2).replace('"$MODEL"', "gpt-j-6b").replace("$OUT", "/tmp/out").replace("$MODEL", "gpt-j-6b")
      found[match.group(1)] = shlex.split(args)
  return found


def test_bash_syntax():
  subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_each_stage_parses_its_flags():
  runs = _invocations()
  assert set(runs) == {"bench_decode", "benchmark"}
  decode = _script_module("bench_decode").parse_args(runs["bench_decode"])
  assert decode.dtype == "bfloat16" and decode.model == "gpt-j-6b" and decode.no_torch
  engine = _script_module("benchmark").parse_args(runs["benchmark"])
  assert engine.dtype == "bfloat16" and engine.policies == ("max", "s3") and engine.peers == ()
