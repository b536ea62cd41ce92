"""``notebooks/s3jax_demo.ipynb`` runs top to bottom in a real Jupyter kernel (nbclient), small:
the tiny model shape after the Hub fallback, 8 requests of at most 24 tokens. Its figure is
written and every policy gave the same tokens (the notebook asserts it)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "s3jax_demo.ipynb"


def test_demo_notebook_runs(tmp_path, monkeypatch):
  small = {"S3JAX_DEMO_MODEL": "acme/not-downloaded", "S3JAX_DEMO_FALLBACK": "tiny", "S3JAX_DEMO_REQUESTS": "8",
           "S3JAX_DEMO_MAX_OUTPUT": "24", "S3JAX_DEMO_BUDGET_SLOTS": "1", "S3JAX_DEMO_PLOT_DIR": str(tmp_path),
           "MPLBACKEND": "Agg"}
  for name, value in small.items():
    monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
  assert "RANDOM weights" in text and "identical tokens under every policy: 8 of 8 requests" in text
  assert all(f"{policy:>6}:" in text for policy in ("max", "s3", "oracle"))
  assert (tmp_path / "s3jax_demo.png").stat().st_size > 10_000
