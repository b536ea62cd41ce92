"""``notebooks/s3jax_demo.ipynb`` runs top to bottom in a real Jupyter kernel (nbclient), small:
the tiny model shape after the Hub fallback, 8 requests of at most 24 tokens. Its figure is
written and every policy gave the same tokens (the notebook asserts it).

The kernel runs in the background lane (tests/background.py) from the start of the session; the
test checks what it printed and wrote."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
from background import Job
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "s3jax_demo.ipynb"


def _run() -> tuple[nbformat.NotebookNode, Path]:
  out = Path(tempfile.mkdtemp(prefix="s3jax-test-notebook-"))
  small = {
    "S3JAX_DEMO_MODEL": "acme/not-downloaded",
    "S3JAX_DEMO_FALLBACK": "tiny",
    "S3JAX_DEMO_REQUESTS": "8",
    "S3JAX_DEMO_MAX_OUTPUT": "24",
    "S3JAX_DEMO_BUDGET_SLOTS": "1",
    "S3JAX_DEMO_PLOT_DIR": str(out),
    "MPLBACKEND": "Agg",
  }
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(out)}})
  client.execute(env={**os.environ, **small})  # this process's environment and the small settings
  return notebook, out


EXECUTED = Job(_run, cleanup=lambda result: shutil.rmtree(result[1], ignore_errors=True))


def test_demo_notebook_runs():
  notebook, out = EXECUTED.result()
  text = "\n".join(
    output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
  )
  assert "RANDOM weights" in text and "identical tokens under every policy: 8 of 8 requests" in text
  assert all(f"{policy:>6}:" in text for policy in ("max", "s3", "oracle"))
  assert (out / "s3jax_demo.png").stat().st_size > 10_000
