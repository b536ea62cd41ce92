"""The errors a caller can act on, typed so that the HTTP layer maps them by class, never by text.

``RequestError`` is a request the engine can never run as given (its ``param`` is the OpenAI
request field at fault, the HTTP answer is 400); ``QueueFullError`` is back-pressure (429: the
same request may succeed later). Both are raised wherever the problem is found: the input
processor, the engine or the scheduler.
"""

from __future__ import annotations


class RequestError(ValueError):
  """A request that cannot run as given.

  Args:
    param: the request field at fault, spelled as the OpenAI API spells it (``"max_tokens"``,
      ``"prompt"``, ``"stop"``), or None when no single field is.
    message: what is wrong and how to fix it.
  """

  def __init__(self, param: str | None, message: str):
    super().__init__(message)
    self.param = param
    self.message = message


class QueueFullError(RuntimeError):
  """The waiting queue is at its bound: retry later."""
