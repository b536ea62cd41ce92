"""What an ``LLM`` loads before it serves: the model runner, its tokenizer, the length predictor
and its retrainer, and the engine configuration with the memory budget worked out.

``load`` also sets JAX's persistent compilation cache, which is one per process: the last
``LLM`` built sets it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
from flax import nnx

from s3jax.engine import EngineConfig
from s3jax.executor.runner import DTYPES, ModelRunner, set_compilation_cache
from s3jax.models.config import ModelConfig
from s3jax.models.in_memory import copy_gpt_params
from s3jax.parallel.memory import kv_budget_for_device
from s3jax.scheduler import DEFAULT_BATCH_SIZES, Policy, parse_bytes
from s3jax.tokenizer import load_model_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loaded:
  """Everything ``load`` built (see ``LLM`` for what each argument means)."""

  runner: ModelRunner
  tokenizer: object
  model_name: str
  predictor: object  # an ``s3jax.engine.engine.Predictor``, or None
  retrainer: object  # an ``s3jax.supervisor.retrainer.OnlineRetrainer``, or None
  adapter: object  # an ``s3jax.supervisor.adapter.ColdStartAdapter`` for a cold-started head, or None
  config: EngineConfig


def load(
  model,
  *,
  params,
  runner: ModelRunner | None,
  tokenizer: str | Path | None,
  predictor,
  predictor_head: str | None,
  max_under_rate: float | None,
  online_retraining,
  config: EngineConfig,
  memory_budget_per_device: str | int | None,
  mesh: str | None,
  microbatches: int | None,
  dtype: str | None,
  max_model_len: int | None,
  seed: int,
  compilation_cache: str | Path | None,
) -> Loaded:
  """Loads (or takes) the runner, tokenizer and predictor; ValueError naming a wrong argument."""
  if config.policy in (Policy.S3, Policy.S3_RESERVE) and predictor is None:
    raise ValueError(f"policy {config.policy.value!r} needs a length predictor: pass predictor='default' or a path")
  if runner is not None and params is not None:
    raise ValueError("pass either runner= or the model's params=, not both")
  set_compilation_cache(compilation_cache)
  runner = runner or model_runner(
    model, params, dtype, seed, max_model_len=max_model_len, mesh=mesh, microbatches=microbatches
  )
  if memory_budget_per_device is not None:
    config = _budget_per_device(config, runner, memory_budget_per_device)
  source = runner.source
  model_name = source.name if source is not None else runner.cfg.name
  predictor = load_predictor(predictor, model_name, predictor_head, max_under_rate, runner)
  return Loaded(
    runner=runner,
    tokenizer=load_model_tokenizer(source, tokenizer),
    model_name=model_name,
    predictor=predictor,
    retrainer=_retrainer(predictor, online_retraining),
    adapter=_adapter(predictor),
    config=config,
  )


def _budget_per_device(config: EngineConfig, runner: ModelRunner, per_device: str | int) -> EngineConfig:
  """The config with the KV budget that is left on each device after parameters and workspace."""
  budget = kv_budget_for_device(
    runner.cfg,
    runner.dtype,
    runner.mesh_shape,
    parse_bytes(per_device),
    max_batch=config.scheduler.max_slots or max(DEFAULT_BATCH_SIZES),
    max_prefill=runner.cfg.max_seq_len,
  )
  return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, memory_budget_bytes=budget))


def model_runner(model, params, dtype: str | None, seed: int, max_model_len: int | None, **placement) -> ModelRunner:
  """A loaded model's runner (a name or a path; None: the embedded default), or one over a copy
  of parameters in memory (a ``ModelConfig`` with ``params``, or a ``GPT`` module)."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
  if isinstance(model, nnx.Module):
    if params is not None:
      raise ValueError(
        "pass either a GPT module (LLM(module)) or a config with its params (LLM(cfg, params=...)), not both"
      )
    if not isinstance(getattr(model, "cfg", None), ModelConfig):  # a user's module, not ours
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


def _adapter(predictor):
  """A cold-start adapter when the served head is a cold `<any>` with a shift-robust margin."""
  from s3jax.predictor import LengthPredictor
  from s3jax.supervisor.adapter import ColdStartAdapter

  if isinstance(predictor, LengthPredictor) and predictor.live.calibration.shift_robust(predictor.generator):
    return ColdStartAdapter(predictor)
  return None


def _retrainer(predictor, online_retraining):
  if not online_retraining:
    return None
  from s3jax.predictor import LengthPredictor
  from s3jax.predictor.self_head import SelfLengthPredictor
  from s3jax.supervisor.retrainer import OnlineRetrainer, RetrainConfig  # Deferred: Optax and Orbax.

  if not isinstance(predictor, (LengthPredictor, SelfLengthPredictor)):
    raise ValueError("online_retraining needs a predictor with heads to train (predictor='default', 'self' or a path)")
  return OnlineRetrainer(
    predictor, online_retraining if isinstance(online_retraining, RetrainConfig) else RetrainConfig()
  )


def load_predictor(predictor, served_model: str, head: str | None, max_under_rate: float | None, runner=None):
  """The predictor, set to the head and overflow target for the served model: None, a user's own
  object (``s3jax.engine.engine.Predictor``), the served model's own shipped self-prediction head
  ("self", on ``runner``), or a ``LengthPredictor`` loaded from "default" or a path."""
  if predictor is None:
    return None
  from s3jax.predictor import LengthPredictor

  if predictor == "self":
    from s3jax.predictor.self_head import SelfLengthPredictor

    if head is not None:
      raise ValueError("predictor_head names a MiniLM predictor's head; predictor='self' has one, the served model's")
    predictor = SelfLengthPredictor.load_shipped(runner, served_model, max_under_rate=max_under_rate)
    logger.info(
      "length predictor: %s's own hidden state after block %d, reservations calibrated to overflow %.2f",
      served_model,
      predictor.config.layer,
      predictor.max_under_rate,
    )
    return predictor
  if isinstance(predictor, (str, Path)):
    if predictor == "default":  # the shipped checkpoint with the served model's own head, if one has it
      predictor = LengthPredictor.load_default(served_model)
    else:
      predictor = LengthPredictor.load(predictor)
  if not isinstance(predictor, LengthPredictor):  # a user's own predictor: it has no heads or target
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
