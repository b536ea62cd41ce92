#!/usr/bin/env python
"""Writes ``data/alpaca_eval/lengths.jsonl``: the AlpacaEval instructions with each generator's
answer length in GPT-2 tokens, from the full answers (one ``<generator>.jsonl`` per model).

The repository ships this file instead of the 15 MB of answers: a trace replay and the length
predictor need the prompts and the lengths, not the answer texts.

  python scripts/make_length_data.py --data-dir ../shared/data/alpaca_eval
"""

from __future__ import annotations

import argparse
import json
import pathlib

from s3jax.assets import asset_path


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--data-dir",
    type=pathlib.Path,
    required=True,
    help="directory of <generator>.jsonl files with id, dataset, instruction, output",
  )
  p.add_argument("--out", type=pathlib.Path, default=asset_path("data/alpaca_eval") / "lengths.jsonl")
  args = p.parse_args(argv)
  from s3jax.predictor.data import load_length_data

  data = load_length_data(args.data_dir, cache_dir=None)
  first = next(iter(sorted(args.data_dir.glob("*.jsonl"))))
  datasets = {r["id"]: r["dataset"] for r in map(json.loads, first.read_text().splitlines()) if r}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  with args.out.open("w") as f:
    for row, i in enumerate(data.ids):
      f.write(
        json.dumps(
          {
            "id": int(i),
            "dataset": datasets[int(i)],
            "instruction": data.prompts[row],
            "prompt_tokens": int(data.prompt_tokens[row]),
            "output_tokens": {g: int(n) for g, n in zip(data.generators, data.lengths[row])},
          },
          ensure_ascii=False,
        )
        + "\n"
      )
  print(f"wrote {len(data.ids)} instructions x {len(data.generators)} generators to {args.out}")


if __name__ == "__main__":
  main()
