"""``s3jax-serve``: an OpenAI-compatible server for one model, from the command line.

    s3jax-serve                                   # gpt2-small shape, random weights, shipped predictor
    s3jax-serve --model gpt2                      # GPT-2's real weights from the Hugging Face Hub
    s3jax-serve --model tiny --policy max --port 8001
    s3jax-serve --model /ckpt/gpt2 --memory-budget 2GiB --max-queue 256

The process builds the ``LLM`` (weights, tokenizer, predictor), compiles every
executable the engine and the predictor can reach unless ``--no-warmup`` (with
a progress bar; JAX's persistent compilation cache makes a restart load them
instead), then runs uvicorn in the main thread.
SIGTERM / SIGINT: new completions get 503, in-flight ones finish within
``--drain-timeout`` (then they are cancelled), the engine thread is joined and
the process exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Sequence

import uvicorn

from s3jax.models.runner import DEFAULT_COMPILATION_CACHE
from s3jax.scheduler import AdmissionOrder, Policy
from s3jax.serving.server import ServerConfig, begin_drain, build_app

logger = logging.getLogger("s3jax.serve")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeArgs:
  """Everything ``s3jax-serve`` was asked for (see ``parse_args`` for the meanings)."""

  model: str = "gpt2-small"
  tokenizer: str | None = None
  predictor: str | None = "default"
  predictor_head: str | None = None
  max_under_rate: float | None = None
  online_retraining: bool = False
  retrain_every: int = 200
  retrain_dir: str | None = None
  retrain_device_share: float = 0.25
  policy: str = "s3"
  constant_output_len: int | None = None
  admission_order: str = "pack"
  memory_budget: str = "512MiB"
  compilation_cache: str | None = DEFAULT_COMPILATION_CACHE and str(DEFAULT_COMPILATION_CACHE)
  dtype: str = "float32"
  max_queue: int | None = None
  host: str = "127.0.0.1"
  port: int = 8000
  served_model_name: str | None = None
  drain_timeout: float = 30.0
  trace_replay: bool = False
  warmup: bool = True
  log_level: str = "info"


def parse_args(argv: Sequence[str] | None = None) -> ServeArgs:
  p = argparse.ArgumentParser(prog="s3jax-serve", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  d = ServeArgs()
  p.add_argument("--model", default=d.model,
                 help="Hugging Face Hub id (gpt2, EleutherAI/pythia-160m, EleutherAI/gpt-j-6b), a checkpoint "
                      "directory, or a config name under configs/models/ (random weights)")
  p.add_argument("--tokenizer", default=d.tokenizer,
                 help="Hugging Face tokenizer dir (default: the checkpoint's own, else GPT-2's, shipped)")
  p.add_argument("--predictor", default=d.predictor,
                 help="'default' (shipped), a predictor checkpoint dir, or 'none' (not with --policy s3)")
  p.add_argument("--predictor-head", default=d.predictor_head, metavar="GENERATOR",
                 help="the predictor's head for the served model (default: the head named like the model, else "
                      "the cold-start head '<any>')")
  p.add_argument("--max-under-rate", type=float, default=d.max_under_rate, metavar="RATE",
                 help="overflow rate the predicted reservations are calibrated to, in (0, 1) (default: the "
                      "predictor's, 0.2)")
  p.add_argument("--online-retraining", action="store_true",
                 help="retrain the predictor's head on every finished request in the background and swap in "
                      "better versions (off: the predictor never changes)")
  p.add_argument("--retrain-every", type=int, default=d.retrain_every, metavar="N",
                 help="completions between retraining runs (sooner when the overflow rate drifts)")
  p.add_argument("--retrain-dir", default=d.retrain_dir, metavar="DIR",
                 help="where retrained versions are saved; a restart loads the newest (default: not saved)")
  p.add_argument("--retrain-device-share", type=float, default=d.retrain_device_share, metavar="SHARE",
                 help="most of the wall time retraining may take, in (0, 1]")
  p.add_argument("--policy", default=d.policy, choices=[policy.value for policy in Policy],
                 help="KV reservation: predicted length (s3), model maximum (max), true length (oracle, needs a "
                      "trace), or the same answer length for every request (constant, see --constant-output-len)")
  p.add_argument("--constant-output-len", type=int, default=d.constant_output_len, metavar="TOKENS",
                 help="answer tokens every request reserves under --policy constant")
  p.add_argument("--admission-order", default=d.admission_order, choices=[a.value for a in AdmissionOrder],
                 help="which waiting requests start first: largest reservations first (pack, the paper's "
                      "decreasing first-fit) or smallest first (shortest-first)")
  p.add_argument("--memory-budget", default=d.memory_budget, help="KV-cache budget, e.g. 512MiB or bytes")
  p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"))
  p.add_argument("--compilation-cache", default=d.compilation_cache, metavar="DIR",
                 help="JAX's persistent compilation cache (a restart loads executables instead of compiling)")
  p.add_argument("--no-compilation-cache", dest="compilation_cache", action="store_const", const=None,
                 help="compile everything at every start")
  p.add_argument("--max-queue", type=int, default=d.max_queue,
                 help="most requests waiting for a slot; beyond it new ones get 429 (default: unbounded)")
  p.add_argument("--host", default=d.host)
  p.add_argument("--port", type=int, default=d.port)
  p.add_argument("--served-model-name", default=d.served_model_name,
                 help="model id clients send and /v1/models lists (default: the model's name)")
  p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                 help="seconds in-flight requests may run after SIGTERM before they are cancelled")
  p.add_argument("--trace-replay", action="store_true",
                 help="accept the replay_output_len request field: answers end after that many tokens without "
                      "the policy seeing it (load tests of random weights: scripts/load_test.py)")
  p.add_argument("--no-warmup", dest="warmup", action="store_false",
                 help="skip compiling arena shapes at start-up (first requests then compile)")
  p.add_argument("--log-level", default=d.log_level, choices=("critical", "error", "warning", "info", "debug"))
  ns = p.parse_args(argv)
  if ns.max_queue is not None and ns.max_queue < 0:
    p.error("--max-queue must be >= 0")
  if (ns.policy == Policy.CONSTANT.value) != (ns.constant_output_len is not None):
    p.error("--constant-output-len is given exactly with --policy constant")
  predictor = None if str(ns.predictor).lower() in ("none", "null", "") else ns.predictor
  if ns.max_under_rate is not None and not 0 < ns.max_under_rate < 1:
    p.error(f"--max-under-rate must be in (0, 1), got {ns.max_under_rate}")
  if predictor is None and (ns.predictor_head or ns.max_under_rate is not None or ns.online_retraining):
    p.error("--predictor-head, --max-under-rate and --online-retraining need a predictor")
  if not 0 < ns.retrain_device_share <= 1 or ns.retrain_every < 1:
    p.error("--retrain-device-share must be in (0, 1] and --retrain-every >= 1")
  return ServeArgs(**{**vars(ns), "predictor": predictor})


class _DrainingServer(uvicorn.Server):
  """uvicorn's server, which also tells the app to refuse new work the moment a signal arrives.

  uvicorn closes its listening sockets on shutdown, but clients on kept-alive
  connections could still send requests while in-flight ones drain: those get 503.
  """

  def __init__(self, config: uvicorn.Config, app):
    super().__init__(config)
    self._app = app

  def handle_exit(self, sig: int, frame) -> None:
    begin_drain(self._app)
    super().handle_exit(sig, frame)


def _retrain_config(args: ServeArgs):
  if not args.online_retraining:
    return False
  from s3jax.supervisor.retrainer import RetrainConfig
  return RetrainConfig(every=args.retrain_every, checkpoint_dir=args.retrain_dir,
                       device_share=args.retrain_device_share)


def build_llm(args: ServeArgs):
  """The ``LLM`` the server fronts, compiled ahead of time unless ``args.warmup`` is False."""
  from s3jax.serving.llm import LLM  # Imports JAX: only after the arguments parsed.

  start = time.perf_counter()
  logger.info("loading %s (policy %s, KV budget %s)", args.model, args.policy, args.memory_budget)
  llm = LLM(args.model, tokenizer=args.tokenizer, predictor=args.predictor, predictor_head=args.predictor_head,
            max_under_rate=args.max_under_rate, online_retraining=_retrain_config(args), policy=args.policy,
            memory_budget=args.memory_budget, dtype=args.dtype, max_queue=args.max_queue,
            compilation_cache=args.compilation_cache, admission_order=args.admission_order,
            constant_output_len=args.constant_output_len)
  loaded = time.perf_counter()
  built = 0
  if args.warmup:
    # Every executable a request can reach, now: no request pays a compile on the serving path.
    logger.info("loaded in %.1f s; compiling %d executables (cache: %s)", loaded - start,
                llm.engine.num_executables + len(llm.predictor.shapes if llm.predictor else ()),
                args.compilation_cache or "off")
    built = llm.warmup(progress=True)
  logger.info("ready in %.1f s: %d executables built (%.1f s)", time.perf_counter() - start, built,
              time.perf_counter() - loaded)
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
  app = build_app(llm, ServerConfig(served_model_name=args.served_model_name, drain_timeout_s=args.drain_timeout,
                                    trace_replay=args.trace_replay))
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                          timeout_graceful_shutdown=max(args.drain_timeout, 0.1), access_log=False)
  server = _DrainingServer(config, app)
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
