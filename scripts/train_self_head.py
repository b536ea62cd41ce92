#!/usr/bin/env python
"""Trains the served model's self-prediction head on its own answers' lengths (issue 30).

The served model (default: the embedded SmolLM2-135M-Instruct) reads each instruction of its length
data through its chat template; its residual stream after a block, at the prompt's last token, is
what the head reads (``s3jax.predictor.self_head``). The split is the one its MiniLM head was
trained with (``user_split_by_text``): train for the fit; calibration for the choice of the block
(``--layers``), the L2 penalty and the step (least negative log-likelihood) and for the conformal
margin; test for the table, which puts the shipped MiniLM head beside it on the same prompts.
Writes the chosen head to ``checkpoints/self_head/<model>`` (Orbax) and the table to
``results/self_head``.

  python scripts/train_self_head.py        # ~10 min on 2 CPU cores (the forwards of 678 prompts)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from s3jax.assets import REPO_ROOT

DATA = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.jsonl"
TARGETS = (0.1, 0.2)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=None, help="the served model (default: the embedded SmolLM2-135M-Instruct)")
  p.add_argument("--data", type=pathlib.Path, default=DATA, help="its length data (generate_length_data.py)")
  p.add_argument(
    "--layers",
    default="18,22,26",
    help="candidate blocks to read after, comma-separated: the head of least calibration NLL is kept",
  )
  p.add_argument("--max-tokens", type=int, default=1024, help="prompt tokens read (the last ones)")
  p.add_argument("--out", type=pathlib.Path, default=None, help="default: checkpoints/self_head/<model>")
  p.add_argument("--results", type=pathlib.Path, default=REPO_ROOT / "results" / "self_head")
  return p.parse_args(argv)


def prediction_ms(predict, prompts, repeats: int = 7) -> dict:
  """Median milliseconds of ``predict`` on the first prompt and on the first eight, after a warm call."""
  import time

  import numpy as np

  out = {}
  for n in (1, 8):
    predict(prompts[:n])  # compiles this shape if warm-up did not
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      predict(prompts[:n])
      times.append(time.perf_counter() - t0)
    out[f"batch_{n}"] = 1e3 * float(np.median(times))
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  import numpy as np
  from flax import nnx
  from tqdm import tqdm

  from s3jax import LLM
  from s3jax.buckets import BucketScheme
  from s3jax.predictor import LengthPredictor
  from s3jax.predictor.data import user_split_by_text
  from s3jax.predictor.evaluate import evaluate_head
  from s3jax.predictor.predictor import shipped_checkpoint_for
  from s3jax.predictor.self_head import (
    SelfHead,
    SelfHeadConfig,
    SelfHeadVersion,
    SelfLengthPredictor,
    calibration_for,
    train_self_head,
  )

  records = sorted(
    (json.loads(line) for line in args.data.read_text().splitlines() if line.strip()), key=lambda r: r["id"]
  )
  served = records[0]["generator"]
  role = user_split_by_text(args.data)
  split = {
    name: np.asarray([i for i, r in enumerate(records) if role[r["instruction"].strip()] == name])
    for name in ("train", "calib", "test")
  }
  true = np.asarray([r["output_tokens"] for r in records])

  llm = LLM(args.model, predictor=None, policy="on-demand", memory_budget="16MiB")
  if llm.model_name != served:
    raise SystemExit(f"the served model is {llm.model_name!r}, the data is {served!r}'s")
  prompt_ids = [llm.chat_prompt_ids([{"role": "user", "content": r["instruction"]}]) for r in records]
  buckets = BucketScheme.load(shipped_checkpoint_for(served))  # the MiniLM head's: the same labels
  untrained = calibration_for(served, np.zeros((1, 2)), np.zeros(1), buckets.max_length)
  tr, ca, te = split["train"], split["calib"], split["test"]
  test_ids = [prompt_ids[i] for i in te]
  rows, training, chosen = {}, {}, None
  for layer in (int(x) for x in args.layers.split(",")):
    cfg = SelfHeadConfig(served_model=served, layer=layer, width=llm.runner.cfg.d_model, max_tokens=args.max_tokens)
    predictor = SelfLengthPredictor(
      llm.runner, SelfHead(cfg.width, rngs=nnx.Rngs(0)), cfg, buckets=buckets, calibration=untrained
    )
    chunk = 32
    hidden = np.concatenate(
      [
        predictor.hidden_states(prompt_ids[i : i + chunk])
        for i in tqdm(range(0, len(prompt_ids), chunk), desc=f"hidden states after block {layer}", unit="x32")
      ]
    )
    head, record = train_self_head(hidden[tr], true[tr], hidden[ca], true[ca])
    dist = np.asarray(head(hidden), np.float64)
    calibration = calibration_for(served, dist[ca], true[ca], buckets.max_length)
    predictor.swap(SelfHeadVersion(state=nnx.state(head), calibration=calibration))
    label = f"self-prediction, block {layer}"
    rows[label] = evaluate_head(predictor, dist[te], true[te], served, true[tr])
    training[label] = record
    calib_nll = record[str(record["chosen_l2"])]["calib_nll"]
    if chosen is None or calib_nll < chosen[0]:
      chosen = (calib_nll, label, predictor)
  _, chosen_label, predictor = chosen
  minilm = LengthPredictor.load_default(served)
  name = minilm.head_for(served)
  texts = [records[i]["instruction"] for i in te]
  rows[f"MiniLM head {name}"] = evaluate_head(minilm, minilm.predict_dist(texts, name), true[te], name, true[tr])

  out = args.out or REPO_ROOT / "checkpoints" / "self_head" / served
  predictor.save(out)
  # Latency on the test prompts of median length, one and eight of them.
  typical = sorted(range(len(te)), key=lambda i: len(test_ids[i]))[len(te) // 2 - 4 : len(te) // 2 + 4]
  latency = {
    "prompt_tokens": [len(test_ids[i]) for i in typical],
    "self-prediction": prediction_ms(predictor.predict_lengths, [test_ids[i] for i in typical]),
    "MiniLM": prediction_ms(minilm.with_options(name).predict_lengths, [texts[i] for i in typical]),
  }
  lines = [
    f"| predictor ({served}, test split: {len(te)} prompts) | tau | exact | within one |"
    + "".join(f" overflow @{t} | saving @{t} |" for t in TARGETS),
    "|---|---:|---:|---:|" + "---:|---:|" * len(TARGETS),
  ]
  for label, r in rows.items():
    mark = " (chosen on calibration)" if label == chosen_label else ""
    cells = "".join(f" {r[f'at_{t}']['overflow']:.3f} | {r[f'at_{t}']['saving']:+.1%} |" for t in TARGETS)
    lines.append(f"| {label}{mark} | {r['kendall_tau']:.3f} | {r['exact']:.3f} | {r['within_one']:.3f} |{cells}")
  table = "\n".join(lines)
  print(table)
  print(f"- prediction latency, test prompts of median length ({latency['prompt_tokens']} tokens):")
  for label in ("self-prediction", "MiniLM"):
    ms = latency[label]
    print(f"  {label}: {ms['batch_1']:.1f} ms for one prompt, {ms['batch_8']:.1f} ms for eight (medians)")
  args.results.mkdir(parents=True, exist_ok=True)
  (args.results / "metrics.json").write_text(
    json.dumps(
      {
        "command": "python scripts/train_self_head.py " + " ".join(argv or sys.argv[1:]),
        "chosen": chosen_label,
        "training": training,
        "latency_ms": latency,
        "rows": rows,
        "split": {k: len(v) for k, v in split.items()},
      },
      indent=1,
    )
  )
  (args.results / "table.md").write_text(table + "\n")
  print(f"wrote {out} and {args.results}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
