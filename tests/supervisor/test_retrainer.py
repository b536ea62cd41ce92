"""Online retraining: the buffer's bound, acceptance, atomic swaps, checkpoints, no compiles."""

import threading

import jax
import numpy as np
import pytest

from s3jax.executor.runner import xla_compilations
from s3jax.predictor import LengthPredictor
from s3jax.predictor.data import load_length_data
from s3jax.supervisor.buffer import Example, ReplayBuffer, held_back
from s3jax.supervisor.log import LengthObservation
from s3jax.supervisor.retrainer import OnlineRetrainer, RetrainConfig

SHORT, LONG = "text_davinci_003", "llama-2-7b-chat-hf"  # median answers of 49 and 284 tokens


@pytest.fixture(scope="module")
def drift():
  """The short-answer model's head serving the long-answer model's requests (256 of them)."""
  data = load_length_data()
  rows = np.random.default_rng(0).permutation(len(data.prompts))[:256]
  return [data.prompts[i] for i in rows], data.lengths[rows, data.generator_index(LONG)]


@pytest.fixture(scope="module")
def shipped():
  predictor = LengthPredictor.load_default()
  predictor.warmup()
  return predictor


# Runs that train many steps give the device to nobody else here: no sleeping between their steps
# (the sleeps pace wall time only; test_a_worse_candidate_is_rejected keeps the default pacing).
ALONE = dict(device_share=1.0)


def _observe(retrainer, predictor, prompts, lengths, reserved=None):
  reserved = predictor.reserve_tokens(prompts) if reserved is None else reserved
  for p, n, r in zip(prompts, lengths, reserved):
    retrainer.observe(
      LengthObservation(
        prompt_ids=(),
        prompt_text=p,
        predicted_bucket=None,
        predicted_output_len=int(r),
        true_output_len=int(n),
        grows=0,
        preemptions=0,
        finish_reason="stop",
      )
    )


def test_the_buffer_stays_within_its_bound_and_keeps_old_examples():
  buffer = ReplayBuffer(recent=100, reservoir=50, seed=0)
  for i in range(10_000):
    buffer.add(Example(pooled=np.zeros(1), length=i, held_back=False))
    assert len(buffer) <= buffer.capacity == 150
  lengths = [e.length for e in buffer.examples()]
  assert lengths[-100:] == list(range(9_900, 10_000))  # the newest, in order
  assert min(lengths) < 5_000  # a uniform sample of the older ones
  assert held_back("a prompt", 0.25) == held_back("a prompt", 0.25)
  assert 0.2 < np.mean([held_back(f"prompt {i}", 0.25) for i in range(2000)]) < 0.3


def test_drift_is_corrected_and_a_swap_compiles_nothing(shipped, drift):
  predictor = shipped.with_options(SHORT, 0.2)
  retrainer = OnlineRetrainer(predictor, RetrainConfig(epochs=20, **ALONE))
  retrainer.warmup()
  prompts, lengths = drift
  reserved = predictor.reserve_tokens(prompts)
  before = np.mean(lengths > reserved)
  _observe(retrainer, predictor, prompts, lengths, reserved)
  compiles, executables = xla_compilations(), predictor.num_compilations
  retrainer.run_once()
  after = np.mean(lengths > predictor.reserve_tokens(prompts))
  assert predictor.live.number == 1 and retrainer.stats().runs == 1
  assert before > 0.5 and after < 0.35, (before, after)  # short-answer head: most long answers overflowed
  assert (xla_compilations(), predictor.num_compilations) == (compiles, executables)
  assert shipped.live.number == 0  # the predictor it was copied from is untouched


def test_a_better_candidate_is_accepted(shipped, drift):
  predictor = shipped.with_options(LONG, 0.2)
  head = predictor.head_params()
  column = predictor.generators.index(LONG)
  head["slope"][...] = head["slope"][...].at[column].set(0.0)  # a serving head that ranks nothing
  predictor.swap(predictor.with_head_params(head, predictor.calibration))
  retrainer = OnlineRetrainer(predictor, RetrainConfig(epochs=30, learning_rate=3e-2, **ALONE))
  prompts, lengths = drift
  _observe(retrainer, predictor, prompts, lengths)
  decision = retrainer.run_once()
  assert decision["accepted"], decision
  assert decision["candidate"]["mean_reserved"] < decision["current"]["mean_reserved"]
  assert retrainer.stats().accepted == 1 and predictor.head_params()["slope"][...][column] > 0.1


def test_a_run_with_too_few_examples_is_skipped_counted_and_says_why(shipped, drift):
  predictor = shipped.with_options(LONG, 0.2)
  retrainer = OnlineRetrainer(predictor, RetrainConfig(**ALONE))
  prompts, lengths = drift
  _observe(retrainer, predictor, prompts[:20], lengths[:20])
  decision = retrainer.run_once()
  assert "too few" in decision["skipped"] and "needs 32 and 8" in decision["skipped"]
  stats = retrainer.stats()
  assert (stats.runs, stats.skipped, predictor.live.number) == (0, 1, 0)


def test_a_worse_candidate_is_rejected(shipped, drift):
  predictor = shipped.with_options(LONG, 0.2)
  retrainer = OnlineRetrainer(predictor, RetrainConfig(epochs=5, learning_rate=30.0))  # diverges
  prompts, lengths = drift
  _observe(retrainer, predictor, prompts, lengths)
  head = predictor.head_params()
  decision = retrainer.run_once()
  assert not decision["accepted"], decision
  assert retrainer.stats().rejected == 1
  # The parameters stay (the margin is recalibrated on the observations).
  jax.tree.map(np.testing.assert_array_equal, predictor.head_params(), head)


def test_without_retraining_the_parameters_never_change(tiny_runner, shipped, drift):
  from s3jax import LLM, SamplingParams

  llm = LLM(
    "tiny",
    runner=tiny_runner,
    predictor=shipped,
    predictor_head=LONG,
    memory_budget=1 << 20,
    min_cache_len=32,
    page_size=16,
  )
  live = llm.predictor.live
  prompts, lengths = drift
  llm.generate(
    prompts[:8], SamplingParams(max_tokens=None, ignore_eos=True), eos_at=[int(n) % 40 + 1 for n in lengths[:8]]
  )
  assert llm.retrainer is None and llm.predictor.live is live


def test_predictions_read_one_version_never_a_mix(shipped, drift):
  predictor = shipped.with_options(LONG)
  prompts = drift[0][:8]
  a = predictor.live
  head = predictor.head_params()
  head["loc"][...] = head["loc"][...] + 2.0  # every length e^2 times longer
  b = predictor.with_head_params(head, a.calibration)
  expected = {}
  for version in (a, b):
    predictor.swap(version)
    expected[version.number] = predictor.reserve_tokens(prompts)
  assert not np.array_equal(*expected.values())
  stop, seen = threading.Event(), []

  def swapper():
    while not stop.is_set():
      predictor.swap(b if predictor.live is a else a)

  thread = threading.Thread(target=swapper)
  thread.start()
  try:
    for _ in range(30):
      seen.append(predictor.reserve_tokens(prompts))
  finally:
    stop.set()
    thread.join()
  assert all(any(np.array_equal(s, e) for e in expected.values()) for s in seen)


def test_a_restart_loads_the_newest_accepted_version(shipped, drift, tmp_path):
  config = RetrainConfig(epochs=10, checkpoint_dir=str(tmp_path / "versions"), keep=2, **ALONE)
  predictor = shipped.with_options(SHORT, 0.2)
  retrainer = OnlineRetrainer(predictor, config)
  prompts, lengths = drift
  for half in (slice(0, 128), slice(128, 256)):
    _observe(retrainer, predictor, prompts[half], lengths[half])
    retrainer.run_once()
  assert predictor.live.number == 2
  assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["version-000001", "version-000002"]
  restarted = LengthPredictor.load_default(generator=SHORT, max_under_rate=0.2)
  OnlineRetrainer(restarted, config)
  assert restarted.live.number == 2
  np.testing.assert_array_equal(restarted.reserve_tokens(prompts[:16]), predictor.reserve_tokens(prompts[:16]))
  with pytest.raises(ValueError, match="another predictor"):
    OnlineRetrainer(LengthPredictor.load_default(generator=LONG), config)
