"""The engine over the fake runner (token = position): exact answers under every policy, cancels,
stops, EOS, the queue bound and the recorded plans, with no model and no compile."""

from __future__ import annotations

import math

import pytest
from fake_runner import FakeConfig, FakeRunner

from s3jax.engine import Engine, EngineConfig, EngineOutput, EngineRequest, FinishReason
from s3jax.errors import QueueFullError, RequestError
from s3jax.scheduler import LengthDist, Policy

# One byte per token: 256 tokens of KV, in pages of 8; `max` holds two sequences of 128.
BUDGET = 256
ENGINE = dict(min_cache_len=16, page_size=8)
POLICY_OPTIONS = {Policy.CONSTANT: {"constant_output_len": 6}}


def _engine(policy=Policy.ON_DEMAND, cfg: FakeConfig | None = None, **options) -> Engine:
  cfg = cfg or FakeConfig()
  options = {**ENGINE, **POLICY_OPTIONS.get(Policy(policy), {}), **options}
  return Engine(FakeRunner(cfg), EngineConfig.create(policy=policy, memory_budget=BUDGET, **options))


def _request(rid: int, prompt_len: int, n: int, *, predicted: int | None = None, **kw) -> EngineRequest:
  """A request whose answer ends after ``n`` tokens (``eos_at``), predicted to need ``predicted``."""
  predicted = n if predicted is None else predicted
  return EngineRequest(
    request_id=rid,
    prompt_ids=list(range(prompt_len)),
    max_tokens=kw.pop("max_tokens", 100),
    eos_at=n,
    true_output_len=n,
    predicted_output_len=predicted,
    predicted_length=LengthDist(math.log1p(predicted), 0.3),
    **kw,
  )


def _workload() -> list[tuple[int, int, int]]:
  """(prompt length, answer length, predicted length): short and long answers, a quarter of
  them predicted four times too short (they outgrow their reservation)."""
  return [
    (1 + (i * 7) % 13, (3, 9, 20, 45)[i % 4], (3, 9, 20, 45)[i % 4] // (4 if i % 4 == 3 else 1)) for i in range(24)
  ]


def _run(engine: Engine) -> dict[int, list[EngineOutput]]:
  by_request: dict[int, list[EngineOutput]] = {}
  while engine.has_work:
    for out in engine.step():
      by_request.setdefault(out.request_id, []).append(out)
  return by_request


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_answers_token_equals_position(policy):
  engine = _engine(policy)
  workload = _workload()
  for i, (prompt_len, n, predicted) in enumerate(workload):
    engine.submit(_request(i, prompt_len, n, predicted=predicted))
  outputs = _run(engine)
  assert sorted(outputs) == list(range(len(workload)))
  for i, (prompt_len, n, _) in enumerate(workload):
    tokens = [t for out in outputs[i] for t in out.token_ids]
    assert tokens == list(range(prompt_len, prompt_len + n)), (policy, i)
    assert [out.finish_reason for out in outputs[i]] == [None] * (len(outputs[i]) - 1) + [FinishReason.STOP]
  m = engine.snapshot()
  assert m.requests_finished == len(workload) and m.output_tokens == sum(n for _, n, _ in workload)
  assert m.peak_reserved_bytes <= BUDGET and m.peak_used_bytes <= m.device_bytes <= BUDGET
  assert engine.runner.generate_calls == m.steps  # one decode call per step, counted by the runner itself
  # The answers above held through what the budget forced (the token of a resumed request is
  # its position all the same).
  if policy in (Policy.S3_RESERVE, Policy.CONSTANT):
    assert m.grows > 0 and m.preemptions > 0, policy
  if policy in (Policy.S3, Policy.ON_DEMAND):
    assert m.preemptions > 0 and m.scheduler.row_moves > 0, policy


def test_cancel_takes_effect_and_yields_its_output_in_the_next_step():
  engine = _engine()
  engine.submit(_request(0, 4, 50))
  engine.submit(_request(1, 4, 50))
  delivered = [t for _ in range(5) for out in engine.step() for t in out.token_ids if out.request_id == 0]
  engine.cancel(0)
  assert 0 in engine.requests  # nothing happens until the next step: no call back, no re-entry
  (cancelled,) = [out for out in engine.step() if out.request_id == 0]
  assert cancelled.finish_reason is FinishReason.CANCELLED and cancelled.token_ids == ()
  assert 0 not in engine.requests and delivered == list(range(4, 4 + len(delivered)))
  engine.cancel(0)  # finished already: nothing more
  rest = _run(engine)
  assert 0 not in rest and rest[1][-1].finish_reason is FinishReason.STOP
  assert engine.metrics.requests_cancelled == 1 and engine.metrics.requests_finished == 1


def test_a_stop_from_above_finishes_the_request_as_an_answer():
  engine = _engine(record_plans=True)
  engine.submit(_request(0, 3, 40))
  while not any(out.token_ids for out in engine.step()):
    pass
  engine.cancel(0, FinishReason.STOP)
  (stopped,) = engine.step()
  assert stopped.finish_reason is FinishReason.STOP and engine.metrics.requests_finished == 1
  (observed,) = engine.misprediction_log.observations()  # a finished answer: kept for retraining
  assert observed.true_output_len == len(stopped.request.output_ids)
  assert len(engine.plans) == 3 and engine.plans[0].ops  # the first plan admitted it


def test_a_cancel_before_the_first_step_ends_a_request_never_scheduled():
  engine = _engine()
  engine.submit(_request(0, 3, 5))
  engine.cancel(0)
  (out,) = engine.step()
  assert out.finish_reason is FinishReason.CANCELLED and not engine.has_work


def test_eos_ends_the_answer_and_is_its_last_token():
  engine = _engine(cfg=FakeConfig(eos_token_id=10))
  engine.submit(_request(0, 4, 50))
  engine.submit(_request(1, 4, 50, ignore_eos=True, max_tokens=9))
  outputs = _run(engine)
  assert [t for out in outputs[0] for t in out.token_ids] == list(range(4, 11))
  assert outputs[0][-1].finish_reason is FinishReason.STOP
  assert [t for out in outputs[1] for t in out.token_ids] == list(range(4, 13))
  assert outputs[1][-1].finish_reason is FinishReason.LENGTH


def test_logprobs_come_with_their_tokens():
  engine = _engine()
  engine.submit(_request(0, 2, 3, logprobs=2))
  outputs = _run(engine)[0]
  entries = [e for out in outputs for e in out.logprobs]
  assert [e.token for e in entries] == [2, 3, 4]
  assert [e.top for e in entries][0] == ((2, pytest.approx(-0.002)), (3, pytest.approx(-0.003)))


def test_a_full_queue_raises_queue_full_error():
  engine = _engine(max_waiting=2)
  engine.submit(_request(0, 3, 5))
  engine.submit(_request(1, 3, 5))
  with pytest.raises(QueueFullError):
    engine.submit(_request(2, 3, 5))
  engine.step()  # both admitted: room again
  engine.submit(_request(2, 3, 5))


def test_a_request_that_can_never_fit_is_a_request_error_naming_the_prompt():
  engine = _engine(policy=Policy.MAX)
  with pytest.raises(RequestError) as error:
    engine.submit(_request(0, 100, 5, max_tokens=100))
  assert error.value.param == "prompt" and not engine.has_work
