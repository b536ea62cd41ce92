"""The server's tests run against ``FakeLLM``: it must have every member of ``Backend``, with the
same parameters, or the server could use something the fake never exercises."""

from __future__ import annotations

import inspect

from fake_backend import FakeLLM

from s3jax.serving.backend import Backend
from s3jax.serving.llm import LLM


def _members(protocol) -> set[str]:
  names = set(protocol.__annotations__)
  names |= {
    name
    for name, value in vars(protocol).items()
    if not name.startswith("_") and callable(value) or isinstance(value, property)
  }
  return {name for name in names if not name.startswith("_")}


def test_the_fake_backend_has_every_protocol_member():
  members = _members(Backend)
  assert {"submit", "cancel", "metrics", "mesh_shape", "predictor", "retrainer"} <= members
  fake = FakeLLM()
  assert not [name for name in members if not hasattr(fake, name)]
  for name in members:
    declared = vars(Backend).get(name)
    if callable(declared):
      assert list(inspect.signature(declared).parameters) == list(
        inspect.signature(getattr(FakeLLM, name)).parameters
      ), name


def test_llm_has_every_protocol_method():
  """LLM, checked on its class (building one loads a model): its data members are set in __init__."""
  methods = [name for name, value in vars(Backend).items() if callable(value) or isinstance(value, property)]
  assert not [name for name in methods if not name.startswith("_") and not hasattr(LLM, name)]
