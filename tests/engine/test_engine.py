"""The real engine end to end on the tiny model: policies, budget, compiles, starvation."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from scipy.special import log_softmax

from s3jax import LLM, SamplingParams
from s3jax.buckets import BucketScheme
from s3jax.engine import Engine, EngineConfig, EngineRequest, FinishReason
from s3jax.errors import RequestError
from s3jax.executor.runner import ModelRunner, xla_compilations
from s3jax.predictor.fixed import FixedBucketPredictor
from s3jax.scheduler import PrefillChunk

NUM_REQUESTS = 64
BUDGET = 1 << 20  # tiny model: 1024 B/token -> 1024 tokens: `max` holds 2 sequences of 512
ENGINE = dict(min_cache_len=32, page_size=16)


def _workload(seed=0):
  rng = np.random.RandomState(seed)
  prompts = [[int(t) for t in rng.randint(0, 50000, rng.randint(1, 16))] for _ in range(NUM_REQUESTS)]
  lengths = [int(x) for x in rng.choice([1, 4, 12, 40, 90], NUM_REQUESTS)]
  # Mostly no max_tokens: `max` then reserves the model maximum (512); every third request asks
  # for exactly its length (so SGLang's charges, which read max_tokens, admit enough to evict).
  # Half greedy, half seeded sampling: a seed must give the same tokens whatever batch the
  # request lands in.
  params = [
    SamplingParams(
      max_tokens=None if i % 3 else int(lengths[i]),
      ignore_eos=True,
      temperature=0.0 if i % 2 else 0.8,
      top_k=0 if i % 4 else 40,
      top_p=1.0 if i % 3 else 0.9,
      seed=i,
    )
    for i in range(NUM_REQUESTS)
  ]
  return prompts, lengths, params


def _smallest_bucket_predictor():
  # Every answer longer than 20 tokens overflows its reservation.
  return FixedBucketPredictor(BucketScheme.equal_width(10, 200), 0)


@pytest.fixture(scope="module")
def runner():
  """One runner of this module's engine shapes (BUDGET, ENGINE): every engine built on it shares its
  weights and executables, and it compiles nothing else (test_after_warmup_nothing_compiles counts)."""
  return ModelRunner.load("tiny")


# Every policy, the predictive ones with a predictor that is wrong for most answers.
POLICIES = {
  "max": {},
  "constant": {"constant_output_len": 8},
  "s3-reserve": {"predictor": _smallest_bucket_predictor()},
  "s3": {"predictor": _smallest_bucket_predictor()},
  "oracle": {},
  "on-demand": {},
  "adaptive": {},
  # Chunked prefill: at most 24 prompt tokens per iteration, so prompts and resumed sequences are
  # split over iterations (and fewer are admitted per step).
  "s3/chunked": {"predictor": _smallest_bucket_predictor(), "max_prefill_tokens": 24},
  "on-demand/chunked": {"max_prefill_tokens": 24},
}


@pytest.fixture(scope="module")
def runs(runner):
  prompts, lengths, params = _workload()
  results = {}
  for policy, options in POLICIES.items():
    options = {"predictor": None, **options}
    llm = LLM("tiny", runner=runner, policy=policy.split("/")[0], memory_budget=BUDGET, **ENGINE, **options)
    outs = llm.generate(prompts, params, true_output_lens=lengths, eos_at=lengths)
    results[policy] = (llm, outs)
  return results, lengths


def test_policies_never_change_answers(runs):
  results, lengths = runs
  tokens = {policy: [o.token_ids for o in outs] for policy, (_, outs) in results.items()}
  for i, n in enumerate(lengths):
    assert len(tokens["max"][i]) == n, f"request {i}: {len(tokens['max'][i])} tokens, expected {n}"
    differ = [policy for policy in POLICIES if tokens[policy][i] != tokens["max"][i]]
    assert not differ, f"request {i} differs under {differ}"
  # The comparison covers evictions: every policy that evicts did, under this budget (adaptive
  # not: its ratio is still high in a run this short; tests/scheduler/test_peers.py evicts it).
  for policy in ("s3-reserve", "s3", "on-demand", "constant"):
    assert results[policy][0].metrics().preemptions > 0, policy
  for policy in ("s3/chunked", "on-demand/chunked"):  # tests/scheduler chunks every policy on the fake engine
    assert results[policy][0].metrics().scheduler.prefill_chunks > 0, policy


def test_bad_predictor_overflows_are_supervised(runs):
  results, _ = runs
  m = results["s3-reserve"][0].metrics()
  assert m.mispredictions > 0 and m.grows > 0 and m.preemptions > 0 and m.recomputed_tokens > 0
  m = results["s3"][0].metrics()  # forecasts from wrong lengths: evictions, never a lost token
  assert m.mispredictions > 0 and m.grows == 0 and m.preemptions > 0 and m.recomputed_tokens > 0
  assert results["oracle"][0].metrics().mispredictions == results["oracle"][0].metrics().preemptions == 0
  stats = [o.stats for o in results["s3-reserve"][1]]
  assert any(s.grows or s.preemptions for s in stats)
  log = results["s3"][0].engine.misprediction_log
  assert len(log) == NUM_REQUESTS and log.mispredictions()


def test_one_decode_call_per_iteration_within_the_budget(runs):
  results, _ = runs
  for policy, (llm, outs) in results.items():
    m = llm.metrics()
    # One decode call per step decodes every running row at once: each call had a live row and
    # at most the largest batch, and the answers' tokens are the engine's count.
    assert m.output_tokens == sum(len(o.token_ids) for o in outs), policy
    assert m.steps <= m.decoded_tokens <= m.steps * m.max_batch_size, policy
    assert 0 < m.peak_reserved_bytes <= BUDGET, policy
    assert 0 < m.peak_used_bytes <= m.device_bytes <= BUDGET, policy
  # `max` can only hold 2 sequences of 512 tokens at once; s3 and oracle batch more.
  assert results["max"][0].metrics().max_batch_size <= 2
  assert results["oracle"][0].metrics().max_batch_size > 2
  assert results["s3"][0].metrics().steps < results["max"][0].metrics().steps


def test_after_warmup_nothing_compiles(runs):
  """Moves, growths, preemptions and prompts near the model maximum, all warmed up ahead of time."""
  llm = LLM(
    "tiny",
    runner=runs[0]["s3"][0].runner,
    predictor=_smallest_bucket_predictor(),
    policy="s3-reserve",
    memory_budget=BUDGET,
    **ENGINE,
  )
  llm.warmup()  # compiles what the runs above, on the same runner, did not reach
  assert llm.runner.compilations == llm.engine.num_executables == 6 + 5  # batch sizes + prefill lengths
  runner_before, xla_before = llm.runner.compilations, xla_compilations()
  rng = np.random.RandomState(2)
  prompts, lengths, params = _workload(seed=1)
  long_prompt = [int(t) for t in rng.randint(0, 50000, 500)]  # 500 of 512 positions
  outs = llm.generate(
    prompts + [long_prompt] * 3, params + [SamplingParams(max_tokens=8, ignore_eos=True)] * 3, eos_at=lengths + [8] * 3
  )
  assert [len(o.token_ids) for o in outs] == lengths + [8] * 3
  m = llm.metrics()
  assert m.grows > 0 and m.preemptions > 0 and m.scheduler.row_moves > 0
  assert llm.runner.compilations == runner_before
  assert xla_compilations() == xla_before


@pytest.mark.parametrize(
  "budget, options, batch_sizes, prefill_lens",
  [
    (BUDGET, dict(min_cache_len=32, page_size=16), (4, 8, 12, 16, 24, 32), (32, 64, 128, 256, 512)),
    (BUDGET // 4, dict(min_cache_len=64, page_size=32, max_slots=6, min_prefill_len=128), (4, 6), (128, 256, 512)),
  ],
)
def test_executable_count_matches_the_formula(budget, options, batch_sizes, prefill_lens):
  """Executables = batch sizes + prefill lengths; warm-up builds exactly those, each once."""
  runner = ModelRunner.load("tiny")
  engine = Engine(runner, EngineConfig.create(policy="oracle", memory_budget=budget, **options))
  assert engine.shapes.batch_sizes == batch_sizes and engine.shapes.prefill_lens == prefill_lens
  assert engine.num_executables == len(batch_sizes) + len(prefill_lens)
  xla = xla_compilations()
  assert engine.warmup() == engine.num_executables == runner.compilations
  assert xla_compilations() - xla == engine.num_executables
  assert engine.warmup() == 0


def test_long_request_is_not_starved():
  """A stream of short requests must not postpone a long one forever.

  Bound: with starvation limit L, at most A admissions per step and largest
  usable class U, the long request is admitted within L + U + 2 iterations of
  its submission (L + 1 to become head-of-line, then at most U + 1 while the
  running sequences finish and free their memory) and finishes its n tokens
  n - 1 iterations later.
  """
  limit, long_len = 4, 60
  config = EngineConfig.create(
    policy="oracle", memory_budget=64 * 1024, starvation_limit=limit, min_cache_len=16, page_size=16
  )
  engine = Engine(ModelRunner.load("tiny"), config)
  long = EngineRequest(
    request_id=0, prompt_ids=[1, 2, 3], max_tokens=long_len, true_output_len=long_len, ignore_eos=True
  )
  engine.submit(long)
  next_id, steps = 1, 0
  while long.finish_reason is None:
    for _ in range(2):  # two new short requests every iteration, forever
      engine.submit(
        EngineRequest(request_id=next_id, prompt_ids=[5, 6], max_tokens=8, true_output_len=8, ignore_eos=True)
      )
      next_id += 1
    engine.step()
    steps += 1
    assert steps <= limit + engine.max_total_len + 2 + long_len, "long request starved"
  assert len(long.output_ids) == long_len


@pytest.fixture(scope="module")
def llm(runner):
  return LLM("tiny", runner=runner, predictor=None, policy="max", memory_budget=BUDGET, **ENGINE)


@pytest.mark.parametrize(
  "prompt, params, message",
  [
    ("", SamplingParams(), "prompt is empty"),
    ("hi", SamplingParams(prompt_logprobs=6), "prompt_logprobs"),
    ("hi", SamplingParams(max_tokens=-3), "max_tokens"),
    ("hi", SamplingParams(max_tokens=10_000), "max_tokens"),
    ("hi", SamplingParams(temperature=-1.0), "temperature"),
    ("hi", SamplingParams(top_p=0.0), "top_p"),
    ("hi", SamplingParams(top_p=1.5), "top_p"),
    ("hi", SamplingParams(top_k=-1), "top_k"),
    ("hi", SamplingParams(seed=-1), "seed"),
    ("hi", SamplingParams(stop=("",)), "stop"),
    ("hi", SamplingParams(replay_output_len=0), "replay_output_len"),
    ("word " * 600, SamplingParams(max_tokens=4), "prompt is too long"),
    ([70_000], SamplingParams(), "token ids"),
  ],
)
def test_bad_input_is_a_clear_request_error(llm, prompt, params, message):
  with pytest.raises(RequestError, match=message) as error:
    llm.generate([prompt], params)
  assert error.value.param == ("prompt" if message.startswith("prompt ") or "token ids" in message else message)
  assert llm.generate(["still serving"], SamplingParams(max_tokens=3))[0].stats.output_tokens == 3


def test_request_that_never_fits_the_budget_is_rejected_at_submission():
  small = LLM("tiny", predictor=None, policy="oracle", memory_budget=100 * 1024, min_cache_len=32, page_size=16)
  assert small.engine.max_total_len < small.max_model_len
  with pytest.raises(ValueError, match="memory budget|longest sequence"):
    small.generate(["hello"], SamplingParams(max_tokens=small.max_model_len - 10))
  assert not small.engine.has_work
  with pytest.raises(ValueError, match="memory budget"):
    LLM("tiny", predictor=None, policy="max", memory_budget=1024)


def test_stop_strings_and_streaming(llm):
  params = SamplingParams(max_tokens=24, temperature=0.7, seed=3, ignore_eos=True)
  full = llm.generate(["Once upon a time"], params)[0]
  assert len(full.token_ids) == 24
  stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
  cut = llm.generate(["Once upon a time"], dataclasses.replace(params, stop=(stop,)))[0]
  assert cut.finish_reason is FinishReason.STOP and stop not in cut.text and full.text.startswith(cut.text)
  assert len(cut.token_ids) < len(full.token_ids) and full.token_ids[: len(cut.token_ids)] == cut.token_ids

  async def collect():
    return [e async for e in llm.stream("Once upon a time", params)]

  events = asyncio.run(collect())
  assert "".join(e.text for e in events) == full.text
  assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].output.token_ids == full.token_ids
  assert [t for e in events for t in e.token_ids] == full.token_ids


def test_logprobs_are_the_models_log_softmax_and_change_no_token(llm):
  prompt, settings = "Hello there", dict(max_tokens=6, temperature=0.7, seed=3)
  out = llm.generate([prompt], SamplingParams(**settings, logprobs=2))[0]
  ids = llm.tokenizer.encode(prompt) + out.token_ids
  logp = log_softmax(llm.runner.forward_logits(np.array([ids]))[0], axis=-1)  # the full forward pass, no cache
  start = len(ids) - len(out.token_ids) - 1  # the position whose logits chose the first answer token
  assert [e.token for e in out.logprobs] == out.token_ids
  for i, entry in enumerate(out.logprobs):
    np.testing.assert_allclose(entry.logprob, logp[start + i, entry.token], atol=1e-4)
    assert [t for t, _ in entry.top] == list(np.argsort(-logp[start + i])[:2])
  plain = llm.generate([prompt], SamplingParams(**settings))[0]
  assert plain.logprobs is None and plain.token_ids == out.token_ids


def test_prompt_logprobs_are_the_models_log_softmax_with_or_without_an_answer(llm):
  """Each prompt token's log-probability given those before it, and its top alternatives, from
  the prefill, as the full forward pass computes them: with an answer (whose tokens they change
  not), and with max_tokens=0 (no answer, no KV, nothing left held), batched with requests that
  do not ask. Without prompt_logprobs, max_tokens=0 answers at once with nothing."""
  prompts = ["Hello there, how are you", "Scores of a longer prompt: " + "abc " * 40]
  scored = SamplingParams(max_tokens=0, prompt_logprobs=3, temperature=0.0)
  answered = SamplingParams(max_tokens=5, prompt_logprobs=1, temperature=0.0, ignore_eos=True)
  plain = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
  outs = llm.generate(prompts + prompts + ["no scores"], [scored, scored, answered, answered, plain])
  for out, prompt, k in zip(outs, prompts + prompts, (3, 3, 1, 1)):
    ids = llm.tokenizer.encode(prompt)
    logp = log_softmax(llm.runner.forward_logits(np.array([ids]))[0], axis=-1)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for j, entry in enumerate(out.prompt_logprobs[1:], 1):
      assert entry.token == ids[j]
      np.testing.assert_allclose(entry.logprob, logp[j - 1, ids[j]], atol=1e-4)
      assert [t for t, _ in entry.top] == list(np.argsort(-logp[j - 1])[:k])
  assert [len(o.token_ids) for o in outs] == [0, 0, 5, 5, 5] and outs[-1].prompt_logprobs is None
  assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
  assert [o.token_ids for o in outs[2:4]] == [o.token_ids for o in llm.generate(prompts, plain)]
  empty = llm.generate(["nothing asked"], SamplingParams(max_tokens=0))[0]
  assert empty.token_ids == [] and empty.prompt_logprobs is None and empty.finish_reason is FinishReason.LENGTH
  assert llm.engine.scheduler.reserved_bytes == 0 and not llm.engine.has_work


def test_a_long_prompt_prefills_in_chunks_while_the_others_decode(runner, llm):
  """With max_prefill_tokens, a long prompt arriving among running streams is prefilled a chunk per
  iteration while they keep decoding; its answer, its prompt's log-probabilities (scored across
  the chunk boundaries) and every other answer are those of the unchunked engine."""
  rng = np.random.RandomState(5)
  short = [[int(t) for t in rng.randint(0, 50000, 6)] for _ in range(3)]
  long = [int(t) for t in rng.randint(0, 50000, 150)]
  greedy = dict(temperature=0.0, ignore_eos=True)
  chunked = LLM(
    "tiny",
    runner=runner,
    predictor=None,
    policy="on-demand",
    memory_budget=BUDGET,
    max_prefill_tokens=40,
    record_plans=True,
    **ENGINE,
  )
  params = [SamplingParams(max_tokens=30, **greedy)] * 3 + [SamplingParams(max_tokens=5, prompt_logprobs=2, **greedy)]
  requests = [chunked.inputs.make_request(i, p, q) for i, (p, q) in enumerate(zip(short + [long], params))]
  engine = chunked.engine
  for request in requests[:3]:
    engine.submit(request)
  for _ in range(3):
    engine.step()  # the short ones are running
  engine.submit(requests[3])
  engine.run_until_done()
  expected = llm.generate(short + [long], params)
  assert [r.output_ids for r in requests] == [o.token_ids for o in expected]
  got, want = requests[3].prompt_token_logprobs, expected[3].prompt_logprobs
  assert got[0] is None and len(got) == len(want) == len(long)
  np.testing.assert_allclose([e.logprob for e in got[1:]], [e.logprob for e in want[1:]], atol=1e-5)
  assert [[t for t, _ in e.top] for e in got[1:]] == [[t for t, _ in e.top] for e in want[1:]]
  np.testing.assert_allclose(
    [[lp for _, lp in e.top] for e in got[1:]], [[lp for _, lp in e.top] for e in want[1:]], atol=1e-5
  )
  chunk_steps = [p for p in engine.plans if any(isinstance(op, PrefillChunk) for op in p.ops)]
  assert len(chunk_steps) == 3 and all(p.decode for p in chunk_steps)  # 150 tokens, 40 a step; decodes go on
  assert engine.scheduler.used_bytes == 0 and not engine.has_work


def test_replay_output_len_ends_the_answer_unseen_by_the_policy(llm):
  params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True, replay_output_len=7)
  out = llm.generate(["a trace replay"], params)[0]
  assert len(out.token_ids) == 7 and out.finish_reason is FinishReason.STOP
  # `max` still reserved the model maximum: the replayed length did not leak into its reservation.
  assert out.stats.reserved_tokens == llm.engine.max_total_len
  assert (
    out.token_ids
    == llm.generate(["a trace replay"], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))[0].token_ids
  )


def test_prompts_that_fill_the_window_together_get_prefill_calls_of_their_own():
  """Two prompts admitted at once, each fitting the model's window but not both in one pack
  (the window is below ``prefill_pack_tokens``): each gets a prefill call of its own, and their
  answers are those they get alone."""
  small = ModelRunner.load("tiny", max_model_len=64)
  prompts = [list(range(1, 41)), list(range(100, 145))]
  params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
  together = LLM("tiny", runner=small, predictor=None, policy="max", memory_budget=BUDGET, **ENGINE)
  assert together.engine.shapes.prefill_lens[-1] == 64 < together.engine.config.prefill_pack_tokens
  outs = together.generate(prompts, params)
  assert together.engine.metrics.prefill_calls == 2
  alone = [together.generate([p], params)[0].token_ids for p in prompts]
  assert [o.token_ids for o in outs] == alone


def _shared_prefix_workload():
  """Prompts that share a 40-token system prefix (two pages and a half), half of one page, or nothing,
  some of them identical (as the n choices of one request are), greedy and seeded answers."""
  rng = np.random.RandomState(7)
  system = [int(t) for t in rng.randint(0, 50000, 40)]
  prompts = []
  for i in range(24):
    own = [int(t) for t in rng.randint(0, 50000, rng.randint(1, 30))]
    prompts.append((system + own, system[:8] + own, own)[i % 3])
  prompts += [prompts[0]] * 3 + [system]  # a prompt repeated, and the prefix alone (a page and a half cached)
  lengths = [int(x) for x in rng.choice([1, 4, 12, 40, 90], len(prompts))]
  params = [
    SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0 if i % 2 else 0.8, seed=i)
    for i, n in enumerate(lengths)
  ]
  return prompts, lengths, params


@pytest.mark.parametrize(
  "policy, options",
  [
    ("on-demand", {}),
    ("s3", {"predictor": _smallest_bucket_predictor()}),
    ("s3-reserve", {"predictor": _smallest_bucket_predictor()}),
    ("adaptive", {}),
    ("on-demand", {"max_prefill_tokens": 24}),
  ],
)
def test_prefix_caching_changes_no_answer_and_gives_every_page_back(runner, policy, options):
  """The same answers with and without prefix caching, for full, partial and no shared prefixes,
  under a budget small enough (320 tokens) that sequences are evicted and cached pages reused for
  others; afterwards every page is free and nothing is reserved. Repeated prompts prefill once.
  Nothing compiles after warm-up with caching on."""
  prompts, lengths, params = _shared_prefix_workload()
  runs = {}
  for caching in (False, True):
    llm = LLM(
      "tiny",
      runner=runner,
      policy=policy,
      memory_budget=320 * 1024,
      prefix_caching=caching,
      **ENGINE,
      **{"predictor": None, **options},
    )
    if caching:  # nothing compiles after warm-up with caching (and chunks) on
      llm.warmup()
      compiled = llm.runner.compilations, xla_compilations()
    runs[caching] = (llm, [o.token_ids for o in llm.generate(prompts, params, true_output_lens=lengths)])
    engine = llm.engine
    assert engine.scheduler.used_bytes == engine.scheduler.reserved_bytes == 0 and not engine.has_work
  assert runs[True][1] == runs[False][1]
  assert (runs[True][0].runner.compilations, xla_compilations()) == compiled
  assert [len(t) for t in runs[True][1]] == lengths
  cached, plain = runs[True][0].metrics(), runs[False][0].metrics()
  assert plain.prefix_cached_tokens == plain.cached_pages == 0
  assert cached.prefix_cached_tokens > 0 and cached.cached_pages > 0
  # What an admission did not prefill it read from the cache (the schedules differ: evictions too).
  assert cached.prefill_tokens + cached.prefix_cached_tokens == cached.scheduler.prefill_tokens
  assert cached.peak_used_bytes <= cached.device_bytes <= 320 * 1024
  if policy in ("on-demand", "s3"):
    assert cached.preemptions > 0  # the comparison covers evictions


def test_the_n_choices_of_a_prompt_prefill_it_once(runner):
  prompt = [int(t) for t in np.random.RandomState(8).randint(0, 50000, 100)]
  params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, seed=3)
  llm = LLM("tiny", runner=runner, predictor=None, policy="on-demand", memory_budget=BUDGET, **ENGINE)
  outs = llm.generate([prompt] * 4, [dataclasses.replace(params, seed=i) for i in range(4)])
  # The first prefills 100 tokens; the others wait a step and read its 6 full pages, prefilling 4.
  assert llm.metrics().prefill_tokens == 100 + 3 * 4 and llm.metrics().prefix_cached_tokens == 3 * 96
  alone = LLM(
    "tiny", runner=runner, predictor=None, policy="on-demand", memory_budget=BUDGET, prefix_caching=False, **ENGINE
  )
  assert [o.token_ids for o in outs] == [
    o.token_ids for o in alone.generate([prompt] * 4, [dataclasses.replace(params, seed=i) for i in range(4)])
  ]
