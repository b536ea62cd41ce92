"""Suite-wide settings: one persistent XLA compilation cache for the whole run, in a temporary
directory (set before s3jax is imported, so every ``LLM`` and every server process uses it):
engines of the same shapes in different tests load their executables instead of compiling. Hugging
Face Hub ids resolve from local caches only (``HF_HUB_OFFLINE``), so no test reaches the network."""

import os
import tempfile

import pytest

os.environ.setdefault("S3JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="s3jax-test-xla-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hermetic: Hub ids resolve from local caches only
# 8 CPU devices for the multi-device tests (tests/parallel), before JAX starts; everything else
# runs on the first one, as on a one-device machine.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def pytest_collection_modifyitems(items):
  """Tests built on the tiny PyTorch checkpoints are ``torch`` tests (the fixture imports torch)."""
  for item in items:
    if "build_checkpoint" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.torch)


@pytest.fixture(scope="session")
def tiny_runner():
  """The tiny random-weight model, shared: engines of the same shapes reuse its executables."""
  from s3jax.models.runner import ModelRunner
  return ModelRunner.load("tiny", seed=0)
