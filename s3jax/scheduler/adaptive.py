"""The adaptive policy's arithmetic, SGLang's: the new-token ratio and what a request is charged.

Read in SGLang 0.5.23 (``sglang/srt/managers/schedule_policy.py``: ``PrefillAdder``;
``mem_cache/prefill_budget.py``: ``PrefillBudget``; ``managers/scheduler_components/
new_token_ratio_tracker.py``; ``managers/schedule_batch.py``: ``retract_decode``):

* a running request is charged ``min(max_new_tokens - generated, 4096) x ratio`` tokens;
* a new (or retracted) request fits when ``its tokens to prefill + min(max_new_tokens -
  generated, 4096) + page_size`` is below the free tokens minus every charge, and, admitted, is
  charged its prefill in whole pages ``+ page_size + min(max_new_tokens, 4096)``, not scaled by
  the ratio, until the step ends;
* the ratio starts at 0.7, falls by ``(0.7 - 0.098) / 600`` every decode step down to 0.098, goes
  back to 0.7 when the server is idle, and after a retraction becomes ``min(1, (generated + 20 x
  running) / (sum of max_new_tokens + 1))`` over the requests left running.
"""

from __future__ import annotations

INIT = 0.7  # init_new_token_ratio (0.7 x schedule_conservativeness 1.0)
MIN = INIT * 0.14  # min_new_token_ratio_factor x init: 0.098
DECAY_STEPS = 600  # new_token_ratio_decay_steps
CLIP_MAX_NEW_TOKENS = 4096  # SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION
RETRACT_DECODE_STEPS = 20  # the decode steps a retraction leaves room for


class NewTokenRatio:
  """The ratio, one step at a time."""

  def __init__(self):
    self.value = INIT

  def decay(self) -> None:
    self.value = max(self.value - (INIT - MIN) / DECAY_STEPS, MIN)

  def reset(self) -> None:
    self.value = INIT

  def after_retraction(self, generated: int, max_tokens: int, running: int) -> None:
    """The ratio after a retraction: the ``running`` requests left have generated ``generated``
    tokens of a total ``max_tokens``."""
    self.value = min(1.0, (generated + RETRACT_DECODE_STEPS * running) / (max_tokens + 1))

  def running_charge(self, max_tokens: int, generated: int) -> float:
    """Tokens a running request is charged."""
    return min(max_tokens - generated, CLIP_MAX_NEW_TOKENS) * self.value


def admission_need(prefill_tokens: int, max_tokens: int, generated: int, page_size: int) -> int:
  """Tokens a waiting request needs free to be admitted."""
  return prefill_tokens + min(max(max_tokens - generated, 0), CLIP_MAX_NEW_TOKENS) + page_size


def admission_charge(prefill_tokens: int, max_tokens: int, page_size: int) -> int:
  """Tokens an admitted request is charged for the rest of its admission step."""
  return -(-prefill_tokens // page_size) * page_size + page_size + min(max_tokens, CLIP_MAX_NEW_TOKENS)
