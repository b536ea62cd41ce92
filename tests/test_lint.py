"""The one linter and formatter config (``[tool.ruff]`` in pyproject.toml) holds on the whole tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
  # ruff comes with the test extra (pip install -e ".[test]")
  result = subprocess.run(
    [sys.executable, "-m", "ruff", "check", "s3jax", "scripts", "tests"], cwd=REPO, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_format_is_applied():
  result = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "s3jax", "scripts", "tests"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, "run `ruff format s3jax scripts tests`:\n" + result.stdout[-4000:]
