"""Suite-wide settings: one persistent XLA compilation cache for the whole run, in a temporary
directory (set before s3jax is imported, so every ``LLM`` and every server process uses it):
engines of the same shapes in different tests load their executables instead of compiling. Hugging
Face Hub ids resolve from local caches only (``HF_HUB_OFFLINE``), so no test reaches the network.

Slow work that waits on other processes (``background.Job``s of the selected test modules) runs in
one background thread from the first test that is not a ``timing`` test on, overlapping the tests
that run before its own; none runs during a ``timing`` test. Under pytest-xdist (the README's
command: one worker per core) the workers overlap instead."""

import os
import tempfile

import pytest
from background import Job, Lane

os.environ.setdefault("S3JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="s3jax-test-xla-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hermetic: Hub ids resolve from local caches only
# 8 CPU devices for the multi-device tests (tests/parallel), before JAX starts; everything else
# runs on the first one, as on a one-device machine.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

_LANE = pytest.StashKey[Lane]()
_XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_collection_modifyitems(items):
  """Tests built on the tiny PyTorch checkpoints are ``torch`` tests (the fixture imports torch)."""
  for item in items:
    if "build_checkpoint" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.torch)


def pytest_collection_finish(session):
  """Queues the ``Job``s of the selected modules, in the order of their first tests. Under
  pytest-xdist a worker collects every module but runs only some, and the workers already keep
  both cores busy: there the lane never starts, a job runs when its test asks for it
  (``Job.result``), and the lane only cleans up after the jobs that ran."""
  if session.config.option.collectonly:
    return
  modules = dict.fromkeys(item.module for item in session.items if getattr(item, "module", None) is not None)
  jobs = [job for module in modules for job in vars(module).values() if isinstance(job, Job)]
  if jobs:
    session.config.stash[_LANE] = Lane(jobs)


def pytest_runtest_setup(item):
  """The lane starts with the first test that is not a ``timing`` test."""
  lane = item.config.stash.get(_LANE, None)
  if lane is not None and item.get_closest_marker("timing") is None and not _XDIST_WORKER:
    lane.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  """A ``timing`` test runs while the lane is quiet."""
  lane = item.config.stash.get(_LANE, None)
  if lane is None or item.get_closest_marker("timing") is None:
    return (yield)
  with lane.quiet():
    return (yield)


def pytest_sessionfinish(session):
  lane = session.config.stash.get(_LANE, None)
  if lane is not None:
    lane.close()


@pytest.fixture(scope="session")
def tiny_runner():
  """The tiny random-weight model, shared: engines of the same shapes reuse its executables. What it
  compiles goes to the suite's compilation cache (before any ``LLM`` has turned it on), so runners of
  the same shapes in other tests and processes load it."""
  from s3jax.executor.runner import DEFAULT_COMPILATION_CACHE, ModelRunner, set_compilation_cache

  set_compilation_cache(DEFAULT_COMPILATION_CACHE)
  return ModelRunner.load("tiny", seed=0)
