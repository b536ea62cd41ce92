"""Grouped-query attention split over forced CPU devices (tests/conftest.py forces 8): the tiny
Llama has 6 query heads and 3 kv heads, so ``model=2`` splits the query heads but not the kv
heads, whose projections and KV pool then stay whole on every device (``s3jax.parallel.rules``),
and ``model=3`` splits both. Either way the tokens are one device's, and each device holds the
bytes the memory model predicts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.executor.runner import ModelRunner
from s3jax.executor.step_state import Admission, PrefillPack, StepShapes, StepUpdates
from s3jax.models.checkpoint import random_params
from s3jax.models.config import load_model_config
from s3jax.parallel import MeshShape, memory

CFG = load_model_config("tiny-llama")
SHAPES = StepShapes.create(max_seq_len=CFG.max_seq_len, num_pages=24, page_size=16, batch_sizes=(4,), max_admissions=3)


def _greedy(runner: ModelRunner, steps: int = 10):
  """Three prompts prefilled in one pack, then ``steps`` greedy decode steps: (tokens, state)."""
  rng = np.random.default_rng(0)
  admissions = [
    Admission(tokens=rng.integers(0, 50000, n).tolist(), pages=list(range(4 * i, 4 * i + 4)), row=i)
    for i, n in enumerate((5, 30, 17))
  ]
  state = runner.prefill(SHAPES, runner.init_state(SHAPES), PrefillPack.from_host(SHAPES, admissions))
  updates, tokens = StepUpdates.from_host(SHAPES, admissions=admissions), []
  for _ in range(steps):
    state, out = runner.generate(SHAPES, state, runner.put(updates), 4, 12)
    updates = StepUpdates.from_host(SHAPES)
    tokens.append(np.asarray(out.tokens))
  return np.stack(tokens), state


@pytest.fixture(scope="module")
def weights():
  return random_params(CFG, 0, jnp.float32)


@pytest.fixture(scope="module")
def single(weights):
  return _greedy(ModelRunner(CFG, *weights))[0]


@pytest.mark.parametrize("mesh, kv_split", [("model=2", 1), ("model=3", 3)])
def test_tokens_equal_one_device_whether_or_not_the_kv_heads_split(mesh, kv_split, weights, single):
  assert (CFG.n_heads, CFG.n_kv_heads) == (6, 3)
  runner = ModelRunner(CFG, *weights, mesh=mesh)
  tokens, state = _greedy(runner)
  np.testing.assert_array_equal(tokens, single)
  shape = MeshShape.parse(mesh)
  pool = memory.measured_bytes_per_device(state.pool)
  assert len(pool) == shape.num_devices and set(pool.values()) == {state.pool.nbytes // kv_split}
  predicted = runner.device_memory(SHAPES)
  assert predicted.kv == state.pool.nbytes // kv_split
  assert set(memory.measured_bytes_per_device(runner.params).values()) == {predicted.params}
  k = runner.params["blocks"][0]["attn"]["k"]["kernel"]
  assert k.sharding.shard_shape(k.shape) == (CFG.d_model, CFG.n_kv_heads * CFG.head_dim // kv_split)


def test_a_whole_kv_pool_per_device_is_budgeted_once():
  """Under model=2 every device holds the whole pool, so a budget per device buys a pool of the
  same bytes, not twice them."""
  shape = MeshShape.parse("model=2")
  device = 64 << 20
  kv = memory.kv_budget_for_device(CFG, jnp.float32, shape, device, max_batch=4, max_prefill=512)
  params = memory.param_bytes_per_device(CFG, jnp.float32, shape)
  workspace = memory.workspace_bytes(CFG, shape, max_batch=4, max_prefill=512)
  assert memory.pool_ways(CFG, shape) == 1 and kv == device - params - workspace
  assert memory.pool_ways(CFG, MeshShape.parse("stage=2,model=3")) == 6
