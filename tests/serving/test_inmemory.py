"""``LLM`` over a model held in memory (issue 19): a fine-tuning loop hands its parameters over with no
checkpoint written, and prompts go in and answers come out as token-id arrays.

The tiny config (2 layers, width 64) is fine-tuned for a few Adam steps on a repeating token cycle
(enough to move its greedy answers away from the initial weights', not to learn the cycle: each step
takes about a second on two CPU cores)."""

from __future__ import annotations

import asyncio
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from s3jax import LLM, SamplingParams
from s3jax.models.config import load_model_config
from s3jax.models.gpt import GPT, forward_full
from s3jax.models.in_memory import copy_gpt_params

BUDGET = "64MiB"
CYCLE = np.array([464, 1893, 286, 262, 995, 13])  # the tokens the fine-tuning trains on, in order
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
REFERENCE_LEN = 16  # prompt + answer of every reference decode, padded: one compile of forward_full


def _loss(model: GPT, batch):
  logits = forward_full(model, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def _train_step(model: GPT, optimizer: nnx.Optimizer, batch):
  loss, grads = nnx.value_and_grad(_loss)(model, batch)
  optimizer.update(model, grads)
  return loss


def _cycle_batch(rows: int = 4, length: int = 25) -> np.ndarray:
  return np.stack([np.roll(np.resize(CYCLE, length), -r) for r in range(rows)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Finetuned:
  model: GPT  # tests may keep training it
  optimizer: nnx.Optimizer  # its optimizer (a new one would compile the train step again)
  snapshot: GPT  # the model as fine-tuned: what the ``llm`` fixture serves
  initial: GPT  # the model before fine-tuning


@pytest.fixture(scope="module")
def finetuned() -> Finetuned:
  model = GPT(load_model_config("tiny"), rngs=nnx.Rngs(7))
  initial = nnx.clone(model)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  batch = jnp.asarray(_cycle_batch())
  losses = [float(_train_step(model, optimizer, batch)) for _ in range(3)]
  assert losses[-1] < losses[0] - 1, losses
  return Finetuned(model=model, optimizer=optimizer, snapshot=nnx.clone(model), initial=initial)


@pytest.fixture(scope="module")
def llm(finetuned):
  return LLM(finetuned.model, predictor=None, policy="max", memory_budget=BUDGET)


_forward = nnx.jit(forward_full)


def _greedy_reference(model: GPT, prompt, n: int) -> list[int]:
  """The first ``n`` greedy answer tokens by argmax over ``forward_full``, no cache, no engine.
  The tokens are padded to ``REFERENCE_LEN`` at the end (causal: the padding changes no logit
  before it), so every call has one shape."""
  ids = np.zeros(REFERENCE_LEN, np.int32)
  ids[: len(prompt)] = prompt
  for at in range(len(prompt), len(prompt) + n):
    ids[at] = int(jnp.argmax(_forward(model, jnp.asarray(ids[None]))[0, at - 1]))
  return ids[len(prompt) : len(prompt) + n].tolist()


def _token_ids(outputs) -> list[list[int]]:
  return [o.token_ids for o in outputs]


def test_greedy_answers_equal_an_argmax_decode_of_the_finetuned_parameters(llm, finetuned):
  prompts = _cycle_batch(rows=3, length=5)
  outputs = llm.generate(prompts, GREEDY)
  for prompt, output in zip(prompts, outputs):
    assert output.token_ids == _greedy_reference(finetuned.snapshot, prompt, GREEDY.max_tokens)
    assert output.token_ids != _greedy_reference(finetuned.initial, prompt, GREEDY.max_tokens)  # the fine-tuning shows
    assert isinstance(output.token_id_array, np.ndarray) and output.token_id_array.dtype == np.int32
    np.testing.assert_array_equal(output.token_id_array, output.token_ids)
  assert llm.model_name == "tiny"


def test_token_id_prompts_in_every_form_answer_like_the_text(llm):
  text = "The river flows to the sea"
  ids = llm.tokenizer.encode(text)
  (expected,) = _token_ids(llm.generate(text, GREEDY))
  for prompt in (ids, np.array(ids), np.array(ids, np.int64), jnp.array(ids)):
    assert _token_ids(llm.generate(prompt, GREEDY)) == [expected]
  as_rows = [np.array(ids), jnp.array(ids), text]
  assert _token_ids(llm.generate(as_rows, GREEDY)) == [expected] * 3
  assert _token_ids(llm.generate(np.stack([ids, ids]), GREEDY)) == [expected] * 2
  assert _token_ids(llm.generate(jnp.asarray([ids, ids]), GREEDY)) == [expected] * 2


def test_stream_takes_a_token_id_array(llm):
  ids = jnp.asarray(_cycle_batch(rows=1, length=4)[0])
  (expected,) = _token_ids(llm.generate(ids, GREEDY))

  async def stream():
    return [event async for event in llm.stream(ids, GREEDY)]

  events = asyncio.run(stream())
  assert [t for e in events for t in e.token_ids] == expected
  assert events[-1].output.token_id_array.tolist() == expected


def test_the_llm_serves_the_values_given_at_construction(finetuned):
  """A train step that donates the very buffers the LLM was given, and later training steps (in
  place, through the module's Variables, which ``nnx.split``'s state shares) change nothing it serves."""
  model = finetuned.model
  _, state = nnx.split(model)
  served = LLM(model.cfg, params=state, predictor=None, policy="max", memory_budget=BUDGET)
  prompts = _cycle_batch(rows=2, length=5)
  before = _token_ids(served.generate(prompts, GREEDY))

  given = nnx.to_pure_dict(state)
  flipped = jax.jit(lambda p: jax.tree.map(jnp.negative, p), donate_argnums=0)(given)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(given))
  assert _token_ids(served.generate(prompts, GREEDY)) == before

  nnx.update(model, flipped)
  for _ in range(2):  # the training loop goes on, updating the module in place
    _train_step(model, finetuned.optimizer, jnp.asarray(_cycle_batch()))
  assert not np.array_equal(state["wte"][...], served.runner.params["wte"][...])  # `state` follows the module
  assert before != [_greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]  # and would answer otherwise
  assert _token_ids(served.generate(prompts, GREEDY)) == before


def test_every_parameter_form_is_accepted_and_copied(finetuned):
  snapshot = finetuned.snapshot
  cfg = snapshot.cfg
  state = nnx.state(snapshot)
  expected = nnx.to_pure_dict(state)
  with_string_indices = dict(expected, blocks={str(i): block for i, block in expected["blocks"].items()})
  forms = {
    "module": snapshot,
    "state": state,
    "pure dict": expected,
    "numpy pure dict": jax.tree.map(np.asarray, expected),
    "string indices (Orbax)": with_string_indices,
  }
  given_buffers = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(expected)}
  for name, form in forms.items():
    _, copied = copy_gpt_params(cfg, form)
    leaves = jax.tree.leaves(nnx.to_pure_dict(copied))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(copied), expected)
    assert not given_buffers & {leaf.unsafe_buffer_pointer() for leaf in leaves}, name
  _, as_bf16 = copy_gpt_params(cfg, snapshot, jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(as_bf16)} == {jnp.dtype(jnp.bfloat16)}
  _, kept_bf16 = copy_gpt_params(cfg, as_bf16)  # None keeps the parameters' own dtype
  assert {leaf.dtype for leaf in jax.tree.leaves(kept_bf16)} == {jnp.dtype(jnp.bfloat16)}


def _without(tree: dict, *path):
  """A copy of a nested dict without the leaf at ``path``."""
  head, *rest = path
  if not rest:
    return {k: v for k, v in tree.items() if k != head}
  return {**tree, head: _without(tree[head], *rest)}


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda m: LLM(m.cfg), r"params= \(a GPT\('tiny'\) module"),
    (lambda m: LLM("tiny", params=m), "params= goes with a ModelConfig"),
    (lambda m: LLM(m, params=nnx.state(m)), "not both"),
    (lambda m: LLM(m.cfg, params=nnx.split(m)), r"nnx.split returns \(graphdef, state\): pass the state"),
    (
      lambda m: LLM(m.cfg.replace(d_model=128), params=m),
      r"mis-shaped .*wte \(got \(50257, 64\), need \(50257, 128\)\).* Pass the config the parameters were built with",
    ),
    (
      lambda m: LLM(m.cfg, params=_without(nnx.to_pure_dict(nnx.state(m)), "blocks", 1, "mlp", "fc_out", "bias")),
      "missing blocks.1.mlp.fc_out.bias",
    ),
    (
      lambda m: LLM(m.cfg, params=dict(nnx.to_pure_dict(nnx.state(m)), lm_head={"kernel": np.zeros((64, 50257))})),
      "unexpected lm_head.kernel",
    ),
    (
      lambda m: LLM(m.cfg, params=jax.tree.map(lambda a: np.asarray(a, np.int32), nnx.to_pure_dict(nnx.state(m)))),
      "floating-point arrays: got .*int32 array",
    ),
    (lambda m: LLM(m, dtype="float16"), "unknown dtype"),
  ],
)
def test_a_model_that_does_not_fit_is_a_clear_value_error(finetuned, build, message):
  snapshot = finetuned.snapshot
  with pytest.raises(ValueError, match=message):
    build(snapshot)


@pytest.mark.parametrize(
  "prompts, message",
  [
    (np.array([], np.int32), "prompt is empty: give at least one token"),
    (np.zeros((2, 0), np.int32), "prompt is empty"),
    (jnp.array([464, 50257]), r"token ids must be in \[0, 50257\), the model's vocabulary: got 50257 at position 1"),
    (np.array([-1, 5, -2]), r"got -1 at position 0 and 1 more; encode text with llm.tokenizer"),
    (np.array([1.0, 2.0]), r"integers, got a float64 array; cast it with .astype\(np.int32\)"),
    (np.array([True, False]), "integers, got a bool array"),
    ([1, 2.5], "integers, got 2.5"),
    (np.zeros((1, 2, 3), np.int32), r"1-D \(one prompt\) or 2-D \(one prompt per row\), got shape \(1, 2, 3\)"),
    ([np.array([[1, 2]])], r"a token-id array prompt is 1-D, got shape \(1, 2\)"),
  ],
)
def test_bad_token_id_prompts_are_clear_value_errors(llm, prompts, message):
  with pytest.raises(ValueError, match=message):
    llm.generate(prompts, GREEDY)


def test_text_the_model_vocabulary_cannot_hold_is_refused(finetuned):
  """A model with a smaller vocabulary than the tokenizer (GPT-2's by default) would clamp the ids."""
  small = GPT(load_model_config("tiny").replace(vocab_size=384, eos_token_id=383, name="small-vocab"), rngs=nnx.Rngs(0))
  llm = LLM(small, predictor=None, policy="max", memory_budget=BUDGET)
  with pytest.raises(
    ValueError,
    match=r"tokenizer gives token id \d+, outside the model's vocabulary \[0, 384\); "
    r"pass the tokenizer the model was trained with",
  ):
    llm.generate("Hello world", GREEDY)


def test_s3_reads_token_id_prompts_as_their_decoded_text(finetuned, llm):
  """The length predictor reads text: a token-id prompt reaches it decoded by the tokenizer, and the
  answer is the same as under "max" (a reservation never changes the tokens)."""
  snapshot = finetuned.snapshot
  s3 = LLM(snapshot, policy="s3", memory_budget=BUDGET)
  text = "Name three rivers of Europe."
  ids = np.array(s3.tokenizer.encode(text))
  (output,) = s3.generate(ids, GREEDY)
  (observed,) = s3.engine.misprediction_log.observations()  # what the predictor read, and reserved
  assert observed.prompt_text == text
  assert output.stats.predicted_output_len == observed.predicted_output_len is not None
  assert output.token_ids == llm.generate(ids, GREEDY)[0].token_ids
