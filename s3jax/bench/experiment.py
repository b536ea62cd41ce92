"""What the replay scripts share: the benchmark systems, typed ``--engine-option`` flags, and the
set-up of a replay (trace, tokenized prompts, the shipped predictor).

``scripts/benchmark.py``, ``bench_mesh.py``, ``multihost.py`` and ``simulate.py`` build their
engines from these, so a system's name, an engine option's text and a trace mean the same in
every script.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence

from s3jax.bench.trace import DEFAULT_GENERATOR, load_trace
from s3jax.engine.config import EngineConfig
from s3jax.flags import convert, field_types
from s3jax.scheduler.config import SchedulerConfig

# The model the replay benchmarks run unless told otherwise: GPT-2 small's shape with a 2,048-token
# window, random weights (answers end through the trace's lengths).
BENCH_MODEL = "gpt2-small-2k"

SYSTEM_HELP = (
  "a policy (max, on-demand, adaptive, s3, oracle, s3-reserve), POLICY+ORDER for another admission "
  "order (e.g. s3+fcfs, oracle+fcfs, s3-reserve+shortest-first), or constant@N (N answer tokens "
  "reserved for every request)"
)

# Set by a script's own flags (a system name, --memory-budget), never by --engine-option.
_NOT_OPTIONS = {"scheduler", "policy", "memory_budget_bytes"}


def system_options(name: str) -> dict:
  """``EngineConfig.create`` arguments of a benchmark system's name (``SYSTEM_HELP``)."""
  if name.startswith("constant@"):
    return {"policy": "constant", "constant_output_len": int(name.split("@")[1])}
  policy, _, order = name.partition("+")
  return {"policy": policy} | ({"admission_order": order} if order else {})


def engine_option_types() -> dict[str, object]:
  """Every ``EngineConfig`` and ``SchedulerConfig`` field an ``--engine-option`` may set, with its type."""
  types = {}
  for cls in (EngineConfig, SchedulerConfig):
    hints = field_types(cls)
    types |= {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in _NOT_OPTIONS}
  return types


def parse_engine_option(item: str) -> tuple[str, object]:
  """``"admission_order=shortest-first"`` -> ``("admission_order", AdmissionOrder.SHORTEST_FIRST)``:
  the value converted by the field's type (int, float, bool, enum, tuple of ints, or None).

  Raises:
    ValueError: not NAME=VALUE, an unknown name (the message lists the known ones), or a value
      the field's type does not take.
  """
  name, sep, value = item.partition("=")
  name = name.strip().replace("-", "_")
  if not sep or not name:
    raise ValueError(f"an engine option is NAME=VALUE, got {item!r}")
  types = engine_option_types()
  if name not in types:
    raise ValueError(f"unknown engine option {name!r}; known: {', '.join(sorted(types))}")
  try:
    return name, convert(value.strip(), types[name])
  except ValueError as e:
    raise ValueError(f"engine option {name}: {e}") from None


def parse_engine_options(items: Sequence[str]) -> dict:
  """Several ``NAME=VALUE`` texts as ``EngineConfig.create`` keyword arguments (the last one wins)."""
  return dict(map(parse_engine_option, items))


def add_engine_option_flag(parser: argparse.ArgumentParser, defaults: Mapping[str, str] | None = None) -> None:
  """The repeatable ``--engine-option NAME=VALUE``; ``engine_options(args)`` reads it.

  Args:
    parser: the script's parser.
    defaults: options the script sets unless the command line sets them again, as texts.
  """

  def parse(text: str) -> tuple[str, object]:
    try:
      return parse_engine_option(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  parse.__name__ = "engine option"
  parser.add_argument(
    "--engine-option",
    dest="engine_option",
    action="append",
    type=parse,
    default=[parse_engine_option(f"{k}={v}") for k, v in (defaults or {}).items()],
    metavar="NAME=VALUE",
    help="an EngineConfig or SchedulerConfig field, e.g. max_slots=8, batch_sizes=4,8,16 or "
    "admission_order=shortest-first (repeatable)" + (f"; default: {dict(defaults)}" if defaults else ""),
  )


def engine_options(args: argparse.Namespace) -> dict:
  """The ``--engine-option`` values of ``args``, as ``EngineConfig.create`` keyword arguments."""
  return dict(args.engine_option)


def replay_inputs(
  runner,
  *,
  num_requests: int,
  max_output: int | None = None,
  generator: str = DEFAULT_GENERATOR,
  ids=None,
  seed: int = 0,
  data_dir=None,
):
  """The trace a replay runs (within the model's window) and its prompts tokenized with GPT-2's BPE.

  Returns:
    ``(trace, prompt_ids)``.
  """
  from s3jax.tokenizer import load_tokenizer

  trace = load_trace(
    generator,
    num_requests=num_requests,
    seed=seed,
    max_len=runner.cfg.max_seq_len,
    max_output=max_output,
    ids=ids,
    data_dir=data_dir,
  )
  tokenizer = load_tokenizer()
  return trace, [tokenizer.encode(p) for p in trace.prompts]


def shipped_predictor(generator: str, max_under_rate: float | None = None):
  """The shipped length predictor with its head for ``generator`` (the cold-start head when it has none)."""
  from s3jax.predictor import LengthPredictor

  shipped = LengthPredictor.load_default(generator)
  return shipped.with_options(shipped.head_for(generator), max_under_rate)


def median_run(runs: Sequence):
  """The run of median wall time (the lower median of an even count)."""
  return sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]
