"""How many KV tokens a request reserves, and which class that means.

For the reserving policies (``Policy.reserves``). MAX reads no length hint (it is the worst-case
ORCA-Max baseline: every request reserves the model maximum, whatever its ``max_tokens``),
S3_RESERVE reads ``predicted_output_len``, CONSTANT the one length the configuration gives every
request; both are capped by the user's ``max_tokens``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from s3jax.scheduler.config import Policy
from s3jax.scheduler.plan import SchedRequest


def reservation_tokens(policy: Policy, req: SchedRequest, max_len: int, constant_output_len: int | None = None) -> int:
  """KV tokens ``req`` reserves at its first admission.

  Args:
    policy: the reservation rule.
    req: the request; only the fields the policy may see are read.
    max_len: the model's maximum sequence length (largest class).
    constant_output_len: the answer length CONSTANT reserves.

  Returns:
    MAX: ``max_len``. S3_RESERVE and CONSTANT: the policy's length capped at ``prompt_len +
    max_tokens`` (the user's cap is a hard bound) and at ``max_len``, and at least ``prompt_len +
    1`` (room for the prefill and its token).

  Raises:
    ValueError: when the policy's hint is missing or negative.
  """
  prompt_len = req.prompt_len
  if policy is Policy.MAX:
    return max_len
  if policy is Policy.S3_RESERVE:
    wanted = prompt_len + _hint(req.predicted_output_len, "predicted_output_len", policy)
  elif policy is Policy.CONSTANT:
    wanted = prompt_len + _hint(constant_output_len, "constant_output_len", policy)
  else:
    raise ValueError(f"policy {policy!r} reserves nothing ahead")
  return max(min(wanted, prompt_len + req.max_tokens, max_len), prompt_len + 1)


def _hint(value: int | None, name: str, policy: Policy) -> int:
  if value is None or value < 0:
    raise ValueError(f"policy {policy.value} needs a non-negative {name}, got {value!r}")
  return value


def class_for(cache_lens: Sequence[int], tokens: int) -> int | None:
  """The smallest class holding ``tokens`` positions, or None when none does."""
  i = bisect.bisect_left(cache_lens, tokens)
  return cache_lens[i] if i < len(cache_lens) else None
