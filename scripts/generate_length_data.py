#!/usr/bin/env python
"""Answers a list of instructions with the served model and writes each answer's length.

Every instruction goes through the model's chat template as one user message and is answered
greedily, at most ``--max-tokens`` tokens, by the engine (``s3jax.LLM``). One JSON Lines record
per instruction, in the format ``scripts/train_predictor.py --data-file`` reads:

  {"id": 3, "instruction": "...", "output_tokens": 212, "finish_reason": "stop",
   "generator": "SmolLM2-135M-Instruct"}

``output_tokens`` counts the answer's text tokens: the end-of-turn token that ended it is not
one (as in ``data/alpaca_eval/lengths.jsonl``). ``finish_reason`` is "stop" when the model ended
its answer and "length" when ``--max-tokens`` cut it. Records are appended in chunks; a rerun skips the ids the output
file already holds, so a long run can be stopped and resumed.

  python scripts/generate_length_data.py --out smollm2.jsonl               # 678 AlpacaEval instructions
  python scripts/generate_length_data.py --out smollm2.jsonl --limit 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from s3jax.assets import LENGTHS_FILE


def read_instructions(path: pathlib.Path) -> list[tuple[object, str]]:
  """``(id, instruction)`` of every record of a JSON Lines file (``id``: the line number if absent)."""
  out = []
  for number, line in enumerate(path.read_text().splitlines()):
    if line.strip():
      record = json.loads(line)
      out.append((record.get("id", number), record["instruction"]))
  return out


def done_ids(path: pathlib.Path) -> set:
  if not path.exists():
    return set()
  return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=pathlib.Path, required=True, help="JSON Lines file to append the records to")
  p.add_argument(
    "--instructions",
    type=pathlib.Path,
    default=LENGTHS_FILE,
    help="JSON Lines with `instruction` (and `id`) per line (default: the 678 AlpacaEval instructions)",
  )
  p.add_argument("--model", default=None, help="the model to answer with (default: the embedded default, SmolLM2)")
  p.add_argument("--max-tokens", type=int, default=1024, help="longest answer; longer ones end with 'length'")
  p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily; above 0 samples")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept when sampling")
  p.add_argument(
    "--seed",
    type=int,
    default=0,
    help="sampling: instruction i gets seed SEED + i (reproducible, resumable)",
  )
  p.add_argument("--limit", type=int, default=None, help="answer only the first N instructions")
  p.add_argument("--chunk", type=int, default=64, help="instructions per generate call (records written after each)")
  p.add_argument("--memory-budget", default="2GiB", help="KV-cache budget (policy max: each answer reserves it all)")
  p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer (default: the model's)")
  p.add_argument(
    "--keep-token-ids",
    action="store_true",
    help="also write each answer's token ids (`output_ids`): what a remaining-length head trains on",
  )
  args = p.parse_args(argv)

  from s3jax import LLM, SamplingParams

  todo = read_instructions(args.instructions)[: args.limit]
  skip = done_ids(args.out)
  todo = [(i, text) for i, text in todo if i not in skip]
  llm = LLM(
    args.model, policy="max", predictor=None, memory_budget=args.memory_budget, max_model_len=args.max_model_len
  )

  def params(i, cap: int) -> SamplingParams:
    seed = args.seed + int(i) if args.temperature > 0 else None
    return SamplingParams(max_tokens=cap, temperature=args.temperature, top_p=args.top_p, seed=seed)

  print(f"{llm.model_name}: {len(todo)} instructions to answer ({len(skip)} already in {args.out})", file=sys.stderr)
  decoding = "greedy" if args.temperature <= 0 else f"T={args.temperature},top_p={args.top_p},seed={args.seed}+id"
  start, answered, tokens = time.perf_counter(), 0, 0
  args.out.parent.mkdir(parents=True, exist_ok=True)
  for at in range(0, len(todo), args.chunk):
    chunk = todo[at : at + args.chunk]
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": text}]) for _, text in chunk]
    # A long instruction leaves less room: its answer is capped where prompt + answer fill the context.
    caps = [min(args.max_tokens, llm.max_model_len - len(ids)) for ids in prompts]
    outputs = llm.generate(prompts, [params(i, cap) for (i, _), cap in zip(chunk, caps)])
    with args.out.open("a") as f:
      for (i, text), out, cap in zip(chunk, outputs, caps):
        ended = out.finish_reason.value == "stop"  # the last token id is the one that ended it
        record = {
          "id": i,
          "instruction": text,
          "output_tokens": len(out.token_ids) - ended,
          "finish_reason": out.finish_reason.value,
          "generator": llm.model_name,
          "decoding": decoding,
          "max_tokens": cap,
        }
        if args.keep_token_ids:
          record["output_ids"] = list(out.token_ids)
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    answered, tokens = answered + len(chunk), tokens + sum(len(o.token_ids) for o in outputs)
    rate = tokens / (time.perf_counter() - start)
    print(f"{answered}/{len(todo)} answered, {rate:.0f} tokens/s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
