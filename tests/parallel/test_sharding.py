"""The model split over 8 forced CPU devices: tensor parallel, pipeline stages and both give the
single-device logits and tokens, hold the bytes the memory model predicts, and serve unchanged.

``tests/conftest.py`` forces 8 CPU devices (XLA_FLAGS) before JAX starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax import LLM, SamplingParams
from s3jax.buckets import BucketScheme
from s3jax.executor.runner import ModelRunner, xla_compilations
from s3jax.executor.step_state import Admission, PrefillPack, StepShapes, StepUpdates
from s3jax.models.checkpoint import random_params
from s3jax.models.config import load_model_config
from s3jax.parallel import MeshShape, memory
from s3jax.predictor.fixed import FixedBucketPredictor

MESHES = ["model=2", "model=4", "stage=2", "stage=4", "stage=2,model=2"]
CFG = load_model_config("tiny").replace(n_layers=4)  # 4 layers, 4 heads: splits 2 and 4 ways
SHAPES = StepShapes.create(
  max_seq_len=CFG.max_seq_len, num_pages=64, page_size=16, batch_sizes=(4, 8), max_admissions=4
)
STEPS = 12


def _greedy(runner: ModelRunner):
  """Prefills 4 prompts in one pack and decodes ``STEPS`` greedy tokens: (logits [steps, 4, V], tokens)."""
  rng = np.random.default_rng(0)
  admissions = [
    Admission(tokens=rng.integers(0, 50000, n).tolist(), pages=list(range(4 * i, 4 * i + 4)), row=i)
    for i, n in enumerate((5, 17, 9, 30))
  ]
  state = runner.prefill(SHAPES, runner.init_state(SHAPES), PrefillPack.from_host(SHAPES, admissions))
  updates = StepUpdates.from_host(SHAPES, admissions=admissions)
  logits, tokens = [], []
  for _ in range(STEPS):
    state, out, step_logits = runner.generate_with_logits(SHAPES, state, runner.put(updates), 4, 16)
    updates = StepUpdates.from_host(SHAPES)
    logits.append(np.asarray(step_logits))
    tokens.append(np.asarray(out.tokens))
  return np.stack(logits), np.stack(tokens), state


@pytest.fixture(scope="module")
def weights():
  return random_params(CFG, 0, jnp.float32)


@pytest.fixture(scope="module")
def single(weights):
  return _greedy(ModelRunner(CFG, *weights))


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_logits_and_greedy_tokens_equal_one_device(mesh, weights, single):
  assert len(jax.devices()) >= 8, "tests/conftest.py forces 8 CPU devices"
  runner = ModelRunner(CFG, *weights, mesh=mesh)
  logits, tokens, state = _greedy(runner)
  np.testing.assert_allclose(logits, single[0], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(tokens, single[1])
  shape = MeshShape.parse(mesh)
  # Really split: every device of the mesh holds a piece, none holds everything.
  assert len(memory.measured_bytes_per_device(runner.params)) == shape.num_devices
  assert max(memory.measured_bytes_per_device(state.pool).values()) * shape.num_devices == state.pool.nbytes


@pytest.mark.parametrize("mesh", ["model=2", "model=4", "stage=2", "stage=4", "stage=2,model=2", "stage=4,model=2"])
def test_memory_model_predicts_each_devices_bytes(mesh, weights):
  runner = ModelRunner(CFG, *weights, mesh=mesh)
  state = runner.init_state(SHAPES)
  predicted = runner.device_memory(SHAPES)
  shape = MeshShape.parse(mesh)
  params, pool = memory.measured_bytes_per_device(runner.params), memory.measured_bytes_per_device(state.pool)
  assert set(params.values()) == {predicted.params}, (params, predicted)
  assert set(pool.values()) == {predicted.kv}
  assert predicted.kv * shape.num_devices == state.pool.nbytes
  blocks = sum(x.nbytes for x in jax.tree.leaves(weights[1]["blocks"]))
  shell = runner.param_bytes - blocks
  # Block matrices split over every device (norms and output biases only over stages); the embeddings
  # stay whole (the 50,257-token vocabulary does not split 2 or 4 ways, positions are never split).
  assert blocks // shape.num_devices + shell <= predicted.params <= blocks // shape.stage + shell


def test_memory_budget_per_device_leaves_the_rest_to_the_kv_cache():
  shape = MeshShape.parse("stage=2,model=2")
  device = 64 << 20
  kv = memory.kv_budget_for_device(CFG, jnp.float32, shape, device, max_batch=8, max_prefill=512)
  params = memory.param_bytes_per_device(CFG, jnp.float32, shape)
  workspace = memory.workspace_bytes(CFG, shape, max_batch=8, max_prefill=512)
  assert kv == (device - params - workspace) * 4
  with pytest.raises(ValueError, match="does not hold .* parameters"):
    memory.kv_budget_for_device(CFG, jnp.float32, shape, 1 << 20, max_batch=8, max_prefill=512)


def test_bad_meshes_are_clear_errors(weights):
  with pytest.raises(ValueError, match="n_heads = 4 does not split over model=3"):
    ModelRunner(CFG, *weights, mesh="model=3")
  with pytest.raises(ValueError, match="n_layers = 4 does not split over stage=8"):
    ModelRunner(CFG, *weights, mesh="stage=8")
  with pytest.raises(ValueError, match="needs 16 devices"):
    ModelRunner(CFG, *weights, mesh="stage=4,model=4")
  with pytest.raises(ValueError, match="bad mesh axis 'data=2'"):
    MeshShape.parse("data=2")


ENGINE = dict(memory_budget=192 << 10, min_cache_len=32, page_size=16, max_slots=4, min_prefill_len=128)


def _serve(mesh, prompts, params, lengths):
  # Every answer longer than 20 tokens outgrows its reservation: grows, moves and preemptions.
  predictor = FixedBucketPredictor(BucketScheme.equal_width(10, 200), 0)
  llm = LLM("tiny", predictor=predictor, policy="s3-reserve", mesh=mesh, **ENGINE)
  llm.warmup()
  compiles = llm.runner.compilations, xla_compilations()
  outs = llm.generate(prompts, params, eos_at=lengths)
  return llm, [o.token_ids for o in outs], compiles


def test_engine_on_a_sharded_model_gives_the_same_tokens_and_compiles_nothing_after_warmup():
  rng = np.random.RandomState(0)
  prompts = [[int(t) for t in rng.randint(0, 50000, rng.randint(1, 40))] for _ in range(16)]
  lengths = [int(x) for x in rng.choice([1, 6, 30, 70], len(prompts))]
  params = [
    SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0 if i % 2 else 0.8, seed=i)
    for i in range(len(prompts))
  ]
  _, reference, _ = _serve(None, prompts, params, lengths)
  llm, tokens, (runner_before, xla_before) = _serve("stage=2,model=2", prompts, params, lengths)
  assert tokens == reference
  assert [len(t) for t in tokens] == lengths
  m = llm.metrics()
  assert m.grows > 0 and m.preemptions > 0
  assert llm.runner.compilations == runner_before == llm.engine.num_executables
  assert xla_compilations() == xla_before
