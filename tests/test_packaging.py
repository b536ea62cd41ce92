"""A wheel install works without the source tree: configs, GPT-2's tokenizer and the default
predictor travel inside the wheel (``s3jax/_assets``), so ``LLM("tiny")`` runs from it.

The build and the run from the wheel happen in the background lane (tests/background.py) from the
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

CHECK = """
import pathlib, sys
import s3jax
from s3jax import LLM, SamplingParams
from s3jax.assets import CONFIG_DIR, GPT2_TOKENIZER_DIR, PREDICTOR_DIR
site = pathlib.Path(sys.argv[1])
for path in (pathlib.Path(s3jax.__file__), CONFIG_DIR, GPT2_TOKENIZER_DIR, PREDICTOR_DIR):
  assert path.is_relative_to(site), f"{path} is not inside the wheel's files at {site}"
llm = LLM("tiny", predictor="default", policy="s3", memory_budget="4MiB", compilation_cache=None)
(out,) = llm.generate("Hello from a wheel", SamplingParams(max_tokens=3, ignore_eos=True))
assert len(out.token_ids) == 3 and out.stats.predicted_bucket is not None, out
print("ok", llm.model_name)
"""


def _build_and_run() -> tuple[list[str], Path, subprocess.CompletedProcess]:
  """Builds the wheel, unpacks it as pip would and runs CHECK from it: its files, where they were
  unpacked, and what CHECK did."""
  tmp = Path(tempfile.mkdtemp(prefix="s3jax-test-wheel-"))
  try:
    # Built from a clean copy: a build/ left in the checkout would leak stale files into the wheel.
    # (The tool caches are left out too: other tests may be writing them while this copies.)
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "results", "runs", "tests", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(source)], check=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("s3jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    # Run from elsewhere, with the wheel's files ahead of the editable source checkout on the path.
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp, env=env, capture_output=True,
                            text=True, timeout=300)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return names, tmp, result


# In the background lane (tests/background.py) from the start of the session.
BUILT = Job(_build_and_run, cleanup=lambda built: shutil.rmtree(built[1], ignore_errors=True))


def test_wheel_carries_its_assets():
  names, _, result = BUILT.result()
  for needed in ("s3jax/_assets/configs/models/gpt2-small.json", "s3jax/_assets/checkpoints/gpt2-tokenizer/vocab.json",
                 "s3jax/_assets/checkpoints/predictor/llama-2-7b-chat-hf/buckets.json"):
    assert needed in names, needed
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[:2] == ["ok", "tiny"]
