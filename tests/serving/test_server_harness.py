"""Spawns real ``scripts/serve.py`` processes for the server tests (no tests here).

Every server is a separate process on 127.0.0.1 with a free port; ``ServerProcess``
waits for ``/health`` and kills the process (and prints its log on failure) at
teardown. By default it serves the tiny model with random weights, without the
predictor and without warm-up (the first requests of a shape compile it), so
start-up takes seconds; ``base_args=()`` starts the embedded default instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from background import Job

REPO = Path(__file__).resolve().parents[2]
# The settings every test server shares; the library-API reference uses the same.
TINY_ARGS = ("--model", "tiny", "--policy", "max", "--predictor", "none", "--no-warmup")
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ServerProcess:
  """One ``scripts/serve.py`` child process.

  Attributes:
    port: where it listens.
    url: ``http://127.0.0.1:<port>``.
    proc: the ``subprocess.Popen``.
  """

  def __init__(self, *args: str, base_args: tuple[str, ...] = TINY_ARGS):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = tempfile.NamedTemporaryFile("w+", prefix="s3jax-serve-", suffix=".log", delete=False)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [
      sys.executable,
      str(REPO / "scripts" / "serve.py"),
      *base_args,
      "--port",
      str(self.port),
      "--log-level",
      "warning",
      *args,
    ]
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

  def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> ServerProcess:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.log()}")
      try:
        if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
          return self
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    raise TimeoutError(f"server not healthy after {timeout_s} s:\n{self.log()}")

  def log(self, tail: int | None = 5000) -> str:
    """The process's output so far (its last ``tail`` characters; None for all of it)."""
    self._log.flush()
    text = Path(self._log.name).read_text()
    return text if tail is None else text[-tail:]

  def terminate(self, timeout_s: float = 60.0) -> int:
    """SIGTERM, then wait; returns the exit code (SIGKILL after the timeout)."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    return self.wait(timeout_s)

  def wait(self, timeout_s: float = 60.0) -> int:
    """Waits for the process to exit; returns the exit code (SIGKILL after the timeout)."""
    if self.proc.poll() is None:
      try:
        self.proc.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return self.proc.returncode

  def close(self) -> None:
    self.terminate(timeout_s=10.0)
    self._log.close()
    os.unlink(self._log.name)


def server_job(*args: str, base_args: tuple[str, ...] = TINY_ARGS, timeout_s: float = STARTUP_TIMEOUT_S) -> Job:
  """A ``background.Job`` that starts a ``ServerProcess`` and waits until it is healthy (in the
  background lane, from the start of the session). The module's fixture closes it; the session's
  end closes it if no test did."""

  def start() -> ServerProcess:
    proc = ServerProcess(*args, base_args=base_args)
    try:
      return proc.wait_ready(timeout_s)
    except BaseException:
      proc.close()
      raise

  def close(proc: ServerProcess) -> None:
    if proc.proc.returncode is None:
      proc.close()

  return Job(start, cleanup=close)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
  """The value of one sample in Prometheus text (None if absent)."""
  from prometheus_client.parser import text_string_to_metric_families

  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
        return sample.value
  return None
