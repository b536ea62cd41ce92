"""Tables and plots of the engine benchmark (``scripts/benchmark.py``): one budget's runs at a time.

A budget's result is a dict: ``policies`` (run name -> ``ReplayRun.summary()``), optionally
``peers`` (name -> tokens/s and settings), ``timeline`` (run name -> samples over time),
``constant_curve`` (rows of the constant-reservation sweep) and ``online`` (rate -> run name ->
summary).
"""

from __future__ import annotations

from s3jax.extras import missing_extra

COLORS = {
  "max": "#999999",
  "s3": "#1f77b4",
  "s3-reserve": "#9467bd",
  "oracle": "#2ca02c",
  "on-demand": "#d62728",
  "adaptive": "#e377c2",
}


def _color(name: str) -> str:
  return COLORS.get(name, "#ff7f0e" if name.startswith("constant") else "#8c564b")


def render_table(result: dict) -> str:
  """The markdown table of a budget's runs (policies and constants), for BENCHMARKS.md."""
  pol = result["policies"]
  rows = [
    ("output tokens/s", lambda s: f"{s['tokens_per_s']:.1f}"),
    ("wall s", lambda s: f"{s['wall_s']:.1f}"),
    (
      "output tokens per CPU s (process) / CPU s stolen by the host",
      lambda s: f"{s['tokens_per_cpu_s']:.1f} / " + ("-" if s.get("steal_s") is None else f"{s['steal_s']:.0f}"),
    ),
    ("steps", lambda s: f"{s['steps']}"),
    ("mean / max batch", lambda s: f"{s['mean_batch']:.2f} / {s['max_batch']}"),
    (
      "peak reserved / used MiB",
      lambda s: f"{s['peak_reserved_bytes'] / 2**20:.0f} / {s['peak_used_bytes'] / 2**20:.0f}",
    ),
    ("overflow rate (requests that outgrew their reservation)", lambda s: f"{s['overflow_rate']:.2f}"),
    ("grows / preemptions / held row-steps", lambda s: f"{s['grows']} / {s['preemptions']} / {s['holds']}"),
    ("recomputed tokens", lambda s: f"{s['recomputed_tokens']}"),
    ("TTFT p50 / p90 s", lambda s: f"{s['ttft_p50_s']:.1f} / {s['ttft_p90_s']:.1f}"),
    ("TPOT p50 / p90 s", lambda s: f"{s['tpot_p50_s']:.3f} / {s['tpot_p90_s']:.3f}"),
    (
      "e2e mean / p50 / p90 / p99 s",
      lambda s: " / ".join(f"{s[f'e2e_{q}_s']:.1f}" for q in ("mean", "p50", "p90", "p99")),
    ),
    ("XLA compiles in the timed run", lambda s: f"{s['xla_compilations_in_timed_run']}"),
  ]
  if all("goodput_req_per_s" in s for s in pol.values()):
    rows.insert(1, ("goodput req/s (TTFT and TPOT within their SLOs)", lambda s: f"{s['goodput_req_per_s']:.3f}"))
  names = list(pol)
  lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  lines += [f"| {label} | " + " | ".join(cell(pol[p]) for p in names) + " |" for label, cell in rows]
  return "\n".join(lines)


def render_online(online: dict, slo: dict) -> str:
  """Means and percentiles per arrival scenario and policy, and goodput: requests per second that
  met both SLOs (``slo``: ``ttft_slo_s`` and ``slo_s``, per output token)."""
  lines = [
    "| arrivals req/s | system | tok/s | goodput req/s | TTFT mean / p50 / p90 / p99 s | TPOT mean / p50 / p90 / p99 s "
    "| e2e mean / p50 / p90 / p99 s | preemptions |",
    "|---|---|---:|---:|---|---|---|---:|",
  ]

  def four(s, k):
    digits = 3 if k == "tpot" else 1
    return " / ".join(f"{s[f'{k}_{q}_s']:.{digits}f}" for q in ("mean", "p50", "p90", "p99"))

  for rate, runs in online.items():
    for name, s in runs.items():
      cells = " | ".join(four(s, k) for k in ("ttft", "tpot", "e2e"))
      lines.append(
        f"| {rate} | {name} | {s['tokens_per_s']:.1f} | {s['goodput_req_per_s']:.3f} | {cells} | {s['preemptions']} |"
      )
  lines.append("")
  lines.append(f"SLOs: TTFT <= {slo['ttft_slo_s']:.2f} s and TPOT <= {slo['slo_s']:.3f} s ({slo['rule']}).")
  return "\n".join(lines)


def max_rate_within_slo(online: dict, slo_s: float, metric: str = "tpot") -> dict:
  """Per policy, the highest arrival rate whose p90 ``metric`` (``tpot``: time per output token;
  ``norm``: normalized latency) meets ``slo_s``; None when no rate does (the paper's measure of
  online capacity; goodput proper is ``s3jax.stats.goodput``)."""
  policies = {p for runs in online.values() for p in runs}
  return {
    p: max((float(r) for r, runs in online.items() if p in runs and runs[p][f"{metric}_p90_s"] <= slo_s), default=None)
    for p in sorted(policies)
  }


def plot_budget(result: dict, title: str, path_stem: str) -> list[str]:
  """The scenario's PNGs: throughput with peers, latency against throughput, reserved against used
  KV over time, the constant-reservation curve; returns the paths written."""
  try:
    import matplotlib
  except ModuleNotFoundError as e:
    raise missing_extra(e, "bench", "the benchmark's plots") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  pol = result["policies"]

  def save(fig, suffix):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{path_stem}_{suffix}.png", dpi=110)
    plt.close(fig)
    paths.append(f"{path_stem}_{suffix}.png")

  fig, ax = plt.subplots(figsize=(max(7, 1.1 * (len(pol) + 2)), 4.5))
  names = list(pol) + list(result.get("peers", {}))
  tps = [pol[n]["tokens_per_s"] for n in pol] + [p["tokens_per_s"] for p in result.get("peers", {}).values()]
  bars = ax.bar([n.replace(" ", "\n") for n in names], tps, color=[_color(n) for n in names])
  ax.bar_label(bars, fmt="%.1f")
  ax.set_ylabel("output tokens / s")
  ax.set_title("throughput: policies and peers, same trace, model shape and KV budget")
  ax.tick_params(axis="x", labelsize=7)
  save(fig, "throughput")

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, s in pol.items():
    ax.scatter(s["tokens_per_s"], s["tpot_p50_s"], color=_color(name), s=40)
    ax.annotate(
      f"{name} (batch {s['mean_batch']:.1f})",
      (s["tokens_per_s"], s["tpot_p50_s"]),
      fontsize=7,
      textcoords="offset points",
      xytext=(4, 4),
    )
  for rate, runs in result.get("online", {}).items():
    for name, s in runs.items():
      ax.scatter(s["tokens_per_s"], s["tpot_p50_s"], color=_color(name), marker="x")
      ax.annotate(f"{rate}/s, b{s['mean_batch']:.1f}", (s["tokens_per_s"], s["tpot_p50_s"]), fontsize=6)
  ax.set_xlabel("output tokens / s")
  ax.set_ylabel("time per output token, p50 (s)")
  ax.set_title("latency against throughput (dots: offline; x: online rates), mean batch marked")
  save(fig, "latency")

  fig, ax = plt.subplots(figsize=(8, 4.5))
  for name, samples in result["timeline"].items():
    t = [s["t_s"] for s in samples]
    ax.plot(t, [s["reserved_bytes"] / 2**20 for s in samples], color=_color(name), label=f"{name} reserved")
    ax.plot(t, [s["used_bytes"] / 2**20 for s in samples], color=_color(name), ls=":", label=f"{name} used")
  ax.axhline(result["budget_bytes"] / 2**20, color="k", ls="--", lw=0.8, label="budget")
  ax.set_xlabel("seconds")
  ax.set_ylabel("KV MiB")
  ax.set_title("reserved and used KV cache over time")
  ax.legend(fontsize=6, ncol=2)
  save(fig, "memory")

  curve = result.get("constant_curve")
  if curve:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
      [c["overflow_rate"] for c in curve],
      [c["tokens_per_s"] for c in curve],
      "o-",
      color=_color("constant"),
      label="constant reservation (quantile of training lengths)",
    )
    for c in curve:
      ax.annotate(f"{c['tokens']} tok (q{c['quantile']:.2f})", (c["overflow_rate"], c["tokens_per_s"]), fontsize=7)
    for name in ("s3", "s3-reserve"):
      if name in pol:
        ax.scatter(
          pol[name]["overflow_rate"], pol[name]["tokens_per_s"], color=_color(name), s=60, zorder=3, label=name
        )
    ax.set_xlabel("overflow rate (requests that outgrew their reservation)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("the predictor against a fixed reservation")
    ax.legend(fontsize=7)
    save(fig, "constant")
  return paths
