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


# Which packages each package may not import: the model math stands alone, the device layout
# stands on the model math, the executor joins the two, and the simulator stands on its own types
# (``s3jax.stats``), not on the benchmark's (issue 28, item 6).
FORBIDDEN_IMPORTS = {
  "models": ("s3jax.parallel", "s3jax.executor", "s3jax.engine", "s3jax.serving"),
  "parallel": ("s3jax.executor", "s3jax.engine", "s3jax.serving"),
  "executor": ("s3jax.engine", "s3jax.serving", "s3jax.scheduler"),
  "sim": ("s3jax.bench",),
}


def _imported_modules(path: Path) -> set[str]:
  import ast

  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
    elif isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
  return names


def test_packages_import_only_the_layers_below():
  offences = []
  for package, forbidden in FORBIDDEN_IMPORTS.items():
    for path in sorted((REPO / "s3jax" / package).glob("*.py")):
      offences += [f"{path.relative_to(REPO)}: {m}" for m in _imported_modules(path) if m.startswith(forbidden)]
  assert not offences, "\n".join(offences)
