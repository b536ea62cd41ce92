"""Slow work that mostly waits on other processes (the default server's start-up and warm-up, the
demo notebook's kernel, the wheel build, the scripts' start-ups), run in one background thread.

A test module declares its work as a module-level ``Job``; ``conftest.py`` queues the jobs of the
modules the session selected, in the order their tests will run, and one thread runs them one at a
time from the first test that is not a ``timing`` test on. The tests before them keep the main
process busy meanwhile, so the work overlaps them instead of adding to the suite's time (one lane:
the main process and one job share the machine). A test calls ``job.result()``: the job's return
value, or its exception, raised in the test; a job not started yet runs right there instead of
waiting for the ones ahead of it. While a ``timing`` test (one that asserts on wall-clock times)
runs, the lane is quiet: it finishes its running job first and starts no other.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable


class Job:
  """``fn()`` run once, in the background lane or by the first ``result()``; ``cleanup(value)`` at
  the end of the session, whichever ran it (for a process the tests never got to close)."""

  def __init__(self, fn: Callable[[], object], cleanup: Callable[[object], None] | None = None):
    self.fn = fn
    self.cleanup = cleanup
    self._lock = threading.Lock()
    self._done = threading.Event()
    self._started = False
    self._value: object = None
    self._error: BaseException | None = None

  def run(self) -> None:
    """Runs ``fn`` unless it has started already (in the lane or in a test)."""
    with self._lock:
      if self._started:
        return
      self._started = True
    try:
      self._value = self.fn()
    except BaseException as e:  # raised again in the test that asks for the result
      self._error = e
    finally:
      self._done.set()

  def result(self) -> object:
    self.run()
    self._done.wait()
    if self._error is not None:
      raise self._error
    return self._value

  def close(self) -> None:
    """At the end of the session: waits for a started job, then cleans up after it."""
    with self._lock:
      started = self._started
      self._started = True  # never starts from now on
    if started:
      self._done.wait()
      if self._error is None and self.cleanup is not None:
        self.cleanup(self._value)


class Lane:
  """One daemon thread that runs queued jobs in order, from ``start()`` on; ``quiet()`` keeps it
  from running any job meanwhile (for the ``timing`` tests)."""

  def __init__(self, jobs: list[Job]):
    self.jobs = jobs
    self._cv = threading.Condition()
    self._holds = 0
    self._running = False
    self._thread = threading.Thread(target=self._run, name="test-background-lane", daemon=True)

  def start(self) -> None:
    if self._thread.ident is None:  # not started yet
      self._thread.start()

  def _run(self) -> None:
    for job in self.jobs:
      with self._cv:
        self._cv.wait_for(lambda: self._holds == 0)
        self._running = True
      try:
        job.run()
      finally:
        with self._cv:
          self._running = False
          self._cv.notify_all()

  @contextlib.contextmanager
  def quiet(self):
    """Waits for the running job to finish, and starts none until the block ends."""
    with self._cv:
      self._holds += 1
      self._cv.wait_for(lambda: not self._running)
    try:
      yield
    finally:
      with self._cv:
        self._holds -= 1
        self._cv.notify_all()

  def close(self) -> None:
    for job in self.jobs:
      job.close()
