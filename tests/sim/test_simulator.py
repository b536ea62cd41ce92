"""The simulator: the engine's decisions on the same trace, and the cost model by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from s3jax.engine import Engine, EngineConfig, EngineRequest
from s3jax.models.config import Family, ModelConfig, load_model_config
from s3jax.scheduler import LengthDist, prefix_hashes
from s3jax.sim import A100_80GB, CostModel, DeviceSpec, SimRequest, simulate

# tiny model: 1024 B/token -> 1024 tokens. The engine tests' budget and options: the shared runner's
# executables (and the suite's compilation cache) serve both.
BUDGET = 1 << 20
ENGINE = dict(min_cache_len=32, page_size=16)
UNIT = DeviceSpec(name="unit", flops_per_s=1.0, bytes_per_s=1.0, memory_bytes=10**12, call_overhead_s=0.0)


def _trace(seed=0, n=40):
  rng = np.random.RandomState(seed)
  prompts = [[int(t) for t in rng.randint(0, 50000, rng.randint(1, 40))] for _ in range(n)]
  lengths = [int(x) for x in rng.choice([1, 5, 12, 40, 90, 200], n)]
  predicted = [int(x) for x in rng.choice([4, 30, 100], n)]  # often short of the truth: grows, preemptions
  return prompts, lengths, predicted


def _dist(tokens):
  return LengthDist(math.log1p(tokens) - 0.4, 0.5)  # its 0.8-quantile near ``tokens``


@pytest.mark.parametrize(
  "policy, depth, options",
  [
    ("s3", 1, {}),
    ("s3", 0, {}),
    ("s3", 1, {"admission_order": "fcfs", "admission_risk": 0.5}),
    ("oracle", 1, {}),
    ("on-demand", 1, {}),
    ("adaptive", 1, {}),
    ("max", 1, {}),
    ("constant", 1, {"constant_output_len": 20}),
    ("s3-reserve", 1, {}),
    ("s3-reserve", 1, {"admission_order": "shortest-first"}),
  ],
)
def test_simulator_makes_the_engines_decisions(tiny_runner, policy, depth, options):
  runner = tiny_runner
  prompts, lengths, predicted = _trace()
  config = EngineConfig.create(policy=policy, memory_budget=BUDGET, pipeline_depth=depth, **ENGINE, **options)
  engine = Engine(runner, dataclasses.replace(config, record_plans=True))
  limit = engine.max_total_len
  for i, (ids, n, p) in enumerate(zip(prompts, lengths, predicted)):
    engine.submit(
      EngineRequest(
        request_id=i,
        prompt_ids=ids,
        max_tokens=limit - len(ids),
        ignore_eos=True,
        eos_at=n,
        true_output_len=n,
        predicted_output_len=p,
        predicted_length=_dist(p),
      )
    )
  engine.run_until_done()
  sim = simulate(
    [
      SimRequest(
        prompt_len=len(ids),
        output_len=n,
        predicted_output_len=p,
        predicted_length=_dist(p),
        page_hashes=prefix_hashes(ids, ENGINE["page_size"]),
      )
      for ids, n, p in zip(prompts, lengths, predicted)
    ],
    config,
    CostModel(model=runner.cfg, device=UNIT, dtype_bytes=4),
    record_plans=True,
  )
  assert sim.plans == engine.plans
  assert sim.output_tokens == sum(lengths) == engine.metrics.output_tokens
  stats = engine.scheduler.stats
  assert (sim.stats.grows, sim.stats.preemptions) == (stats.grows, stats.preemptions)
  if policy == "s3-reserve" and not options:
    assert stats.grows and stats.preemptions  # the comparison covers the supervisor's paths
  if policy == "on-demand":
    assert stats.preemptions  # and the evictions'
  if policy == "s3" and not options:
    assert stats.holds and stats.preemptions  # and s3's pauses, and its evictions
  assert all(s.reserved_bytes <= config.memory_budget_bytes for s in sim.timeline)
  assert all(s.used_bytes <= config.memory_budget_bytes for s in sim.timeline)


def test_cost_model_by_hand():
  # L=2, D=8, V=10, d_ff=32, 4 heads: P = 2 (4*64 + 2*8*32) = 1536; fp32 KV per token = 2*2*8*4 = 128.
  cfg = ModelConfig(family=Family.GPT2, vocab_size=10, max_seq_len=16, d_model=8, n_layers=2, n_heads=4, d_ff=32)
  cost = CostModel(model=cfg, device=UNIT, dtype_bytes=4)
  weights = cfg.num_params() * 4
  assert cfg.num_params() == 1536 + 10 * 8 + 16 * 8 and cost.kv_bytes_per_token == 128
  flops, nbytes = cost.decode_work(rows=3, scanned_tokens=5)
  assert flops == 2 * 1536 * 3 + 2 * 10 * 8 * 3 + 4 * 2 * 8 * 5
  assert nbytes == weights + 5 * 128
  assert cost.decode_s(3, 5) == max(flops, nbytes)  # the roofline: memory-bound here
  flops, nbytes = cost.prefill_work(tokens=4, prompts=2)
  assert flops == 2 * 1536 * 4 + 2 * 10 * 8 * 2 + 4 * 2 * 8 * 16 and nbytes == weights + 4 * 128
  additive = CostModel(
    model=cfg,
    device=DeviceSpec(name="cpu", flops_per_s=2.0, bytes_per_s=4.0, memory_bytes=1, call_overhead_s=0.5, overlap=False),
    dtype_bytes=4,
  )
  assert additive.prefill_s(4, 2) == pytest.approx(0.5 + flops / 2 + nbytes / 4)
  # Two stages: each tick is one stage (half the work) on one micro-batch (half the rows); an
  # iteration is two ticks.
  staged = CostModel(model=cfg, device=UNIT, dtype_bytes=4, stages=2)
  f, b = cost.decode_work(rows=2, scanned_tokens=5)
  assert staged.decode_s(4, 10) == pytest.approx(2 * max(f / 2, b / 2))
  # Three layers in two stages: the larger stage holds two, 2/3 of the work, and sets the pace.
  three = CostModel(model=cfg.replace(n_layers=3), device=UNIT, dtype_bytes=4, stages=2)
  assert three.stage_share == pytest.approx(2 / 3)
  assert three.decode_s(4, 10) == pytest.approx(2 * max(*three.decode_work(2, 5)) * 2 / 3)
  with pytest.raises(ValueError, match="do not split"):
    CostModel(model=cfg, device=UNIT, stages=3)


def test_kv_budget_is_what_the_weights_leave():
  gptj = load_model_config("gpt-j-6b")
  cost = CostModel(model=gptj, device=A100_80GB, dtype_bytes=2)
  assert cost.kv_budget_bytes() == int(0.9 * 80e9 - gptj.num_params() * 2)
  gpt3 = load_model_config("gpt3-175b")
  with pytest.raises(ValueError, match="do not fit"):
    CostModel(model=gpt3, device=A100_80GB, stages=4).kv_budget_bytes()
  six = CostModel(model=gpt3, device=A100_80GB, stages=6).kv_budget_bytes()
  assert CostModel(model=gpt3, device=A100_80GB, stages=8).kv_budget_bytes() - six == int(2 * 0.9 * 80e9)


def test_calibration_fit_recovers_a_known_device():
  from s3jax.sim.calibrate import CallTiming, fit_device, fit_errors

  truth = DeviceSpec(
    name="truth", flops_per_s=50e9, bytes_per_s=8e9, memory_bytes=1, call_overhead_s=2e-3, overlap=False
  )
  cfg = load_model_config("gpt2-small-2k")
  cost = CostModel(model=cfg, device=truth, dtype_bytes=4)
  timings = [
    CallTiming(kind="decode", rows=b, tokens=s, seconds=cost.decode_s(b, s))
    for b in (4, 8, 16, 32)
    for s in (256, 2048, 8192)
  ]
  timings += [CallTiming(kind="prefill", rows=1, tokens=t, seconds=cost.prefill_s(t, 1)) for t in (32, 512, 2048)]
  fitted = fit_device(cost, timings, name="fitted", memory_bytes=1)
  assert not fitted.overlap
  refit = CostModel(model=cfg, device=fitted, dtype_bytes=4)
  assert max(abs(e) for e in fit_errors(refit, timings)) < 1e-6
  assert fitted.flops_per_s == pytest.approx(truth.flops_per_s, rel=1e-3)
