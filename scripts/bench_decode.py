"""Decode throughput: s3jax vs. transformers PyTorch, on the GPT-2-small shape or any model.

For every (batch, cache length) cell this measures steady-state decode
tokens/s of

  * s3jax: the engine's decode executable (``s3jax.executor.decode_ceiling``): B live
    rows in a paged KV pool just big enough for them, the state donated and
    advanced on the device, calls dispatched back to back;
  * transformers: ``GPT2LMHeadModel.generate`` (greedy, ``min_new_tokens ==
    max_new_tokens``, dynamic cache) continuing from a pre-filled cache of the
    same length, so both attend over the same number of positions (for a real
    model, transformers loads the same weights: the same GGUF file or
    checkpoint directory).

Both decode the last positions of the cache (s3jax: ``(repeats + 1) * N``
steps ending at ``S - 1``, the first N untimed; torch: ``S - N .. S - 1``);
prefill is excluded (PyTorch: ``t(N) - t(1)`` of two
``generate`` calls). By default the weights are random (the shape is what
costs); ``--model`` benchmarks a model of any source instead, ``--model default``
the embedded default (SmolLM2-135M-Instruct's real weights). The CPU's
matmul peak is the median GFLOP/s of a jitted fp32 ``jnp.dot`` of
``--peak-n`` squared matrices, and each cell reports its achieved GFLOP/s:

  flops/step = 2 * (non-embedding params + lm_head params) * B
               + 4 * L * D * S_att * B

with ``S_att`` the mean number of attended positions (useful work only; the
s3jax kernel also scans the unwritten tail of each row's last page).

Usage:
  python scripts/bench_decode.py                 # full grid
  python scripts/bench_decode.py --quick         # batch 1, 32 at S=256
  python scripts/bench_decode.py --batches 32 --cache-lens 256 1024 --no-write
  python scripts/bench_decode.py --model default --batches 1 8 32 --cache-lens 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from s3jax.assets import REPO_ROOT
from s3jax.executor.decode_ceiling import decode_tokens_per_s
from s3jax.executor.runner import ModelRunner
from s3jax.extras import missing_extra
from s3jax.models.config import Family

SECTION = "## Decode (models)"


def matmul_peak(n: int, repeats: int) -> float:
  """Median GFLOP/s of an fp32 ``n x n`` jnp.dot (the CPU's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e9


def model_name(cache_len: int) -> str:
  # gpt2-small has 1024 positions; the 2k variant only adds position rows.
  return "gpt2-small" if cache_len <= 1024 else "gpt2-small-2k"


def flops_per_step(cfg, batch: int, attended: float) -> float:
  matmul_params = cfg.block_params() + cfg.vocab_size * cfg.d_model
  return 2 * matmul_params * batch + 4 * cfg.n_layers * cfg.d_model * attended * batch


def bench_s3jax(runner: ModelRunner, batch: int, cache_len: int, new_tokens: int, repeats: int) -> float:
  """Median decode tokens/s of ``new_tokens`` steps ending at position ``cache_len - 1``."""
  context = cache_len - new_tokens * (repeats + 1)
  return decode_tokens_per_s(runner, batch, context, steps=new_tokens, repeats=repeats)


def torch_model(runner: ModelRunner):
  """transformers' PyTorch model of the runner's weights: the same file or checkpoint for a real
  model, a random one of its shape (GPT-2 or Llama family) otherwise."""
  import torch
  import transformers as tf

  source, cfg = runner.source, runner.cfg
  if source is not None and source.is_gguf:
    path = source.checkpoint
    return tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  if source is not None and source.checkpoint is not None:
    return tf.AutoModelForCausalLM.from_pretrained(str(source.checkpoint), dtype=torch.float32).eval()
  torch.manual_seed(0)
  if cfg.family is Family.GPT2:
    hf = tf.GPT2Config(
      vocab_size=cfg.vocab_size,
      n_positions=cfg.max_seq_len,
      n_embd=cfg.d_model,
      n_layer=cfg.n_layers,
      n_head=cfg.n_heads,
    )
    return tf.GPT2LMHeadModel(hf).eval()
  if cfg.family is Family.LLAMA:
    hf = tf.LlamaConfig(
      vocab_size=cfg.vocab_size,
      max_position_embeddings=cfg.max_seq_len,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads,
      tie_word_embeddings=cfg.tie_embeddings,
    )
    return tf.LlamaForCausalLM(hf).eval()
  raise SystemExit(f"no transformers reference for random {cfg.family.value} weights; pass --no-torch")


def bench_torch(model, batch: int, cache_len: int, new_tokens: int, repeats: int) -> float:
  """Median decode tokens/s of ``generate`` continuing a pre-filled dynamic cache."""
  import torch
  from transformers import DynamicCache

  cfg = model.config
  prefix = cache_len - new_tokens  # generate prefills 1 token, then decodes
  heads = cfg.num_attention_heads
  kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
  shape = (batch, kv_heads, prefix - 1, cfg.hidden_size // heads)
  kv = [(torch.randn(shape), torch.randn(shape)) for _ in range(cfg.num_hidden_layers)]
  ids = torch.randint(0, cfg.vocab_size, (batch, prefix))

  def run(n: int) -> float:
    cache = DynamicCache(config=cfg)
    for layer, (k, v) in enumerate(kv):
      cache.update(k, v, layer)  # stored as is; decode appends with torch.cat
    t0 = time.perf_counter()
    with torch.inference_mode():
      model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=0,
      )
    return time.perf_counter() - t0

  run(2)  # warm-up
  rates = []
  for _ in range(repeats):
    rates.append(batch * (new_tokens - 1) / (run(new_tokens) - run(1)))
  return statistics.median(rates)


def write_section(text: str, path: Path, section: str = SECTION) -> None:
  """Replaces (or appends) this script's section of BENCHMARKS.md, leaving the others."""
  old = path.read_text() if path.exists() else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
  new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
  path.write_text(new)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--model",
    default=None,
    help="a model to load (a GGUF file, a checkpoint directory, a Hub id, a named config) or 'default' for the "
    "embedded default; none: the gpt2-small shape (gpt2-small-2k beyond 1024 tokens) with random weights",
  )
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
  p.add_argument("--cache-lens", type=int, nargs="+", default=[256, 1024, 2048])
  p.add_argument("--new-tokens", type=int, default=16, help="decode steps per repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="batch 1 and 32 at cache length 256, 2 repeats")
  p.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
  p.add_argument(
    "--max-kv-gb", type=float, default=5.0, help="skip cells whose fp32 KV cache exceeds this (the machine has ~23 GB)"
  )
  p.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
  p.add_argument("--peak-n", type=int, default=2048)
  p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
  p.add_argument(
    "--dtype", default="float32", choices=("float32", "bfloat16"), help="s3jax's weights and KV-cache dtype"
  )
  p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the cells as JSON to FILE")
  args = p.parse_args(argv)
  if args.quick:
    args.batches, args.cache_lens, args.repeats = [1, 32], [256], 2
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)

  torch = None
  if not args.no_torch:  # a device check runs without torch
    try:
      import torch
    except ModuleNotFoundError as e:
      raise missing_extra(e, "bench", "bench_decode.py's PyTorch reference") from e
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
  peak = matmul_peak(args.peak_n, 10)
  print(f"matmul peak: {peak:.1f} GFLOP/s (fp32 {args.peak_n}^2 jnp.dot, median of 10)")

  cells = [(s, b) for s in args.cache_lens for b in args.batches]
  rows, runners, torch_models = [], {}, {}
  for s, b in tqdm(cells, desc="decode cells", file=sys.stdout):
    name = model_name(s) if args.model is None else args.model
    if name not in runners:
      runners[name] = ModelRunner.load(None if name == "default" else name, dtype=args.dtype)
    runner = runners[name]
    cfg = runner.cfg
    kv_gb = cfg.kv_bytes_per_token(2 if args.dtype == "bfloat16" else 4) * b * s / 1e9
    if kv_gb > args.max_kv_gb or s > cfg.max_seq_len:
      rows.append((b, s, None, None, None, f"skipped: KV {kv_gb:.1f} GB > --max-kv-gb or S > {cfg.max_seq_len}"))
      continue
    flops = flops_per_step(cfg, b, s - args.new_tokens / 2)
    ours = bench_s3jax(runner, b, s, args.new_tokens, args.repeats)
    gc.collect()
    ref = None
    if not args.no_torch:
      if name not in torch_models:
        torch_models[name] = torch_model(runner)
      ref = bench_torch(torch_models[name], b, s, args.new_tokens, args.repeats)
      gc.collect()
    rows.append((b, s, ours, ref, flops, ""))
    tqdm.write(f"B={b} S={s}: s3jax {ours:.1f} tok/s, torch {ref and round(ref, 1)} tok/s")

  header = (
    "| batch | cache len | s3jax tok/s | torch tok/s | speed-up | s3jax GFLOP/s | % of peak "
    "| torch GFLOP/s |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
  )
  lines = []
  for b, s, ours, ref, flops, note in rows:
    if ours is None:
      lines.append(f"| {b} | {s} | {note} | | | | | |")
      continue
    g = flops * ours / b / 1e9
    tg = f"{flops * ref / b / 1e9:.1f}" if ref else "-"
    up = f"{ours / ref:.2f}x" if ref else "-"
    lines.append(
      f"| {b} | {s} | {ours:.1f} | {ref:.1f} | {up} | {g:.1f} | {100 * g / peak:.0f}% | {tg} |"
      if ref
      else f"| {b} | {s} | {ours:.1f} | - | - | {g:.1f} | {100 * g / peak:.0f}% | - |"
    )
  table = header + "\n".join(lines) + "\n"
  print(table)
  if args.json is not None:
    cells = [
      {"batch": b, "cache_len": s, "s3jax_tokens_per_s": ours, "torch_tokens_per_s": ref, "note": note}
      for b, s, ours, ref, flops, note in rows
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype, "device": jax.devices()[0].device_kind, "matmul_gflops": peak}
    args.json.write_text(json.dumps({**meta, "cells": cells}, indent=1))
    print(f"wrote {args.json}")

  command = "python scripts/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
  cfg, source = runner.cfg, runner.source
  if args.model is None:
    section, what = SECTION, "GPT-2-small shape (12 layers, D 768, V 50257), random weights"
  else:
    kind = "random weights" if source.random_weights else f"real weights ({source.checkpoint.name})"
    section = f"## Decode ({cfg.name})"
    what = (
      f"{cfg.name} ({cfg.family.value}, {cfg.n_layers} layers, D {cfg.d_model}, {cfg.n_heads} heads, "
      f"{cfg.n_kv_heads} kv heads, V {cfg.vocab_size}), {kind}, transformers on the same weights"
    )
  text = (
    f"{section}\n\n"
    f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
    f"jax {jax.__version__}, "
    + (f"torch {torch.__version__} with {torch.get_num_threads()} threads" if torch else "no torch")
    + ").\n\n"
    f"{what}, {args.dtype}, greedy. Decode only: "
    f"{args.new_tokens} steps at positions S-{args.new_tokens}..S-1, median of {args.repeats} repeats. "
    f"torch = transformers' `generate` (dynamic cache pre-filled to S-{args.new_tokens}, "
    f"`min_new_tokens = max_new_tokens`, decode time = t(N) - t(1)). Matmul peak: "
    f"{peak:.1f} GFLOP/s (median fp32 {args.peak_n}x{args.peak_n} `jnp.dot`). "
    f"FLOPs/step = 2 * (non-embedding + lm_head params) * B + 4 * L * D * S_att * B, "
    f"S_att = mean attended positions.\n\n{table}"
  )
  if not args.no_write:
    write_section(text, REPO_ROOT / "BENCHMARKS.md", section)
    print(f"wrote {section} of BENCHMARKS.md")


if __name__ == "__main__":
  main()
