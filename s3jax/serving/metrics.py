"""Prometheus metrics of the HTTP server, in a registry owned by one app.

Two kinds of series:
  * per-request series the server records as requests end (counts by status,
    tokens, TTFT / TPOT / end-to-end latency histograms), and
  * engine series read from the backend's latest ``EngineMetrics`` snapshot at
    scrape time by a custom collector (queue depth and running requests per
    cache-length class, KV bytes reserved / used / budget, mispredictions,
    preemptions, growths, batch sizes, steps), so the engine thread
    does no metrics work for the server beyond taking its snapshot.

Each app gets its own ``CollectorRegistry``, never the process-global one, so
that tests (or one process serving several models) can build several apps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from s3jax.extras import missing_extra

try:
  from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
  from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
  from prometheus_client.registry import Collector
except ModuleNotFoundError as e:
  raise missing_extra(e, "serve", "the s3jax server's metrics") from e

from s3jax.engine import EngineMetrics
from s3jax.serving.outputs import RequestStats

PREFIX = "s3jax"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets (seconds) wide enough for a 2-core CPU and a GPU alike.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# Engine snapshot fields exported as gauges: (attribute, metric name, help).
_ENGINE_GAUGES = (
  ("reserved_bytes", "kv_reserved_bytes", "KV-cache bytes reserved by admitted requests."),
  ("used_bytes", "kv_used_bytes", "KV-cache bytes holding tokens written so far."),
  ("budget_bytes", "kv_budget_bytes", "KV-cache memory budget in bytes."),
  ("peak_reserved_bytes", "kv_peak_reserved_bytes", "Largest KV reservation seen so far, in bytes."),
  ("device_bytes", "kv_device_bytes", "Bytes of the KV page pool on the device (allocated once)."),
  ("max_batch_size", "max_batch_size", "Largest decode batch (live sequences) so far."),
  ("mean_batch_size", "mean_batch_size", "Mean live sequences per decode step."),
  ("slot_occupancy", "slot_occupancy", "Fraction of decoded slots that held a live sequence."),
  (
    "live_overflow_rate",
    "predictor_overflow_rate",
    "Fraction of the newest finished requests (up to 200) whose answer outgrew its predicted reservation.",
  ),
  ("live_overflow_requests", "predictor_overflow_window", "Requests the live overflow rate is measured over."),
  ("cached_pages", "prefix_cached_pages", "KV pages holding a cached prompt prefix, in use or free (prefix caching)."),
  ("prefix_hit_rate", "prefix_cache_hit_rate", "Share of admitted prefills' tokens read from cached prefix pages."),
)
# Engine snapshot fields exported as counters (monotonic totals kept by the engine).
_ENGINE_COUNTERS = (
  ("steps", "engine_steps", "Engine iterations that decoded (one decode call each, for every live row)."),
  ("requests_finished", "engine_requests_finished", "Requests the engine finished, any reason."),
  ("output_tokens", "engine_output_tokens", "Tokens the engine generated."),
  ("prefill_tokens", "engine_prefill_tokens", "Prompt tokens prefilled (re-prefills included)."),
  ("mispredictions", "mispredictions", "Requests whose output outgrew the predicted reservation."),
  ("preemptions", "preemptions", "Sequences preempted (evicted) to free memory, resumed by recomputation."),
  ("recomputed_tokens", "recomputed_tokens", "KV positions computed again by resumed prefills."),
  ("prefix_cached_tokens", "prefix_cached_tokens", "Prompt tokens read from cached prefix pages, not prefilled."),
  ("prefill_chunks", "prefill_chunks", "Chunks of long prompts prefilled over iterations (--max-prefill-tokens)."),
  ("holds", "held_rows", "Row-steps paused for want of a free page instead of an eviction (s3, oracle)."),
  (
    "grows",
    "grows",
    "Reservations grown into a larger cache-length class (a misprediction's cost, reserving policies).",
  ),
  ("compilations", "compilations", "Executables compiled by the engine."),
  ("xla_compilations", "xla_compilations_since_warmup", "XLA compilations since warm-up (0 when warm)."),
)


class EngineCollector(Collector):
  """Reads one engine snapshot per scrape and turns it into metric families."""

  def __init__(self, snapshot: Callable[[], EngineMetrics]):
    self._snapshot = snapshot

  def collect(self) -> Iterator[Metric]:
    snap = self._snapshot()
    for attr, name, doc in _ENGINE_GAUGES:
      yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(getattr(snap, attr)))
    for attr, name, doc in _ENGINE_COUNTERS:
      yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=float(getattr(snap, attr)))
    for per_class, name, doc in (
      (snap.waiting_per_class, "num_requests_waiting", "Requests waiting for admission"),
      (snap.running_per_class, "num_requests_running", "Requests decoding"),
    ):
      total = GaugeMetricFamily(f"{PREFIX}_{name}", f"{doc}.")
      total.add_metric([], float(sum(per_class.values())))
      yield total
      # Labelled by the cache-length class a request reserves (or would reserve when admitted now).
      labelled = GaugeMetricFamily(f"{PREFIX}_{name}_per_class", f"{doc}, by cache-length class.", labels=["cache_len"])
      for cache_len, count in sorted(per_class.items()):
        labelled.add_metric([str(cache_len)], float(count))
      yield labelled


# Online retraining's stats exported as gauges: (attribute, metric name, help).
_RETRAIN_GAUGES = (
  ("version", "predictor_version", "Version of the length predictor serving (0: as loaded)."),
  ("runs", "predictor_retraining_runs", "Online retraining runs so far."),
  ("accepted", "predictor_swaps_accepted", "Retrained candidates accepted and swapped in."),
  ("rejected", "predictor_swaps_rejected", "Retrained candidates rejected (the margin is still recalibrated)."),
  ("skipped", "predictor_retraining_skipped", "Retraining runs due that found too few examples to train on."),
  ("seconds_since_swap", "predictor_seconds_since_swap", "Seconds since the last version was installed (-1: none)."),
  ("buffered", "predictor_replay_examples", "Examples in the retraining replay buffer."),
  (
    "live_exact_rate",
    "predictor_exact_rate",
    "Share of the newest requests whose reservation's bucket was the answer's.",
  ),
  ("live_within_one_rate", "predictor_within_one_rate", "Share of the newest requests within one bucket."),
)


class RetrainCollector(Collector):
  """Reads the online retrainer's stats per scrape."""

  def __init__(self, stats: Callable):
    self._stats = stats

  def collect(self) -> Iterator[Metric]:
    stats = self._stats()
    for attr, name, doc in _RETRAIN_GAUGES:
      value = getattr(stats, attr)
      yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=-1.0 if value is None else float(value))


class ColdStartCollector(Collector):
  """Reads a cold-started head's adaptation per scrape (s3jax.supervisor.adapter)."""

  def __init__(self, adapter):
    self._adapter = adapter

  def collect(self) -> Iterator[Metric]:
    yield GaugeMetricFamily(
      f"{PREFIX}_predictor_cold_start_observations",
      "Served-model lengths the cold-start head's shift-robust margin has observed.",
      value=float(self._adapter.observations),
    )
    yield GaugeMetricFamily(
      f"{PREFIX}_predictor_cold_start_active",
      "1 while the cold-start margin adapts, 0 once online retraining calibrated the head on its own lengths.",
      value=float(self._adapter.cold),
    )


class ServerMetrics:
  """The app's registry and the series the HTTP layer records.

  Args:
    engine_snapshot: returns the engine's metrics snapshot (read at scrape time).
    info: labels of the constant ``s3jax_server_info`` series.
    retrain_stats: returns online retraining's ``RetrainStats`` (None: retraining is off).
    adapter: the cold-start adapter (None: the head is not cold).

  Attributes:
    registry: this app's registry; ``render()`` exposes it.
  """

  def __init__(
    self,
    engine_snapshot: Callable[[], EngineMetrics],
    info: dict[str, str] | None = None,
    retrain_stats: Callable | None = None,
    adapter=None,
  ):
    self.registry = CollectorRegistry()
    r = self.registry
    # What is being served (model, policy, budget): load tests label their results with it.
    Info(f"{PREFIX}_server", "The served model and its scheduling settings.", registry=r).info(info or {})
    self._http = Counter(
      f"{PREFIX}_http_requests", "HTTP requests by route and status code.", ["route", "status_code"], registry=r
    )
    self._requests = Counter(
      f"{PREFIX}_requests", "Completion requests (one per prompt) by final status.", ["status"], registry=r
    )
    self._prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
    self._generation_tokens = Counter(
      f"{PREFIX}_generation_tokens", "Generated tokens of finished requests.", registry=r
    )
    self._in_flight = Gauge(
      f"{PREFIX}_http_requests_in_flight",
      "Completion requests (one per prompt) submitted and not yet finished.",
      registry=r,
    )
    self._ttft = Histogram(
      f"{PREFIX}_time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
    )
    self._tpot = Histogram(
      f"{PREFIX}_time_per_output_token_seconds",
      "Mean time per output token after the first.",
      buckets=TPOT_BUCKETS,
      registry=r,
    )
    self._e2e = Histogram(
      f"{PREFIX}_e2e_request_latency_seconds", "End-to-end request latency.", buckets=E2E_BUCKETS, registry=r
    )
    r.register(EngineCollector(engine_snapshot))
    if retrain_stats is not None:
      r.register(RetrainCollector(retrain_stats))
    if adapter is not None:
      r.register(ColdStartCollector(adapter))

  def http_response(self, route: str, status_code: int) -> None:
    self._http.labels(route=route, status_code=str(status_code)).inc()

  def rejected(self, status: str) -> None:
    """A prompt refused before it reached the engine (``invalid``, ``queue_full``, ``unavailable``)."""
    self._requests.labels(status=status).inc()

  def submitted(self) -> None:
    self._in_flight.inc()

  def unsubmitted(self) -> None:
    """``LLM.submit`` refused a prompt counted by ``submitted``."""
    self._in_flight.dec()

  def finished(self, finish_reason: str, stats: RequestStats | None) -> None:
    """One prompt left the engine; ``stats`` is its ``RequestStats`` (None if unknown)."""
    self._in_flight.dec()
    self._requests.labels(status=finish_reason).inc()
    if stats is None:
      return
    self._prompt_tokens.inc(stats.prompt_tokens)
    self._generation_tokens.inc(stats.output_tokens)
    if stats.output_tokens > 0:
      self._ttft.observe(stats.ttft_s)
      self._e2e.observe(stats.e2e_s)
    if stats.output_tokens > 1:
      self._tpot.observe(stats.tpot_s)

  def render(self) -> bytes:
    return generate_latest(self.registry)
